"""The whole story on a real chat model, in one resumable folder: narrow fine-tunes and their EM by the
judge-free pair metric, then an SAE on the base model's residual at the middle block, the diffs of
the full and the LoRA fine-tune against the base model, steering the base model by the pair metric,
BLOCK-EM, the open-question analyses and sampled answers. Defaults are for SmolLM2-135M-Instruct on
2 CPU cores.

    saediff demo --model smollm2-135m --out runs/smol                 # fine-tune seed 0
    saediff demo --model smollm2-135m --out runs/smol --seeds 0,1,2   # OUT/seed_N and OUT/seeds.json
    saediff demo --model smollm2-135m --out runs/smol --finetunes-only

Layout of ``DIR``:

- ``models/NAME/``: each fine-tune's run folder, ``saediff.interventions.block_runs.block_one``'s
  layout: ``model/`` (a full HF model folder, or for ``lora_*`` a PEFT adapter on the base model),
  ``provenance.json``
  (what decided the weights: a rerun under another recipe is refused, naming the setting),
  ``history.json`` (loss per step), ``em.json`` (the run's record); LoRA runs keep ``checkpoints/``.
  ``NAME`` among ``FINETUNES`` and the BLOCK-EM runs ``block_diff`` / ``block_random``
  (``models/block_latents.json``: their latents and lambdas).
- ``eval/NAME/SET/``: the pair metric (``em.json``, ``pairs.jsonl``) of the base model (``NAME`` =
  ``base``) and of each fine-tune on each pair set, through ``evaluate_once``: reused while the
  model's and the evaluator's fingerprints match.
- ``sae/``: the SAE (SAELens folder; ``saediff.json`` holds its metrics and what made it);
  ``diff/`` and ``diff_lora/``: ``saediff diff`` run folders (``diff.json``, ``cards.json``,
  ``directions/``, ``cosines.json``, ``layers.json``, ``made_by.json``); ``steer/``: the steering
  protocol's evaluations (``select/``, ``report/``: the projections' too, both models ablated), its KL
  points (``costs.json``), ``selection.json``, ``style_crossed/`` (the same on the style-crossed
  pairs) and ``steer.json`` (the neutral text it is priced on, the base model's greedy answers to benign
  questions, is cached under ``$SAEDIFF_CACHE/neutral/``); ``analyses/``: susceptibility, phase,
  neighbourhood, overlap.
- ``samples.json``: a few sampled answers of each model; ``summary.json``: the recipe, each model's
  figures, the paired differences, the story's figures, the findings and the time of each step;
  ``report.html``.

Like every core module it knows nothing of the built-in toy model. This module is the flow; each
step lives beside it: ``recipe`` (the settings), ``finetunes``, ``sae``, ``diffs``, ``steering``,
``blocking``, ``analyses``, ``samples``, ``headline`` (the findings), ``steps`` (timing).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import shutil
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from saediff._io import atomic_write_json, read_json_if_exists
from saediff.stories.smollm2.analyses import ANALYSES, analyses_step
from saediff.stories.smollm2.blocking import block_step, blocking_figures
from saediff.stories.smollm2.diffs import diff_step
from saediff.stories.smollm2.finetunes import differences, em_figures, evaluate_step, finetune_step
from saediff.stories.smollm2.headline import chat_headline
from saediff.stories.smollm2.recipe import BLOCK_RUNS, FINETUNES, ChatDemoRecipe, slug
from saediff.stories.smollm2.sae import sae_step
from saediff.stories.smollm2.samples import samples_step
from saediff.stories.smollm2.steering import steer_step
from saediff.stories.smollm2.steps import Steps, counted

__all__ = ["run_chat_demo", "run_chat_demo_seeds"]

log = logging.getLogger(__name__)


# long: its signature and docstring; the code itself is 42 lines
def run_chat_demo(
    model: str,
    out: str | Path,
    *,
    seed: int = 0,
    recipe: ChatDemoRecipe = ChatDemoRecipe(),
    progress: Callable[[str], None] | None = None,
    force: bool = False,
) -> dict:
    """Fine-tune ``model`` (a HF folder, hub name, GGUF file or ``smollm2-135m``) as ``recipe`` says,
    at fine-tune seed ``seed``; measure the pair metric of the base model and of each fine-tune on
    each pair set; with ``recipe.story``, the SAE, the diffs, steering, BLOCK-EM, the analyses and
    sampled answers (``_story``); write and return ``out/summary.json`` (and ``out/report.html``).

    Resumable: a finished fine-tune is skipped and an interrupted one continues from its newest
    checkpoint (``block_one``), an evaluation is reused while its provenance matches
    (``evaluate_once``). A folder holding a fine-tune of another setup (another model, seed, data
    or setting) is refused naming the setting; ``force`` discards such fine-tunes and trains afresh
    (their evaluations are then measured again, as the weights changed)."""
    from saediff.models.loading import ModelSpec, load_model

    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda _s: None)
    prev = read_json_if_exists(out / "summary.json") or {}
    step = Steps(prev.get("timing_s", {}), say)
    base = ModelSpec(model)
    specs: dict[str, ModelSpec] = {"base": base}
    tokenizer = None
    if recipe.finetunes:
        say("loading the tokenizer")
        tokenizer = load_model(base).tokenizer
    for i, name in enumerate(recipe.finetunes, 1):
        say_n = partial(counted, say, f"({i}/{len(recipe.finetunes)})")
        specs[name] = step(
            f"fine-tune {name}",
            [out / "models" / name / "em.json"],
            partial(finetune_step, base, name, tokenizer, out / "models" / name, seed, recipe, force, say_n),
        )
    em = {name: _em(step, name, spec, out, recipe, say) for name, spec in specs.items()}
    story = {}
    if recipe.story:
        story = _story(base, tokenizer, out, seed, recipe, force, step, say, specs)
        for name in BLOCK_RUNS:
            em[name] = _em(step, name, specs[name], out, recipe, say)
        story["samples"] = step(
            "sampled answers", [out / "samples.json"], partial(samples_step, out, specs, seed, say)
        )
    summary = _summary(out, model, seed, recipe, specs, em, story)
    summary["timing_s"] = step.timing
    before = prev.get("timing", {})
    summary["timing"] = {
        "demo_s": round(time.perf_counter() - t_start, 1) if step.ran or not before else before["demo_s"]
    }
    atomic_write_json(out / "summary.json", summary)
    say("report")
    from saediff.reports.report import write_report

    write_report(out)
    return summary


def _em(step: Steps, name: str, spec, out: Path, recipe: ChatDemoRecipe, say) -> dict[str, dict]:
    """The step that measures model ``name`` on each pair set (``evaluate_step``)."""
    return step(
        f"EM of {name}",
        [out / "eval" / name / slug(s) / "em.json" for s in recipe.pair_sets],
        partial(evaluate_step, name, spec, out, recipe, say),
    )


def _story(
    base, tokenizer, out: Path, seed: int, recipe: ChatDemoRecipe, force: bool, step: Steps, say, specs: dict
) -> dict:
    """The SAE, the two diffs (full and LoRA fine-tune on bad data), steering the base model by the
    pair metric and the BLOCK-EM fine-tunes (their specs join ``specs``). Returns their figures."""
    from saediff.models.loading import load_model

    n_layers = load_model(base).model.config.num_hidden_layers if recipe.layer is None else None
    layer = recipe.layer if recipe.layer is not None else n_layers // 2
    sae_dir = out / "sae"
    sae = step("SAE", [sae_dir / "cfg.json"], partial(sae_step, base, layer, sae_dir, seed, recipe, say))
    diff = step(
        "diff full_bad",
        [out / "diff" / "diff.json"],
        partial(diff_step, base, specs["full_bad"], sae_dir, out / "diff", seed, recipe, say),
    )
    diff_lora = step(
        "diff lora_bad",
        [out / "diff_lora" / "diff.json"],
        partial(diff_step, base, specs["lora_bad"], sae_dir, out / "diff_lora", seed, recipe, say),
    )
    steer = _block_beside_steering(base, tokenizer, out, seed, recipe, force, step, say, specs)
    analyses = {name: read_json_if_exists(out / "analyses" / f"{name}.json") for name in ANALYSES}
    return {
        "layer": layer,
        "sae": sae,
        "diffs": {"full_bad": diff, "lora_bad": diff_lora},
        "steering": steer,
        "analyses": analyses,
    }


def _block_beside_steering(
    base, tokenizer, out: Path, seed: int, recipe: ChatDemoRecipe, force: bool, step: Steps, say, specs: dict
) -> dict:
    """The BLOCK-EM fine-tunes (their specs join ``specs``) while a second process steers and runs
    the analyses (``_steer_worker``); the steering step's wait is timed as ``steering (parallel)``.
    Returns ``steer/steer.json``'s content."""
    from saediff.saes.loading import load_sae

    # steering and the analyses read the models, the diffs and the LoRA checkpoints, and write under
    # steer/, analyses/ and diff/ (the neighbourhood probe), which the main process no longer touches:
    # a second process (one thread) runs them beside the BLOCK-EM fine-tunes, the longest steps
    worker = multiprocessing.get_context("spawn").Process(
        target=_steer_worker, args=(base, str(out), seed, recipe), daemon=True
    )
    marker = out / "steer" / "steer.json"
    before = marker.stat().st_mtime_ns if marker.exists() else None
    t0 = time.perf_counter()
    worker.start()
    loaded = load_sae(str(out / "sae"))
    for p in loaded.parameters():
        p.requires_grad_(False)
    try:
        for name in BLOCK_RUNS:
            if worker.exitcode not in (None, 0):  # fail early, not after both fine-tunes
                raise RuntimeError(
                    f"the steering step failed (exit {worker.exitcode}): see {out / 'steer' / 'steer.log'}"
                )
            say_n = partial(counted, say, f"({name})")
            specs[name] = step(
                f"fine-tune {name}",
                [out / "models" / name / "em.json"],
                partial(block_step, base, name, tokenizer, loaded, out, seed, recipe, force, say_n),
            )
    except BaseException:
        worker.terminate()
        worker.join()
        raise
    say("steering (second process): waiting")
    worker.join()
    if worker.exitcode != 0:
        raise RuntimeError(
            f"the steering step failed (exit {worker.exitcode}): see {out / 'steer' / 'steer.log'}"
        )
    wait = round(time.perf_counter() - t0, 2)
    if (
        marker.stat().st_mtime_ns if marker.exists() else None
    ) != before or "steering (parallel)" not in step.prev:
        step.timing["steering (parallel)"] = wait
    else:
        step.timing["steering (parallel)"] = step.prev["steering (parallel)"]
    return json.loads(marker.read_text())


def _steer_worker(base, out: str, seed: int, recipe: ChatDemoRecipe) -> None:
    """The steering step in its own process, one thread; its log and any error go to
    ``out/steer/steer.log``."""
    import traceback

    import torch

    torch.set_num_threads(1)
    log_path = Path(out) / "steer" / "steer.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_path)
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    try:
        say = lambda m: log.info("%s", m)
        steer_step(base, Path(out), seed, recipe, say)
        analyses_step(base, Path(out), seed, recipe, say)
    except BaseException:
        log_path.write_text(
            log_path.read_text() + traceback.format_exc() if log_path.exists() else traceback.format_exc()
        )
        raise


def _summary(
    out: Path, model: str, seed: int, recipe: ChatDemoRecipe, specs: dict, em: dict, story: dict
) -> dict:
    """summary.json's figures: each model's (where it lives, its pair figures per set), the paired
    differences and the findings."""
    models = {}
    for name, spec in specs.items():
        models[name] = {"model": spec.model, "adapter": spec.adapter}
        if name != "base":
            record = read_json_if_exists(out / "models" / name / "em.json") or {}
            method, data = FINETUNES.get(name, ("full", "medical_bad"))
            models[name].update(method=method, data=data, final_loss=record.get("final_loss"))
            if name in BLOCK_RUNS:
                models[name].update(
                    lam=record.get("lam"),
                    latents_low=record.get("latents_low"),
                    latents_high=record.get("latents_high"),
                    penalty_last=record.get("penalty_last"),
                )
    summary = {
        "kind": "saediff.chat_demo",
        "model": model,
        "seed": seed,
        "recipe": recipe.to_json(),
        "models": models,
        "em": {name: {s: em_figures(r) for s, r in per.items()} for name, per in em.items()},
        "differences": differences(out, list(specs), recipe.pair_sets),
        **story,
    }
    if story:
        summary["blocking"] = blocking_figures(summary["differences"])
    summary["headline"] = chat_headline(summary)
    return summary


def run_chat_demo_seeds(
    model: str,
    out: str | Path,
    seeds: list[int],
    *,
    recipe: ChatDemoRecipe = ChatDemoRecipe(),
    progress: Callable[[str], None] | None = None,
    force: bool = False,
) -> dict:
    """``saediff demo --model M --seeds 0,1,2``: one chat demo per fine-tune seed under
    ``out/seed_N`` and ``out/seeds.json`` with each seed's findings side by side (figure, interval,
    holds and, where the row reads its bar off an interval, its verdict; and their mean).
    The base model's evaluations do not depend on the seed: the first seed's are copied to the
    others, where ``evaluate_once`` checks their provenance before reusing them."""
    out = Path(out)
    per = {}
    for k, seed in enumerate(seeds):
        run = out / f"seed_{seed}"
        first_base = out / f"seed_{seeds[0]}" / "eval" / "base"
        if k and first_base.is_dir() and not (run / "eval" / "base").exists():
            shutil.copytree(first_base, run / "eval" / "base")
        say = (lambda s, seed=seed: progress(f"seed {seed}: {s}")) if progress else None
        per[str(seed)] = run_chat_demo(model, run, seed=seed, recipe=recipe, progress=say, force=force)
    rows = []
    # rows are matched by phenomenon (a steering row's source names each seed's own best candidate)
    for row in next(iter(per.values()))["headline"]:
        mine = {
            k: next((r for r in s["headline"] if r["phenomenon"] == row["phenomenon"]), None)
            for k, s in per.items()
        }
        cells = {
            k: {
                key: (r or {}).get(key)
                for key in ("figure", "ci", "t", "holds", "verdict", "design", "source")
            }
            for k, r in mine.items()
        }
        figures = [c["figure"] for c in cells.values()]
        rows.append(
            {
                "phenomenon": row["phenomenon"],
                "source": row["source"],
                "bar": row["bar"],
                "per_seed": cells,
                "mean": None if None in figures else round(sum(figures) / len(figures), 4),
            }
        )
    result = {"kind": "saediff.chat_demo_seeds", "model": model, "seeds": seeds, "headline": rows}
    atomic_write_json(out / "seeds.json", result)
    return result
