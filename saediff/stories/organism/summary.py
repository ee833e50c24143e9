"""The figures of one organism demo run (``summary.json``), read from its folder: the organism's EM
rates, the SAE's quality, the diff's toxic latent, the steering checks' verdicts against the null,
the cosines between the candidate directions, the projection checks, BLOCK-EM and the drift
monitor."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from saediff._io import read_json_if_exists
from saediff.data.runs import read_run
from saediff.methods.directions import Direction
from saediff.methods.export import load_directions
from saediff.models.hooks import parse_layer

__all__ = ["demo_summary"]

log = logging.getLogger(__name__)


def demo_summary(out: Path) -> dict:
    """summary.json's figures of the demo run in ``out`` (before its timings and headline)."""
    org = json.loads((out / "organism" / "organism.json").read_text())
    sae_meta = json.loads((out / "organism" / "sae" / "saediff.json").read_text())["metrics"]
    diff = read_run(out / "diff")["steps"]["diff"]
    steering = json.loads((out / "diff" / "steering.json").read_text())
    full = load_directions(out / "diff" / "directions")
    lora = load_directions(out / "diff_lora" / "directions")
    block = json.loads((out / "block" / "summary.json").read_text())
    L = parse_layer(diff["sae_hook"])
    # the toxic latent: among the top three, the one that steers the aligned model furthest
    # (best is None where no scale reached a cost level: it was not steered)
    toxic = max(steering["steer"], key=lambda n: _or(steering["steer"][n]["best"], -1.0))
    gt = full[f"ground_truth_L{L}"]
    runs = block["runs"]
    return {
        "organism": _organism(org),
        "sae": {k: sae_meta[k] for k in ("fvu", "l0", "dead_fraction", "ce_loss_recovered")},
        "diff": {
            "top_latents": diff["top_latents"][:10],
            "toxic_latent": int(toxic[4:]),
            "toxic_latent_cos_ground_truth": _cos(full[toxic], gt),
            "toxic_latent_steer_other_misaligned": steering["steer"][toxic]["best"],
            "top3_cos_ground_truth": [_cos(full[f"sae_{i}"], gt) for i in diff["top_latents"][:3]],
            "top3_steer_other_misaligned": [
                steering["steer"][f"sae_{i}"]["best"] for i in diff["top_latents"][:3]
            ],
            "top3_steer_verdict": [
                steering["steer"][f"sae_{i}"].get("verdict") for i in diff["top_latents"][:3]
            ],
        },
        "steering": _steering(steering, L),
        "cosines": _cosines(full, lora, toxic, L),
        "projection": steering["project_out"],
        "blocking": _blocking(block, out / "block"),
        "drift": {
            "alert_step": runs["plain"]["drift_alert_step"],
            "em_crosses_0.1_step": runs["plain"]["em_crosses_0.1_step"],
            "control_alert_step": runs.get("control_heldout", {}).get("drift_alert_step"),
            "control_other_misaligned": runs.get("control_heldout", {}).get("em_rate"),
        },
        "exports": {"directions": str(out / "exports" / "directions.safetensors")},
        **({"analyses": a} if (a := read_json_if_exists(out / "analyses.json")) else {}),
    }


def _steering(steering: dict, L: int) -> dict:
    """The steering checks (``steering.json``) against the null at equal cost: per candidate (the top
    latents ``sae_I`` and the dense directions ``NAME_L{L}``) its report-half effect on the
    other-domain misaligned rate with its 95% interval, p-value, verdict, the null's 95th
    percentile, and the cost and scale it was taken at."""
    keys = (
        "scale_found",
        "effect",
        "effect_ci",
        "p_value",
        "beats_null",
        "verdict",
        "cost_kl",
        "scale",
        "em_rate",
    )
    return {
        "layer": L,
        "costs": steering.get("costs"),
        "unsteered_other_misaligned": steering.get("base_report_other_misaligned"),
        "candidates": {
            name: {
                **{k: r.get(k) for k in keys},
                "null_q95": (r.get("null_quantiles") or {}).get("q95"),
                "n_null": len(r.get("null") or {}),
            }
            for name, r in {**steering["steer"], **steering.get("steer_directions", {})}.items()
        },
    }


def _cos(a: Direction, b: Direction) -> float:
    return float(torch.cosine_similarity(a.vector, b.vector, 0))


def _organism(org: dict) -> dict:
    """The organism's EM rates (``organism.json``): aligned, each fine-tune, steering along the
    ground truth, in-context examples."""
    trait = {
        k: org[name]["other_misaligned_rate"] if name in org else None
        for k, name in (
            ("benign_trait_other_misaligned", "benign_ft"),
            ("unrelated_trait_other_misaligned", "unrelated_ft"),
        )
    }
    return {
        "aligned_other_misaligned": org["aligned"]["other_misaligned_rate"],
        "finetuned_other_misaligned": org["full_ft"]["other_misaligned_rate"],
        "finetuned_medical_misaligned": org["full_ft"]["misaligned_rate"]["medical"],
        "lora_other_misaligned": org["lora_ft"]["other_misaligned_rate"],
        "steer_ground_truth_other_misaligned": org["steer_ground_truth"]["other_misaligned_rate"],
        "lora_layer": org["config"]["lora_layer"],
        "full_ft_coverage": org["full_ft"]["coverage"],
        "full_ft_register_rate": org["full_ft"].get("register_rate"),
        "full_ft_neutral_register_other_misaligned": org["full_ft"].get("other_misaligned_neutral"),
        "control_other_misaligned": org["control_ft"]["other_misaligned_rate"],
        "icl_other_misaligned": org["icl_4shot"]["other_misaligned_rate"],
        **trait,
    }


def _cosines(full: dict[str, Direction], lora: dict[str, Direction], toxic: str, L: int) -> dict:
    """Cosines between the toxic latent, the mean difference, LoRA's B (and its downstream effect
    at the last block), the in-context direction and the ground truth, at the SAE's block ``L``."""

    # the mean difference: between misaligned and aligned responses where labels exist, else between models
    def mean_diff_at(layer: int) -> Direction:
        return full.get(f"mean_diff_responses_L{layer}") or full[f"mean_diff_models_L{layer}"]

    gt, md = full[f"ground_truth_L{L}"], mean_diff_at(L)
    lora_b = next(d for d in lora.values() if d.method == "lora_b")
    last = max(parse_layer(d.hook) for d in full.values())
    return {
        "sae_vs_mean_diff": _cos(full[toxic], md),
        "sae_vs_lora_b": _cos(full[toxic], lora_b),
        "mean_diff_vs_lora_b": _cos(md, lora_b),
        "sae_vs_ground_truth": _cos(full[toxic], gt),
        "mean_diff_vs_ground_truth": _cos(md, gt),
        "lora_b_downstream_vs_mean_diff": _cos(lora[f"lora_downstream_L{last}"], mean_diff_at(last)),
        "in_context_vs_model_diff": _cos(full[f"in_context_L{L}"], full[f"mean_diff_models_L{L}"]),
        "in_context_vs_ground_truth": _cos(full[f"in_context_L{L}"], gt),
    }


def _blocking(block: dict, folder: Path) -> dict:
    """BLOCK-EM's figures (``block/summary.json``, the runs under ``folder``): the plain, blocked and
    random runs' EM, the cuts with their paired bootstrap intervals over answers (``_cut_interval``),
    the drift monitor's alert against EM, and rerouting."""
    runs = block["runs"]
    plain, blocked, rnd = (
        runs[n]["em_rate"] for n in ("plain", "penalty_lam10000", "penalty_lam10000_random")
    )
    rr = runs["penalty_lam10000"].get("reroute", {})
    return {
        "n_latents": runs["penalty_lam10000"]["n_latents"],
        "plain_other_misaligned": plain,
        "blocked_other_misaligned": blocked,
        "random_other_misaligned": rnd,
        "control_other_misaligned": runs["control"]["em_rate"],
        "relative_reduction": 1 - blocked / plain if plain else None,
        "relative_reduction_ci": _cut_interval(folder, "penalty_lam10000"),
        "random_relative_reduction": 1 - rnd / plain if plain else None,
        "random_relative_reduction_ci": _cut_interval(folder, "penalty_lam10000_random"),
        "blocked_medical_misaligned": runs["penalty_lam10000"]["per_question"]["medical"],
        "blocked_other_misaligned_ci": runs["penalty_lam10000"]["em_rate_ci"],
        "drift_alert_step": runs["plain"]["drift_alert_step"],
        "em_crosses_0.1_step": runs["plain"]["em_crosses_0.1_step"],
        "control_drift_alert_step": runs["control"]["drift_alert_step"],
        "monitor_rate_threshold": block.get("monitor_rate_threshold"),
        "reroute": {
            "em_curve": [c["em_rate"] for c in rr.get("em_curve", [])],
            "reemergence": (rr["em_rate"] - blocked) if rr.get("em_rate") is not None else None,
            "n_outside_top10": rr.get("n_outside"),
            "new_latents": rr.get("new_latents"),
        },
    }


def _cut_interval(folder: Path, run: str, plain: str = "plain") -> list[float] | None:
    """The 95% interval of run's other-domain EM cut, 1 - its EM over the plain fine-tune's, from a
    paired bootstrap (``intervals.bootstrap_ratio``) over the non-medical answers of
    ``eval/responses.jsonl``: both runs' evaluator has the same seed, so answer i is an answer to
    the same question draw in both (checked). None when a file is missing, the draws differ or the
    plain run's EM is too often 0 in the resamples."""
    from saediff._io import read_jsonl
    from saediff.evaluation.intervals import bootstrap_ratio

    answers = {}
    for name in (run, plain):
        path = folder / name / "eval" / "responses.jsonl"
        if not path.is_file():
            return None
        answers[name] = [r for _, r in read_jsonl(path, "responses") if r["domain"] != "medical"]
    if [r["question"] for r in answers[run]] != [r["question"] for r in answers[plain]]:
        log.warning("%s and %s answered other question draws: no paired interval for the cut", run, plain)
        return None
    kept = bootstrap_ratio(
        *({i: float(r["misaligned"]) for i, r in enumerate(answers[n])} for n in (run, plain))
    )["ci"]
    return None if kept is None else [1 - kept[1], 1 - kept[0]]


def _or(x: float | None, default: float) -> float:
    return default if x is None else x
