"""The organism's demo, ``run_demo``: the whole story in one resumable folder (organism, SAE, the
diffs with the inputs the organism gives ``run_diff``, BLOCK-EM, the steering checks of
``steer_check``, the export, the open-question analyses), its figures (``summary``) and findings
(``headline``).

    saediff demo --quick --out runs/demo
"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

from saediff._io import atomic_write_json, read_json_if_exists
from saediff.data.runs import read_run
from saediff.errors import SaediffError
from saediff.methods.diff_run import run_compare, run_diff
from saediff.methods.export import load_directions
from saediff.stories.organism.headline import headline
from saediff.stories.organism.inputs import diff_inputs
from saediff.stories.organism.recipes import OrganismConfig
from saediff.stories.organism.steer_check import run_steer_check
from saediff.stories.organism.summary import demo_summary

__all__ = ["BLOCK_LATENTS", "run_demo", "run_demo_seeds"]


BLOCK_LATENTS = (10, 10)
"""the demo's BLOCK-EM sets: the latents that rose most (held down) and fell most (held up)"""


class _Steps:
    """The demo's resumable steps: a step whose artifact exists is skipped (its time kept from the
    earlier summary), the others run and are timed."""

    def __init__(self, prev_timing: dict, say):
        self.prev, self.say = prev_timing, say
        self.timing: dict[str, float] = {}
        self.ran: list[str] = []

    def __call__(self, name: str, done: Path, fn) -> None:
        import time

        self.say(name)
        if done.exists():
            self.timing[name] = self.prev.get(name, 0.0)
            return
        self.ran.append(name)
        t0 = time.perf_counter()
        fn()
        self.timing[name] = round(time.perf_counter() - t0, 2)


def run_demo(out: str | Path, *, quick: bool = True, seed: int = 0, progress=None) -> dict:
    """Organism -> SAE -> diff (full and LoRA) -> compare -> BLOCK-EM, with the steering checks,
    the export and the open-question analyses in a second process beside it -> the in-context
    analysis -> report. Resumable: a step whose artifact exists is skipped. Writes ``summary.json``."""
    import time

    t_start = time.perf_counter()  # the heavy imports below count too
    from saediff.stories.organism.analyses import run_icl_analysis
    from saediff.stories.organism.sae import train_organism_sae

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    org = out / "organism"
    say = progress or (lambda _s: None)
    prev_summary = read_json_if_exists(out / "summary.json") or {}
    step = _Steps(prev_summary.get("timing_s", {}), say)
    cfg = OrganismConfig.quick(seed) if quick else OrganismConfig(seed=seed)
    _check_demo_config(out, {"kind": "saediff.demo", "seed": seed, "quick": quick, "organism": cfg.to_json()})

    prebuilt = []
    step("organism", org / "organism.json", lambda: prebuilt.append(_organism(org, cfg, quick)))
    step("sae", org / "sae" / "cfg.json", lambda: train_organism_sae(org, seed=seed))
    _diffs(step, out, org, seed)
    _block_beside_parallel(step, out, org, seed, say)
    step("icl", out / "diff" / "icl_vs_ft.json", lambda: run_icl_analysis(out, seed=seed))
    return _write_summary(
        out,
        step,
        prev_summary.get("timing", {}),
        bool(prebuilt and prebuilt[0]),
        time.perf_counter() - t_start,
        seed,
        say,
    )


def _diffs(step: _Steps, out: Path, org: Path, seed: int) -> None:
    """The diffs of the aligned model against the full fine-tune (``out/diff``) and the LoRA one
    (``out/diff_lora``), then ``run_compare`` of both."""
    aligned, sae = str(org / "aligned"), str(org / "sae")
    step(
        "diff",
        out / "diff" / "diff.json",
        lambda: run_diff(
            aligned, str(org / "full_ft"), sae, out / "diff", seed=seed, **diff_inputs(aligned, seed=seed)
        ),
    )
    step(
        "diff_lora",
        out / "diff_lora" / "diff.json",
        lambda: run_diff(
            aligned,
            None,
            sae,
            out / "diff_lora",
            adapter=str(org / "lora_ft"),
            seed=seed,
            **diff_inputs(aligned, seed=seed),
        ),
    )
    step(
        "compare",
        out / "diff_lora" / "layers.json",
        lambda: (run_compare(out / "diff"), run_compare(out / "diff_lora")),
    )


def _block_beside_parallel(step: _Steps, out: Path, org: Path, seed: int, say) -> None:
    """BLOCK-EM (``_block``) while a second process runs the steering checks, the export and the
    open-question analyses (``_parallel_steps``); their times join ``step.timing``."""
    import time

    # the steering checks, the export and the open-question analyses read the diff runs and the
    # organism only: a second process runs them beside BLOCK-EM (the longest step, one thread);
    # the in-context analysis follows, as it needs the blocked run's rerouted latents
    worker = None
    if any(not p.exists() for p in _parallel_done(out).values()):
        worker = multiprocessing.get_context("spawn").Process(
            target=_parallel_steps, args=(str(out), seed), daemon=True
        )
        worker.start()
    step("block", out / "block" / "summary.json", lambda: _block(out, org, seed))
    if worker is not None:
        say("steering, export, analyses (waiting)")
        t0 = time.perf_counter()
        worker.join()
        step.timing["parallel_wait"] = round(time.perf_counter() - t0, 2)
        if worker.exitcode != 0:
            raise RuntimeError(
                f"the steering checks, export or analyses failed (exit {worker.exitcode}): "
                f"see {out / 'parallel.log'}"
            )
    step.timing.update(
        {f"{k} (parallel)": v for k, v in (read_json_if_exists(out / "parallel_timing.json") or {}).items()}
    )


def _organism(org: Path, cfg: OrganismConfig, quick: bool) -> bool:
    """Copy the shipped seed-0 organism of this very recipe (with its SAE) when it matches, else
    build; True when it was the shipped one."""
    from saediff.stories.organism.build import build_organism
    from saediff.stories.organism.prebuilt import copy_prebuilt, prebuilt_matches

    if quick and prebuilt_matches(cfg):
        copy_prebuilt(org, cfg)
        return True
    build_organism(org, cfg)
    return False


def _block(out: Path, org: Path, seed: int) -> None:
    """BLOCK-EM with at most 20 latents: the 10 that rose most held down, the 10 that fell most held
    up; the control holds 20 random latents. The generic command's path (saediff block --organism
    DIR --full --reroute): the aligned-data control first (it calibrates the drift monitor), the
    held-out and benign controls under the calibrated monitor, and the blocked run trained 3x longer
    and re-diffed (rerouting)."""
    from saediff.interventions.latent_sets import latents_from_diff
    from saediff.stories.organism.block import block_organism

    block_organism(
        org, out / "block", latents_from_diff(out / "diff", *BLOCK_LATENTS), seed=seed, reroute=True
    )


def _write_summary(
    out: Path, step: _Steps, before: dict, prebuilt: bool, elapsed_s: float, seed: int, say
) -> dict:
    """``summary.json`` (figures, headline, timings) and the report. The wall time is that of the
    run that did the work (a rerun that skips every step keeps it), beside the organism's build time."""
    import time

    from saediff.reports.report import write_report

    org = out / "organism"
    summary = demo_summary(out)
    summary["timing_s"] = step.timing
    summary["seed"] = seed
    summary["timing"] = {
        "demo_s": round(elapsed_s, 1) if step.ran or not before else before["demo_s"],
        "prebuilt_organism": prebuilt
        if "organism" in step.ran or not before
        else before["prebuilt_organism"],
        "organism_build_s": round(
            sum(json.loads((org / "organism.json").read_text())["timing_s"].values()), 1
        ),
    }
    summary["headline"] = headline(summary)
    atomic_write_json(out / "summary.json", summary)
    t0 = time.perf_counter()
    say("report")
    write_report(out)
    summary["timing_s"]["report"] = round(time.perf_counter() - t0, 2)
    atomic_write_json(out / "summary.json", summary)
    return summary


def _parallel_done(out: Path) -> dict[str, Path]:
    return {
        "steering": out / "diff" / "steering.json",
        "export": out / "exports" / "manifest.json",
        "analyses": out / "analyses.json",
    }


def _parallel_steps(out: str, seed: int) -> None:
    """The demo's second process: the steering checks, the export and the open-question analyses
    (each skipped when done), one thread, no progress bars; its log and any error go to
    ``out/parallel.log``, its step times to ``out/parallel_timing.json``."""
    import logging
    import os
    import time
    import traceback

    import torch

    from saediff.stories.organism.analyses import run_analyses

    os.environ["TQDM_DISABLE"] = "1"
    torch.set_num_threads(1)
    out_p = Path(out)
    logging.basicConfig(filename=out_p / "parallel.log", level=logging.INFO, format="%(message)s", force=True)
    run = {
        "steering": lambda: run_steer_check(out_p / "diff", out_p / "organism", seed=seed),
        "export": lambda: _export(out_p),
        "analyses": lambda: run_analyses(out_p, seed=seed),
    }
    timing = {}
    try:
        for name, done in _parallel_done(out_p).items():
            if not done.exists():
                t0 = time.perf_counter()
                run[name]()
                timing[name] = round(time.perf_counter() - t0, 2)
    except BaseException:
        logging.getLogger(__name__).error(traceback.format_exc())
        raise
    atomic_write_json(out_p / "parallel_timing.json", timing)


def _export(out: Path) -> None:
    """The demo's export: the top-3 latents, every dense candidate and the LoRA directions, each
    with the scale its steering check chose and its verdict against the null."""
    from saediff.methods.export import export_directions, validated_scales

    dirs = load_directions(out / "diff" / "directions")
    lora = load_directions(out / "diff_lora" / "directions")
    top = read_run(out / "diff")["steps"]["diff"]["top_latents"][:3]
    chosen = [dirs[f"sae_{i}"] for i in top] + [
        d
        for d in dirs.values()
        if d.method in ("mean_diff_models", "mean_diff_responses", "in_context", "ground_truth")
    ]
    chosen += [d for n, d in lora.items() if d.method in ("lora_b", "lora_downstream")]
    per = validated_scales(out / "diff")  # the steering check's scale, EM and verdict against the null
    export_directions(chosen, out / "exports", model=str(out / "organism" / "aligned"), per_direction=per)


def _check_demo_config(out: Path, config: dict) -> None:
    """Record the demo's configuration in ``demo.json``; a folder holding another seed or size is
    refused rather than mixed into (its finished steps would be skipped as if they matched)."""
    config = json.loads(json.dumps(config))  # tuples as JSON lists, as read back
    path = out / "demo.json"
    if path.exists():
        old = json.loads(path.read_text())
        differs = [k for k in ("seed", "quick", "organism") if old.get(k) != config[k]]
        if differs:
            raise SaediffError(
                f"{out} holds a demo with another {', '.join(differs)} "
                f"(seed {old.get('seed')}, quick {old.get('quick')}): choose another --out"
            )
        return
    built = out / "organism" / "organism.json"
    if built.exists():  # an organism placed there before the first demo run: its recipe must match
        recorded = json.loads(built.read_text()).get("config")
        if recorded != config["organism"]:
            raise SaediffError(
                f"{built} was built with another configuration than seed {config['seed']}, "
                f"quick {config['quick']}: choose another --out"
            )
    atomic_write_json(path, config)


def run_demo_seeds(out: str | Path, seeds: list[int], *, quick: bool = True, progress=None) -> dict:
    """``saediff demo --seeds 0,1,2``: one demo per seed under ``out/seed_N`` and ``out/seeds.json``
    with each seed's headline side by side (figure, interval, holds and the verdict where the row has
    one; and the report of each run)."""
    out = Path(out)
    per = {}
    for seed in seeds:
        say = (lambda s, seed=seed: progress(f"seed {seed}: {s}")) if progress else None
        per[str(seed)] = run_demo(out / f"seed_{seed}", quick=quick, seed=seed, progress=say)
    rows = []
    for i, row in enumerate(next(iter(per.values()))["headline"]):
        # the verdict (holds / fails / inconclusive) where a row reads its bar off an interval
        cells = {
            k: {key: s["headline"][i].get(key) for key in ("figure", "ci", "holds", "verdict")}
            for k, s in per.items()
        }
        figures = [c["figure"] for c in cells.values()]
        numeric = all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in figures)
        # the mean over seeds, which several of the bars are stated on
        rows.append(
            {
                "phenomenon": row["phenomenon"],
                "bar": row["bar"],
                "per_seed": cells,
                "mean": round(sum(figures) / len(figures), 4) if numeric else None,
            }
        )
    result = {"kind": "saediff.demo_seeds", "seeds": seeds, "headline": rows}
    atomic_write_json(out / "seeds.json", result)
    return result
