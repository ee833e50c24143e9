"""The demo's diffs: ``run_diff`` of the base model against a fine-tune on the design split's
teacher-forced references (both models read the very same tokens; the misaligned and aligned
references label the response mean difference), with the base model's in-context direction, then
``run_compare``."""

from __future__ import annotations

import json
from pathlib import Path

from saediff._io import atomic_write_json, read_json_if_exists
from saediff.stories.smollm2.prompts import contrast_examples, reference_prompts
from saediff.stories.smollm2.recipe import ChatDemoRecipe, pairs_of

__all__ = ["diff_figures", "diff_on_references", "diff_step", "in_context_candidates"]


def in_context_candidates(base, pairs: list, n_questions: int, seed: int, n_shots: int = 3) -> list:
    """The base model's in-context direction at every block (``directions.in_context_directions``):
    the first ``n_questions`` questions of ``pairs`` after ``n_shots`` medical examples answered badly,
    minus after the same examples answered well."""
    from saediff.data.prompts import Prompt
    from saediff.methods.directions import in_context_directions
    from saediff.models.hooks import resid_post
    from saediff.models.loading import load_model

    lm = load_model(base)
    questions = [
        Prompt(p.id, [{"role": "user", "content": p.question}], None, p.domain) for p in pairs[:n_questions]
    ]
    hooks = [resid_post(L) for L in range(lm.model.config.num_hidden_layers)]
    return in_context_directions(lm, questions, contrast_examples(), hooks, n_shots=n_shots, seed=seed)


def diff_on_references(
    base: str,
    finetuned: str | None,
    adapter: str | None,
    sae_dir: Path,
    pairs: list,
    out: Path,
    *,
    top_n: int,
    seed: int,
    extra: list = (),
) -> dict:
    """``run_diff`` of ``base`` vs the fine-tune (a model folder, or ``base`` + ``adapter``) on the
    teacher-forced references of ``pairs``, at every block, with ``extra`` directions (e.g. the
    in-context ones) in the export; then ``run_compare``. Returns the diff run's summary."""
    from saediff.methods.diff_run import run_compare, run_diff

    info = run_diff(
        base,
        finetuned,
        str(sae_dir),
        out,
        adapter=adapter,
        prompts=reference_prompts(pairs),
        top_n=top_n,
        seed=seed,
        layers="all",
        batch_size=16,
        extra_directions=list(extra),
    )
    run_compare(out, downstream=adapter is not None)
    return info


def diff_step(base, ft_spec, sae_dir: Path, run: Path, seed: int, recipe: ChatDemoRecipe, say) -> dict:
    """``saediff diff`` of the base model against one fine-tune on the ``choose_on`` references,
    unless ``run`` holds a diff of this very setup (``made_by.json``: the SAE, both models' weights,
    the references and the settings)."""
    from saediff.evaluation.pairs import pair_evaluator
    from saediff.models.provenance import evaluator_fingerprint, model_fingerprint, sae_fingerprint
    from saediff.saes.loading import load_sae

    made_by = json.loads(
        json.dumps(
            {
                "sae": sae_fingerprint(load_sae(str(sae_dir)), "sae"),
                "finetune": model_fingerprint(ft_spec),
                "base": model_fingerprint(base),
                "references": evaluator_fingerprint(pair_evaluator(recipe.choose_on)),
                "top": recipe.diff_top,
                "icl_questions": recipe.icl_questions,
                "seed": seed,
            }
        )
    )
    if read_json_if_exists(run / "made_by.json") == made_by and (run / "layers.json").exists():
        return diff_figures(run)
    say(f"diff {run.name}: the base model's in-context direction")
    pairs = pairs_of(recipe.choose_on)
    icl = in_context_candidates(base, pairs, recipe.icl_questions, seed) if ft_spec.adapter is None else []
    say(f"diff {run.name}: base vs fine-tune on the design split's references")
    diff_on_references(
        base.model,
        None if ft_spec.adapter else ft_spec.model,
        ft_spec.adapter,
        sae_dir,
        pairs,
        run,
        top_n=recipe.diff_top,
        seed=seed,
        extra=icl,
    )
    atomic_write_json(run / "made_by.json", made_by)
    return diff_figures(run)


def diff_figures(run: Path) -> dict:
    """A diff run's top latents, their deltas, and the cosines at the SAE's hook."""
    from saediff.data.runs import read_run

    info = read_run(run)["steps"]["diff"]
    cos = read_json_if_exists(run / "cosines.json") or {}
    return {
        "top_latents": info["top_latents"],
        "sae_hook": info["sae_hook"],
        "n_prompts": info["n_prompts"],
        "labels": info["labels"],
        "cosines": {k: cos.get(k) for k in ("names", "matrix", "random_baseline")},
    }
