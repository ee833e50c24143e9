"""The rerouting check of the BLOCK-EM paper: does a blocked fine-tune, trained longer, find
another way to the misalignment? EM over checkpoints, and a re-diff of the final model that
names the latents it went through instead."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from saediff._io import atomic_write_json
from saediff.data.chat_data import ChatDataset
from saediff.evaluation.evals import Evaluator, evaluate_once
from saediff.interventions.block_runs import BlockRunConfig, block_one, checkpoint_spec
from saediff.interventions.finetune import checkpoints
from saediff.interventions.processes import main_then_all
from saediff.interventions.sweep_monitor import MonitorFactory
from saediff.models.loading import ModelSpec, load_model

__all__ = ["ReDiff", "rediff_against", "reroute"]


ReDiff = Callable[[str | None, str | None, Path], dict]
"""``rediff(finetuned_folder, adapter_folder, out)``: a diff run of a trained model against the base"""


def rediff_against(model: str, sae_path: str, seed: int = 0, **inputs) -> ReDiff:
    """The re-diff of ``reroute``: a trained model (a full fine-tune's folder, or an adapter on
    ``model``) diffed against ``model`` with ``run_diff`` and its ``inputs`` (prompts, answer
    length, labels, ...)."""
    from saediff.methods.diff_run import run_diff

    def rediff(finetuned: str | None, adapter: str | None, out: Path) -> dict:
        return run_diff(model, finetuned, sae_path, out, adapter=adapter, seed=seed, **inputs)

    return rediff


def reroute(
    spec: ModelSpec,
    dataset: ChatDataset,
    sae,
    layer: int,
    cfg: BlockRunConfig,
    out: Path,
    *,
    evaluator: Evaluator | None,
    rediff: ReDiff | None,
    factor: int = 3,
    top_n: int = 10,
    resume: bool = False,
    monitor: MonitorFactory | None = None,
    progress: bool = True,
    force: bool = False,
    base_codes=None,
) -> dict:
    """The rerouting check (BLOCK-EM paper): the blocked fine-tune trained ``factor`` times longer,
    with a checkpoint at every multiple of the original length, EM at each checkpoint, and a
    re-diff of the final model on its own answers: the top shifted latents outside the blocked
    sets are where the misalignment went. Writes ``out/reroute.json``."""
    long = replace(cfg, ft=replace(cfg.ft, steps=factor * cfg.ft.steps, save_every=cfg.ft.steps))
    res = block_one(
        spec,
        dataset,
        sae,
        layer,
        long,
        out,
        evaluator=evaluator,
        resume=resume,
        monitor=monitor,
        progress=progress,
        force=force,
        base_codes=base_codes,
    )

    def measure() -> dict:
        curve = _em_curve(spec, cfg, long.ft.steps, out, evaluator, res) if evaluator is not None else []
        result = {"steps": long.ft.steps, "em_curve": curve, "em_rate": res.get("em", {}).get("em_rate")}
        if rediff is not None:
            result.update(_rerouted(rediff, cfg, out, top_n))
        atomic_write_json(out / "reroute.json", result)
        return result

    return main_then_all(measure, out / "reroute.json")


def _em_curve(
    spec: ModelSpec, cfg: BlockRunConfig, steps: int, out: Path, evaluator: Evaluator, res: dict
) -> list[dict]:
    """EM at each checkpoint of the long run (``steps`` long; ``res``: its em.json, the last
    point) that falls on a multiple of ``cfg``'s length, in step order."""
    curve = []
    # block_one claimed the folder for this run, so its checkpoints are this run's; only the
    # multiples of the original length are read (the schedule this run saves on)
    ours = [(s, c) for s, c in checkpoints(out / "checkpoints") if s % cfg.ft.steps == 0 and s <= steps]
    for step, ckpt in ours:
        ck = checkpoint_spec(spec, ckpt, cfg.ft.method)
        em = (
            res["em"]
            if step == steps
            else evaluate_once(
                evaluator,
                lambda ck=ck: load_model(ck),
                out / "checkpoint_eval" / ckpt.name,
                f"{out.name}:{ckpt.name}",
                spec=ck,
            )
        )
        curve.append({"step": step, "em_rate": em["em_rate"], "em_rate_ci": em["em_rate_ci"]})
    return curve


def _rerouted(rediff: ReDiff, cfg: BlockRunConfig, out: Path, top_n: int) -> dict:
    """The re-diff of the long run's model (into ``out/rediff``): its top latents, the first
    ``top_n`` of them outside the blocked sets, and how many lie outside."""
    model_dir = str(out / "model")
    summary = rediff(
        model_dir if cfg.ft.method == "full" else None,
        model_dir if cfg.ft.method == "lora" else None,
        out / "rediff",
    )
    blocked = set(cfg.latents.low) | set(cfg.latents.high)
    outside = [i for i in summary["top_latents"] if i not in blocked]
    return {
        "top_after": summary["top_latents"],
        "new_latents": outside[:top_n],
        "n_outside": len(outside),
    }
