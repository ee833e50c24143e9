"""BLOCK-EM on any Hugging Face causal LM: fine-tune on narrow chat data while chosen SAE latents
are held where the base model has them, with the controls and an EM evaluation of every run.

    saediff block --model Qwen/Qwen2.5-7B-Instruct --data bad_medical.jsonl --sae RUN_SAE \\
        --diff-run runs/diff --lora-rank 1 --lora-layers 21 --lam 1e3 --lam 1e4 --controls \\
        --judge-url URL --judge-model NAME --out runs/block

One folder per run under ``out`` (``plain``, ``penalty_lam1000``, ``penalty_lam1000_random``, ...),
each with ``model/`` (a PEFT adapter or a full HF folder), ``checkpoints/``, ``history.json``
(loss and penalty per step), ``eval/`` and ``em.json``; ``out/summary.json`` compares them.
A finished run (its ``em.json`` written under the same settings) is skipped on rerun; an
interrupted one continues from its newest checkpoint with ``resume=True``.

This module is the sweep; its parts live beside it: ``latent_sets`` (which latents),
``block_directions`` (which directions, and their random controls), ``block_runs`` (one run),
``rerouting`` (the longer runs and their re-diff), ``sweep_monitor`` (the drift monitor).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch

from saediff._io import atomic_write_json
from saediff.data.chat_data import ChatDataset, load_chat_jsonl
from saediff.errors import SaediffError
from saediff.evaluation.evals import Evaluator
from saediff.interventions.block_directions import norm_matched_random, random_directions
from saediff.interventions.block_runs import BlockRunConfig, block_one
from saediff.interventions.blocking import check_adapters_reach
from saediff.interventions.finetune import FinetuneConfig, make_trainable
from saediff.interventions.latent_sets import LatentSets, random_latents
from saediff.interventions.monitor import calibrate_rate, calibrate_rates
from saediff.interventions.processes import is_main_process, main_then_all
from saediff.interventions.rerouting import ReDiff, reroute
from saediff.interventions.sweep_monitor import MonitorFactory, monitor_report
from saediff.models.hooks import decoder_layers
from saediff.models.loading import ModelSpec, load_model

__all__ = ["base_codes_for", "run_block_em", "sweep_plan"]


def base_codes_for(
    spec: ModelSpec,
    dataset: ChatDataset,
    sae,
    layer: int,
    ft: FinetuneConfig,
    runs: list[BlockRunConfig],
    folder: str | Path,
    *,
    progress: bool = True,
):
    """The base codes every penalty run of ``runs`` needs (the union of their latents), computed
    once from ``spec``'s model as ``ft`` starts training (a full fine-tune's float32 masters, a
    LoRA's adapter disabled) under its mixed precision, or read back from ``folder/<digest>/``
    when made with the same model, data, SAE, block and settings. None when no run is a penalty
    run. Under ``accelerate launch`` the main process computes and the others read its folder."""
    from saediff.interventions.base_codes import BaseCodes
    from saediff.models.provenance import digest

    penalty = [c for c in runs if c.mode == "penalty"]
    if not penalty:
        return None
    if len({c.preactivation for c in penalty}) > 1:
        raise SaediffError("base codes: the sweep's penalty runs mix pre-activation and encoded codes")
    latents = sorted({i for c in penalty for i in (*c.latents.low, *c.latents.high)})
    preact = penalty[0].preactivation
    fp = _base_codes_fingerprint(spec, dataset, sae, layer, ft)
    full_fp = {**fp, "latents": latents, "preactivation": preact}
    where = Path(folder) / digest(full_fp)
    found = BaseCodes.load(where, dataset, full_fp)
    if found is not None:
        return found
    meta = main_then_all(
        lambda: _build_base_codes(spec, ft, dataset, sae, layer, latents, where, fp, preact, progress),
        where / "base_codes.json",
    )
    found = BaseCodes.load(where, dataset, meta["fingerprint"])
    if found is None:
        raise SaediffError(
            f"base codes at {where}: written but not readable back (another process changed it?)"
        )
    return found


def _base_codes_fingerprint(
    spec: ModelSpec, dataset: ChatDataset, sae, layer: int, ft: FinetuneConfig
) -> dict:
    """What base codes depend on besides their latents: the model, its dtype and device, the
    fine-tune's method and precision, the data, the SAE's weights and its block."""
    from saediff.models.provenance import model_fingerprint, sae_fingerprint

    return {
        "model": model_fingerprint(spec),
        "dtype": spec.dtype,
        "device": spec.device,
        "method": ft.method,
        "precision": ft.precision if ft.precision != "auto" else spec.resolved_precision(),
        "data": dataset.fingerprint(),
        "n_rows": len(dataset),
        "sae": sae_fingerprint(sae)["weights"],
        "layer": layer,
    }


def _build_base_codes(
    spec: ModelSpec,
    ft: FinetuneConfig,
    dataset: ChatDataset,
    sae,
    layer: int,
    latents: list[int],
    where: Path,
    fp: dict,
    preact: bool,
    progress: bool,
) -> dict:
    """Base codes computed into ``where`` from ``spec``'s model made trainable as ``ft`` makes it,
    under its mixed precision; base_codes.json's fingerprint."""
    from saediff.interventions.base_codes import BaseCodes
    from saediff.interventions.finetune import finetune_precision
    from saediff.models.precision import set_precision

    lm = load_model(spec)
    model = make_trainable(lm.model, ft)
    mixed = finetune_precision(ft, model, next(model.parameters()).device)
    set_precision(model, mixed)  # the loaded model's own autocast must not override the fine-tune's
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed)
    codes = BaseCodes.build(
        model,
        dataset,
        sae,
        layer,
        latents,
        where,
        fingerprint=fp,
        preactivation=preact,
        autocast=autocast,
        progress=progress,
    )
    return {"fingerprint": codes.fingerprint}


@dataclass
class _Sweep:
    """What every run of one sweep shares; ``run`` trains one of them into ``out/NAME``.
    ``base_codes`` is set once the sweep has them (the controls before it run without)."""

    spec: ModelSpec
    sae: object
    layer: int
    out: Path
    evaluator: Evaluator | None
    resume: bool
    monitor: MonitorFactory | None
    progress: bool
    force: bool
    base_codes: object = None

    def run(self, name: str, dataset: ChatDataset, cfg: BlockRunConfig) -> dict:
        return block_one(
            self.spec,
            dataset,
            self.sae,
            self.layer,
            cfg,
            self.out / name,
            evaluator=self.evaluator,
            resume=self.resume,
            monitor=self.monitor,
            progress=self.progress,
            force=self.force,
            base_codes=self.base_codes,
        )


# long by its 21 options, each documented below; the body is the sweep's order of runs
def run_block_em(
    model: str | ModelSpec,
    data: str | Path,
    sae,
    out: str | Path,
    latents: LatentSets,
    *,
    ft: FinetuneConfig = FinetuneConfig(),
    lams: tuple[float, ...] = (1e4,),
    controls: bool = True,
    evaluator: Evaluator | None = None,
    resume: bool = False,
    seed: int = 0,
    sae_path: str = "",
    monitor: MonitorFactory | None = None,
    control_data: str | Path | None = None,
    reroute_factor: int | None = None,
    rediff: ReDiff | None = None,
    reblock: bool = False,
    heldout_control_data: str | Path | None = None,
    benign_control_data: str | Path | None = None,
    progress: bool = True,
    force: bool = False,
    mode: Literal["penalty", "ablate", "project", "steer"] = "penalty",
    directions: dict[int, torch.Tensor] | None = None,
    base_codes: bool = True,
) -> dict:
    """The BLOCK-EM sweep: for each lambda a blocked run (and with ``controls`` one with as many
    random latents), plus the plain fine-tune; writes and returns ``out/summary.json`` with each
    run's EM rate, its interval and the relative reduction against the plain fine-tune.

    ``base_codes``: the base model's codes of every run's latents are computed once per row
    (``out/base_codes/``, ``saediff.interventions.base_codes``) and read by every penalty run, instead of a
    base pass per training step (the same weights to float rounding; False: the per-step pass).

    ``mode="ablate"``: one run with the ``latents.low`` removed from the residual in the forward
    pass instead (and as many random latents); ``mode="project"``: one run with ``directions``
    ({block: (k, d)}) projected out after their blocks, concept ablation fine-tuning (and as many
    random directions per block); ``sae`` may then be None. ``mode="steer"``: one run with
    ``directions`` added after their blocks while it trains (preventative steering; the saved model
    is evaluated without them), beside as many random directions of the same norms.

    ``control_data``: aligned answers to the same narrow questions. The same recipe on them runs
    first (``control``: fine-tuning as such should not cause EM), and with a ``monitor`` its
    drift history calibrates the monitor's rate thresholds (per check step) for every later run.
    ``heldout_control_data``: other aligned answers; the same recipe on them (``control_heldout``)
    runs under the calibrated monitor, so its alert step is a real false-alarm check.
    ``benign_control_data``: a *different* benign fine-tune (data that neither persona favours, not
    drawn like the calibration control's); ``control_benign`` runs under the calibrated monitor
    too: a false alarm there is one the calibration's own distribution could not reveal.
    With a monitor, ``summary.json`` has ``monitor``: per monitored run its alert step and whether
    EM after training exceeded 0.1, and the alerts' precision and recall (``monitor_report``).

    ``reroute_factor`` (e.g. 3): each blocked run is also trained that many times longer
    (``NAME_reroute``: EM over checkpoints, re-diff with ``rediff``); ``reblock`` then adds the
    latents that rose outside the blocked sets to the held-down set and trains as long again
    (``NAME_reblock``).

    ``sae``: a loaded SAELens SAE at one of the model's residual hooks (``blocks.L.hook_resid_post``).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = model if isinstance(model, ModelSpec) else ModelSpec(model)
    rows = load_chat_jsonl(data)
    probe = load_model(spec)
    layer = _check_sweep(probe.model, sae, sae_path, latents, ft, mode, directions)
    tokenizer = probe.tokenizer
    del probe
    for p in sae.parameters() if sae is not None else []:
        p.requires_grad_(False)

    def chats(path) -> ChatDataset:
        rows_ = rows if path == data else load_chat_jsonl(path)
        return ChatDataset(tokenizer, rows_, ft.max_length, progress=progress, source=str(path))

    sweep = _Sweep(spec, sae, layer, out, evaluator, resume, monitor, progress, force)
    runs = _control_runs(sweep, chats, ft, control_data, heldout_control_data, benign_control_data)
    dataset = chats(data)
    plan = sweep_plan(
        ft, mode, latents, lams, directions, controls, sae.cfg.d_sae if sae is not None else 0, seed
    )
    if base_codes and mode == "penalty":  # one base pass over the data for every run (read back on a rerun)
        sweep.base_codes = base_codes_for(
            spec, dataset, sae, layer, ft, list(plan.values()), out / "base_codes", progress=progress
        )
    for name, cfg in plan.items():
        runs[name] = sweep.run(name, dataset, cfg)
    if reroute_factor:
        _reroute_runs(sweep, runs, plan, dataset, reroute_factor, rediff, reblock)
    summary = _summary(runs, spec, str(data), sae_path, layer)
    if monitor is not None:
        summary["monitor_rate_threshold"] = monitor.rate_threshold
        summary["monitor_rate_thresholds"] = monitor.rate_thresholds
    if is_main_process():
        atomic_write_json(out / "summary.json", summary)
    return summary


def _control_runs(
    sweep: _Sweep,
    chats: Callable[[str | Path], ChatDataset],
    ft: FinetuneConfig,
    control_data: str | Path | None,
    heldout_control_data: str | Path | None,
    benign_control_data: str | Path | None,
) -> dict[str, dict]:
    """The plain fine-tunes on aligned data that run before the sweep, by name: ``control`` (its
    drift history then calibrates the sweep's monitor), ``control_heldout``, ``control_benign``."""
    runs: dict[str, dict] = {}
    if control_data is not None:
        runs["control"] = sweep.run("control", chats(control_data), BlockRunConfig(ft=ft, mode="none"))
        if sweep.monitor is not None:
            drift = json.loads((sweep.out / "control" / "history.json").read_text())["drift"]
            sweep.monitor.rate_threshold = calibrate_rate(drift)
            sweep.monitor.rate_thresholds = calibrate_rates(drift)
            runs["control"]["drift_alert_step"] = None  # below its own calibrated threshold by construction
    for name, path in (("control_heldout", heldout_control_data), ("control_benign", benign_control_data)):
        if path is not None:
            runs[name] = sweep.run(name, chats(path), BlockRunConfig(ft=ft, mode="none"))
    return runs


def _reroute_runs(
    sweep: _Sweep,
    runs: dict[str, dict],
    plan: dict[str, BlockRunConfig],
    dataset: ChatDataset,
    factor: int,
    rediff: ReDiff | None,
    reblock: bool,
) -> None:
    """Each blocked run of ``plan`` trained ``factor`` times longer (``NAME_reroute``, its result
    under ``runs[NAME]["reroute"]``); with ``reblock`` a penalty run whose re-diff found latents
    outside its sets trains as long again with them held down too (``runs[NAME_reblock]``)."""
    blocked = [(n, c) for n, c in plan.items() if n != "plain" and not n.endswith("_random")]
    for name, cfg in blocked:
        rr = reroute(
            sweep.spec,
            dataset,
            sweep.sae,
            sweep.layer,
            cfg,
            sweep.out / f"{name}_reroute",
            evaluator=sweep.evaluator,
            rediff=rediff,
            base_codes=sweep.base_codes,
            factor=factor,
            resume=sweep.resume,
            progress=sweep.progress,
            force=sweep.force,
        )
        runs[name]["reroute"] = rr
        if reblock and rr.get("new_latents") and cfg.mode == "penalty":
            low = (*cfg.latents.low, *[i for i in rr["new_latents"] if i not in cfg.latents.high])
            runs[f"{name}_reblock"] = sweep.run(
                f"{name}_reblock",
                dataset,
                replace(
                    cfg,
                    latents=LatentSets(low, cfg.latents.high),
                    ft=replace(cfg.ft, steps=factor * cfg.ft.steps),
                ),
            )


def _check_sweep(
    model: torch.nn.Module,
    sae,
    sae_path: str,
    latents: LatentSets,
    ft: FinetuneConfig,
    mode: str,
    directions: dict[int, torch.Tensor] | None,
) -> int:
    """The block the sweep works at, after refusing what cannot work: an SAE that does not fit the
    model, latents outside it or of another SAE, directions outside the model, a penalty whose
    adapters all sit after the SAE's block, ``freeze_after_block`` beyond the model."""
    from saediff.saes.loading import check_sae_fits

    n_blocks = len(decoder_layers(model))
    if mode in ("project", "steer"):
        if not directions:
            raise SaediffError(f"BLOCK-EM mode {mode} needs directions ({{block: (k, d)}})")
        if any(not 0 <= L < n_blocks for L in directions):
            raise SaediffError(
                f"{mode} directions at blocks {sorted(directions)}: the model has blocks 0-{n_blocks - 1}"
            )
        layer = check_sae_fits(sae, model, sae_path or "given") if sae is not None else max(directions)
    else:
        layer = check_sae_fits(sae, model, sae_path or "given")
        latents.check(sae, sae_path or "the given SAE")
        if not len(latents):
            raise SaediffError("BLOCK-EM needs latents: --diff-run, --latents FILE or --latent I")
    if mode == "penalty" and ft.method == "lora" and ft.lora_layers:  # before any run trains: else plain runs
        check_adapters_reach(min(ft.lora_layers), layer)
    if ft.freeze_after_block is not None and ft.freeze_after_block >= n_blocks:
        raise SaediffError(f"freeze_after_block {ft.freeze_after_block} beyond the model's blocks")
    return layer


def sweep_plan(
    ft: FinetuneConfig,
    mode: str,
    latents: LatentSets,
    lams: tuple[float, ...],
    directions: dict[int, torch.Tensor] | None,
    controls: bool,
    d_sae: int,
    seed: int,
) -> dict[str, BlockRunConfig]:
    """The runs of a sweep by name: with ``controls`` the plain fine-tune first; then per lambda a
    penalty run (``penalty_lam1e+04``), or one ``ablate`` or ``project`` run, each with its random
    control (``..._random``: as many random latents, or random directions of the same shapes)."""
    plan: dict[str, BlockRunConfig] = {"plain": BlockRunConfig(ft=ft, mode="none")} if controls else {}
    if mode == "project":
        plan["project"] = BlockRunConfig(ft=ft, mode="project", directions=directions)
        if controls:
            plan["project_random"] = BlockRunConfig(
                ft=ft, mode="project", directions=random_directions(directions, seed)
            )
    elif mode == "steer":
        plan["steer"] = BlockRunConfig(ft=ft, mode="steer", directions=directions)
        if controls:
            plan["steer_random"] = BlockRunConfig(
                ft=ft, mode="steer", directions=norm_matched_random(directions, seed)
            )
    elif mode == "ablate":
        plan["ablate"] = BlockRunConfig(ft=ft, mode="ablate", latents=latents)
        if controls:
            plan["ablate_random"] = BlockRunConfig(
                ft=ft, mode="ablate", latents=random_latents(latents, d_sae, seed)
            )
    else:
        for lam in lams:
            plan[f"penalty_lam{lam:g}"] = BlockRunConfig(ft=ft, latents=latents, lam=lam)
            if controls:
                plan[f"penalty_lam{lam:g}_random"] = BlockRunConfig(
                    ft=ft, latents=random_latents(latents, d_sae, seed), lam=lam
                )
    return plan


def _summary(runs: dict[str, dict], spec: ModelSpec, data: str, sae_path: str, layer: int) -> dict:
    plain = runs.get("plain", {}).get("em", {}).get("em_rate")
    table = {}
    for name, r in runs.items():
        em = r.get("em", {})
        rate = em.get("em_rate")
        table[name] = {
            "em_rate": rate,
            "em_rate_ci": em.get("em_rate_ci"),
            "coherent_rate": em.get("coherent_rate"),
            "per_question": em.get("per_question"),
            "penalty_first": r["penalty_first"],
            "penalty_last": r["penalty_last"],
            "final_loss": r["final_loss"],
            "relative_reduction": (1 - rate / plain)
            if plain and rate is not None and not name.startswith("control")
            else None,
            "n_latents": len(r["latents_low"]) + len(r["latents_high"]),
            "mode": r["mode"],
            "drift_alert_step": r.get("drift_alert_step"),
            "em_crosses_0.1_step": r.get("em_crosses_0.1_step"),
            "drift_versus_random": r.get("drift_versus_random"),
            **({"reroute": r["reroute"]} if "reroute" in r else {}),
        }
    summary = {
        "kind": "saediff.block_summary",
        "model": spec.model,
        "data": data,
        "sae": sae_path,
        "layer": layer,
        "runs": table,
    }
    if any("drift_alert_step" in r for r in runs.values()):
        summary["monitor"] = monitor_report(runs)
    return summary
