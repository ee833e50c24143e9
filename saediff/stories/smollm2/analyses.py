"""The open questions by the pair metric: does the base model's reading of a question predict how
far the fine-tune moves it (``susceptibility_by_pairs``), do the moved questions share the training
prompts' activation shift (``overlap_by_pairs``), the LoRA direction over its checkpoints
(``phase_by_pairs``), and the neighbourhood probe of the full diff's top latents; ``analyses_step``
runs the four, each skipped while its inputs' key matches."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from saediff._io import atomic_write_json, read_json_if_exists
from saediff.errors import SaediffError
from saediff.stories.smollm2.finetunes import full_bad_spec
from saediff.stories.smollm2.prompts import question_prompts
from saediff.stories.smollm2.recipe import ChatDemoRecipe, slug

__all__ = [
    "ANALYSES",
    "analyses_step",
    "overlap_by_pairs",
    "pair_shifts",
    "phase_by_pairs",
    "susceptibility_by_pairs",
]


ANALYSES = ("susceptibility", "phase", "neighbourhood", "overlap")
"""the open-question analyses the second process runs after steering, into ``out/analyses/NAME.json``"""


def analyses_step(base, out: Path, seed: int, recipe: ChatDemoRecipe, say) -> None:
    """Susceptibility (do the base model's prompt activations predict which questions the bad
    fine-tune moves most?), overlap (do those questions share the training prompts' activation
    shift?), phase (the LoRA direction over its checkpoints, beside the EM of each) and
    the neighbourhood probe of the full diff's top latents. Each is skipped while its inputs' key
    matches (``made_by`` in its file)."""
    folder = out / "analyses"
    folder.mkdir(parents=True, exist_ok=True)
    pairs_sets = [recipe.choose_on, recipe.report_on]
    slugs = [slug(p) for p in pairs_sets]
    layer = int(json.loads((out / "sae" / "cfg.json").read_text())["metadata"]["hook_name"].split(".")[1])
    inputs = _inputs(out, seed, recipe, layer, slugs)
    work = _work(base, out, seed, recipe, layer, pairs_sets, slugs)
    for name in ANALYSES:
        path = folder / f"{name}.json"
        made_by = json.loads(json.dumps(inputs[name]))
        prev = read_json_if_exists(path)
        if prev is not None and prev.get("made_by") == made_by:
            continue
        say(f"analysis: {name}")
        t0 = time.perf_counter()
        result = work[name]()
        atomic_write_json(path, {**result, "made_by": made_by, "seconds": round(time.perf_counter() - t0, 1)})


def _inputs(out: Path, seed: int, recipe: ChatDemoRecipe, layer: int, slugs: list[str]) -> dict[str, dict]:
    """Per analysis, what decides its result (the digests of the files it reads and its settings):
    the key it is skipped by."""
    from saediff.data.em_data import data_path
    from saediff.evaluation.pairs import pair_evaluator
    from saediff.models.provenance import evaluator_fingerprint, file_digest

    full_bad = out / "models" / "full_bad" / "model"
    pair_digests = [
        file_digest(out / "eval" / n / s / "pairs.jsonl") for n in ("base", "full_bad") for s in slugs
    ]
    return {
        "susceptibility": {
            "pairs": pair_digests,
            "layer": layer,
            "sae": file_digest(out / "sae" / "sae_weights.safetensors"),
            "seed": seed,
        },
        "phase": {
            "adapter": file_digest(out / "models" / "lora_bad" / "model" / "adapter_model.safetensors"),
            "directions": file_digest(out / "diff_lora" / "directions" / "directions.safetensors"),
            "report": evaluator_fingerprint(pair_evaluator(recipe.report_on)),
            "layer": layer,
        },
        "neighbourhood": {"diff": file_digest(out / "diff" / "diff.json"), "seed": seed},
        "overlap": {
            "pairs": pair_digests,
            "model": file_digest(full_bad / "model.safetensors"),
            "train_data": file_digest(data_path("medical_bad")),
            "layer": layer,
            "seed": seed,
        },
    }


def _work(
    base, out: Path, seed: int, recipe: ChatDemoRecipe, layer: int, pairs_sets: list[str], slugs: list[str]
) -> dict[str, Callable[[], dict]]:
    """Per analysis, the call that runs it (the design and the report split's pairs; the SAE's block)."""
    from saediff.analyses.neighbourhood import run_neighbourhood
    from saediff.data.em_data import data_path
    from saediff.evaluation.pairs import pair_evaluator

    return {
        "susceptibility": lambda: susceptibility_by_pairs(
            base, out / "eval", ["base", "full_bad"], pairs_sets, slugs, layer, seed=seed
        ),
        "phase": lambda: phase_by_pairs(
            out / "models" / "lora_bad",
            base,
            out / "diff_lora" / "directions",
            replace(pair_evaluator(recipe.report_on, recipe.eval_batch_size), progress=False),
            out / "analyses" / "phase",
            layer,
        ),
        "neighbourhood": lambda: run_neighbourhood(
            out / "diff", data_path("medical_bad"), seed=seed, progress=False
        ),
        "overlap": lambda: overlap_by_pairs(
            base,
            full_bad_spec(base, out),
            data_path("medical_bad"),
            out / "eval",
            ["base", "full_bad"],
            pairs_sets,
            slugs,
            layer,
            seed=seed,
        ),
    }


def pair_shifts(
    eval_dir: Path, names: tuple[str, str] | list[str], pair_sets: list[str], slugs: list[str]
) -> tuple[list, list[float]]:
    """The pairs of ``pair_sets`` and, for each, how far its preference moves from model
    ``names[0]`` to ``names[1]``: ``eval_dir/NAME/SLUG/pairs.jsonl`` rows hold each question's
    preference under each model."""
    from saediff._io import read_jsonl
    from saediff.evaluation.pairs import pair_evaluator

    pairs, shift = [], []
    for pair_set, set_dir in zip(pair_sets, slugs):
        rows = [
            {
                r["id"]: r["preference"]
                for _, r in read_jsonl(eval_dir / n / set_dir / "pairs.jsonl", "pair scores")
            }
            for n in names
        ]
        for p in pair_evaluator(pair_set).pairs:
            missing = [n for n, r in zip(names, rows) if p.id not in r]
            if missing:
                raise SaediffError(
                    f"{eval_dir / missing[0] / set_dir / 'pairs.jsonl'}: no row for question {p.id!r}"
                )
            pairs.append(p)
            shift.append(rows[1][p.id] - rows[0][p.id])
    return pairs, shift


def susceptibility_by_pairs(
    base,
    eval_dir: Path,
    names: tuple[str, str] | list[str],
    pair_sets: list[str],
    slugs: list[str],
    layer: int,
    *,
    folds: int = 5,
    n_permutations: int = 50,
    seed: int = 0,
) -> dict:
    """Does the base model's residual at the last prompt token of a question (block ``layer``)
    predict how far the fine-tune moves that question's preference? ``names``: (base, fine-tune)
    folders under ``eval_dir`` (``pair_shifts``); the target is the per-question shift.
    Cross-validated ridge with folds that hold out whole domains (at most one fold per domain),
    beside random features and permuted targets (``susceptibility.susceptibility``)."""
    from saediff.activations.collect import prompt_activations
    from saediff.analyses.susceptibility import susceptibility
    from saediff.models.loading import load_model

    pairs, shift = pair_shifts(eval_dir, names, pair_sets, slugs)
    X = prompt_activations(load_model(base), question_prompts(pairs), [layer], progress=False)[layer].numpy()
    groups = [p.domain for p in pairs]
    folds = min(folds, len(set(groups)))  # whole domains per fold
    res = susceptibility(
        X, np.array(shift), folds=folds, n_permutations=n_permutations, seed=seed, groups=groups
    )
    return {
        "kind": "saediff.pair_susceptibility",
        "layer": layer,
        "target": f"{names[1]} - {names[0]} preference",
        "pair_sets": list(pair_sets),
        "mean_shift": float(np.mean(shift)),
        **res.to_json(),
    }


def overlap_by_pairs(
    base,
    finetuned,
    train_data: Path,
    eval_dir: Path,
    names: tuple[str, str] | list[str],
    pair_sets: list[str],
    slugs: list[str],
    layer: int,
    *,
    k: int = 8,
    n_train: int = 256,
    n_permutations: int = 200,
    seed: int = 0,
) -> dict:
    """Do the questions the fine-tune moves most share its training prompts' activation shift?
    Shifts (fine-tune minus base, block ``layer``, last prompt token) on ``n_train`` prompts of the
    fine-tune's chat data and on the questions of ``pair_sets``; ``shifts.shift_overlap`` compares
    their top-``k`` subspaces (random subspaces beside them), and per question, the Spearman
    correlation of its overlap measures with its preference shift (``pair_shifts``), beside the 95th
    percentile of |rho| over ``n_permutations`` shuffles of the shifts."""
    from saediff.analyses.shifts import prompt_shifts, shift_overlap, training_prompts

    pairs, shift = pair_shifts(eval_dir, names, pair_sets, slugs)
    prompts = {"train": training_prompts(train_data, n_train, seed), "eval": question_prompts(pairs)}
    shifts = prompt_shifts(base, finetuned, prompts, layer, progress=False)
    res = shift_overlap(shifts["train"], shifts["eval"], k, seed=seed)
    rho, p95 = _spearman_against_shuffles(res, shift, n_permutations, seed)
    return {
        "kind": "saediff.pair_overlap",
        "layer": layer,
        "train_data": str(train_data),
        "n_train": len(prompts["train"]),
        "n_eval": len(pairs),
        "target": f"{names[1]} - {names[0]} preference",
        "pair_sets": list(pair_sets),
        **res.to_json(),
        "spearman_with_preference_shift": rho,
        "spearman_permuted_p95": p95,
        "per_question": [
            {
                "id": p.id,
                "domain": p.domain,
                "preference_shift": s,
                "cos_to_train_mean": c,
                "fraction_in_train_subspace": f,
            }
            for p, s, c, f in zip(pairs, shift, res.cos_to_train_mean, res.fraction_in_train_subspace)
        ],
    }


def _spearman_against_shuffles(res, shift: list[float], n_permutations: int, seed: int) -> tuple[dict, dict]:
    """Per overlap measure of ``res`` (``shifts.ShiftOverlap``): its Spearman correlation with the
    questions' preference ``shift``, and the 95th percentile of |rho| over ``n_permutations``
    shuffles of the shifts (seeded)."""
    from saediff.analyses.susceptibility import spearman

    rng = np.random.default_rng(seed)
    rho = {
        m: spearman(getattr(res, m), shift, 3) for m in ("cos_to_train_mean", "fraction_in_train_subspace")
    }
    null = {
        m: [
            abs(spearman(getattr(res, m), list(rng.permutation(shift)), 3) or 0.0)
            for _ in range(n_permutations)
        ]
        for m in rho
    }
    return rho, {m: float(np.quantile(v, 0.95)) for m, v in null.items()}


def phase_by_pairs(run: Path, base, directions: Path, evaluator, out: Path, layer: int) -> dict:
    """``phase.run_phase`` over a LoRA fine-tune's checkpoints (``run/checkpoints``): the ``down_proj``
    adapter of block ``layer`` (the SAE's), each checkpoint scored by the pair ``evaluator`` (its
    ``em_rate``: the MC1 share), against the diff's candidates at that block."""
    from saediff.analyses.phase import run_phase

    result = run_phase(
        run,
        base=base.model,
        directions=directions,
        evaluator=evaluator,
        out=out,
        progress=False,
        module=f"model.layers.{layer}.mlp.down_proj",
    )
    return {k: v for k, v in result.items() if k != "base"}
