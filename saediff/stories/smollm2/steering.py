"""Steering by the pair metric: saediff's one steering protocol
(``steer_protocol.select_and_report``) on the base model along the diff's candidates, the scale
chosen on half of the design split, every reported figure on the held-out split beside random
directions of equal norm; then the same candidates projected out of (or clamped in) the fine-tune."""

from __future__ import annotations

import json
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from saediff._io import atomic_write_json, read_json_if_exists
from saediff.errors import SaediffError
from saediff.stories.smollm2.finetunes import full_bad_spec
from saediff.stories.smollm2.recipe import ChatDemoRecipe

__all__ = ["project_by_pairs", "steer_by_pairs", "steer_step"]


# long: its signature and docstring; the code itself is 40 lines
def steer_by_pairs(
    base,
    run_dir: Path,
    select,
    report,
    out: Path,
    *,
    n_latents: int,
    scales: tuple[float, ...],
    n_random: int,
    seed: int,
    coherence_budget: float = 0.10,
    finetuned=None,
) -> dict:
    """Steer the base model (``base``: a ``ModelSpec``, loaded only when something must be measured)
    along the diff run's candidates at the SAE's block (its top
    ``n_latents`` latents and the dense directions there), by ``select_and_report``: scales in units
    of the mean residual norm at that block, chosen on ``select`` (pair evaluator), reported on
    ``report`` beside ``n_random`` random directions of equal norm. Each candidate's ``effect`` is the
    preference (nats/token) steering adds over the unsteered base model on the report questions,
    ``random_effects`` the same for the random directions at its scale, ``select_effect`` the
    preference it added on the select half (what a headline picks a candidate by). With
    ``finetuned`` (the fine-tune's ``ModelSpec``), the projection check too (``project_by_pairs``,
    under ``project``). Writes ``out/steer.json``."""
    from saediff.interventions.causal import SteerConfig, residual_stats, steer_candidates
    from saediff.interventions.steer_protocol import random_units
    from saediff.methods.directions import Direction
    from saediff.models.loading import load_model

    made_by = _made_by(
        base, run_dir, select, report, n_latents, scales, n_random, seed, coherence_budget, finetuned
    )
    prev = read_json_if_exists(out / "steer.json")
    if prev is not None and prev.get("made_by") == made_by:
        return prev
    base_lm = load_model(base)
    cands, layer = steer_candidates(run_dir, SteerConfig(n_latents=n_latents))
    randoms = {}
    if finetuned is not None:  # the projection check's controls; their base means come from the same pass
        first = next(iter(cands.values()))
        randoms = {
            f"random{k}_seed{seed}": Direction(f"random{k}", u, first.hook, "random")
            for k, u in enumerate(random_units(first.vector.shape[-1], n_random, seed + 5000))
        }
    norms, base_means = residual_stats(base_lm, run_dir, {**cands, **randoms} if randoms else {})
    result = {"kind": "saediff.pair_steering", "made_by": made_by, "layer": layer, "resid_norm": norms[layer]}
    result.update(
        _induce(
            base_lm, cands, layer, norms[layer], scales, select, report, out, n_random, coherence_budget, seed
        )
    )
    if finetuned is not None:
        del base_lm
        result["project"] = project_by_pairs(
            finetuned,
            {n: d.vector for n, d in cands.items()},
            report,
            out,
            base_preference=result["base"]["preference"],
            randoms={n: d.vector for n, d in randoms.items()},
            base_means=base_means,
        )
    atomic_write_json(out / "steer.json", result)
    return result


def _induce(
    base_lm,
    cands: dict,
    layer: int,
    resid_norm: float,
    scales: tuple[float, ...],
    select,
    report,
    out: Path,
    n_random: int,
    coherence_budget: float,
    seed: int,
) -> dict:
    """``select_and_report`` on the base model along ``cands`` at block ``layer`` (scales x
    ``resid_norm``); steer.json's protocol figures: the scales, the unsteered preference, the
    coherence floor, each candidate's row and the best effect."""
    from saediff.interventions.steer_protocol import Arm, select_and_report

    sel = select_and_report(
        {n: d.vector for n, d in cands.items()},
        [Arm("induce", base_lm, 1.0, "base")],
        layer,
        scales,
        resid_norm,
        select,
        report,
        out,
        n_random=n_random,
        coherence_budget=coherence_budget,
        seed=seed,
    )
    base_pref, select_base = _preference(out / "report" / "base"), _preference(out / "select" / "base")
    rows = {
        name: _candidate_row(name, c, out, base_pref, select_base, n_random, seed)
        for name, c in sel.candidates.items()
    }
    best = [r for r in rows.values() if r.get("effect") is not None]
    return {
        "scales": list(scales),
        "protocol": "scale (x mean residual norm) chosen on the design split by MC1 under a coherence budget; "
        "preference (nats/token) on the held-out split beside random directions of equal norm",
        "base": base_pref,
        "coherence_floor": sel.coherence_floor["induce"],
        "candidates": rows,
        "best_effect": max((r["effect"] for r in best), default=None),
    }


def _made_by(
    base, run_dir: Path, select, report, n_latents, scales, n_random, seed, coherence_budget, finetuned
) -> dict:
    """What decides ``steer_by_pairs``'s result: the protocol's version, the diff's SAE and
    directions, the models, both evaluators and the settings (the key its ``steer.json`` is reused by)."""
    from saediff.data.runs import read_run
    from saediff.models.provenance import evaluator_fingerprint, file_digest, model_fingerprint

    return json.loads(
        json.dumps(
            {
                "protocol": 3,
                "diff": read_run(run_dir)["steps"]["diff"].get("sae_identity"),
                "model": model_fingerprint(base),
                "directions": file_digest(run_dir / "directions" / "directions.safetensors"),
                "select": evaluator_fingerprint(select),
                "report": evaluator_fingerprint(report),
                "n_latents": n_latents,
                "scales": list(scales),
                "n_random": n_random,
                "seed": seed,
                "coherence_budget": coherence_budget,
                "finetuned": None if finetuned is None else model_fingerprint(finetuned),
            }
        )
    )


def _candidate_row(
    name: str, c, out: Path, base_pref: dict, select_base: dict, n_random: int, seed: int
) -> dict:
    """One candidate's figures (``c``: its ``Selection``): the chosen scale and MC1 sweep, and when a
    scale passed, the preference it adds on the select half and on the report half (``effect``, over
    the unsteered ``base_pref``) beside the random directions' at its scale."""
    from saediff.interventions.steer_protocol import induce_summary

    s = induce_summary(c)
    row = {
        "scale": s["scale"],
        "scale_abs": s["scale_abs"],
        "coherent_scale_found": s["coherent_scale_found"],
        "select_mc1": {k: v["em_rate"] for k, v in s["select_sweep"].items()},
        "note": s["note"],
    }
    if c.passed:
        chose = _preference(out / "select" / f"{name}_induce_x{c.scale:g}")
        row["select_effect"] = chose["preference"] - select_base["preference"]
        pref = _preference(out / "report" / f"{name}_induce_x{c.scale:g}")
        rnd = [
            _preference(out / "report" / f"random{k}_seed{seed}_induce_x{c.scale:g}") for k in range(n_random)
        ]
        row.update(
            mc1=s["em_rate"],
            mc1_random_mean=s["random_mean_em_rate"],
            preference=pref["preference"],
            preference_ci=pref["preference_ci"],
            effect=pref["preference"] - base_pref["preference"],
            random_effects=[r["preference"] - base_pref["preference"] for r in rnd],
            coherent_rate=s["coherent_rate"],
        )
        row["random_effect_max"] = max(row["random_effects"])
        row["above_random"] = row["effect"] > row["random_effect_max"]
    return row


def project_by_pairs(
    finetuned,
    candidates: dict[str, torch.Tensor],
    report,
    out: Path,
    *,
    base_preference: float,
    randoms: dict[str, torch.Tensor],
    base_means: dict[str, dict[int, float]],
) -> dict:
    """The projection checks: each candidate direction removed from the fine-tune's residual after
    every block (``project``: directional ablation, ``steering.project_out``) or held there at the
    base model's mean projection (``clamp``: ``steering.clamp_projection`` with ``base_means[name]``
    per block, which keeps the base model's own position on the axis, its aligned prior), scored
    by the pair evaluator ``report``, beside the ``randoms`` directions treated the same way.
    ``removed``: the preference the intervention takes away from the fine-tune, paired over the
    same questions (95% t interval); ``share``: that over the fine-tune's shift from the base model
    (``base_preference``), when the shift is positive. Evaluations are cached under ``out/report/``
    (``evals.evaluate_once``)."""
    from saediff.evaluation.evals import evaluate_once
    from saediff.models.loading import load_model

    lm = load_model(finetuned)
    ft = evaluate_once(report, lm, out / "report" / "finetuned", "finetuned")["preference"]
    shift = ft - base_preference
    removed = partial(_removed, lm, report, out, _pair_rows(out / "report" / "finetuned"), shift, base_means)
    result = {
        "finetuned_preference": ft,
        "shift": shift,
        "protocol": "each direction projected out of (project) or clamped at the base model's mean projection "
        "in (clamp) the fine-tune after every block; preference (nats/token) on the held-out split "
        "beside random directions treated the same way",
    }
    for kind in ("project", "clamp"):
        rnd = [removed(n, kind, v)["removed"] for n, v in randoms.items()]
        rows = {n: removed(n, kind, v) for n, v in candidates.items()}
        for row in rows.values():
            row["above_random"] = row["removed"] > max(rnd)
        result[kind] = {"random_removed": rnd, "candidates": rows}
    return result


def _pair_rows(folder: Path) -> list[dict]:
    """The per-question rows of an evaluation's ``pairs.jsonl``."""
    from saediff._io import read_jsonl

    return [r for _, r in read_jsonl(folder / "pairs.jsonl", "pair scores")]


def _removed(
    lm,
    report,
    out: Path,
    ft_rows: list[dict],
    shift: float,
    base_means: dict[str, dict[int, float]],
    name: str,
    kind: str,
    vector: torch.Tensor,
) -> dict:
    """Direction ``vector`` (d,) projected out of (``kind`` ``project``) or clamped at the base
    model's mean projection in (``clamp``) the fine-tune ``lm`` after every block, scored by
    ``report``: the preference it removes, paired with the fine-tune's rows ``ft_rows`` over the
    same questions, and that as a share of the fine-tune's ``shift`` when the shift is positive."""
    from saediff.evaluation.evals import evaluate_once
    from saediff.evaluation.pairs import paired_difference
    from saediff.interventions.steering import clamp_projection, project_out

    n_layers = lm.model.config.num_hidden_layers
    vector = vector.detach().float().cpu()
    ctx = (
        project_out(lm.model, "all", vector)
        if kind == "project"
        else clamp_projection(lm.model, {L: base_means[name][L] for L in range(n_layers)}, vector)
    )
    cond = f"{name}_{kind}_all"
    r = evaluate_once(report, lm, out / "report" / cond, cond, ctx)
    paired = paired_difference(ft_rows, _pair_rows(out / "report" / cond), a="finetuned", b=cond)
    return {
        "preference": r["preference"],
        "mc1": r["em_rate"],
        "removed": paired["difference"],
        "removed_ci": paired["ci"],
        "removed_t": paired["t"],
        "share": paired["difference"] / shift if shift > 0 else None,
    }


def _preference(folder: Path) -> dict:
    em = read_json_if_exists(folder / "em.json")
    if em is None:
        raise SaediffError(f"{folder}: no em.json (steering evaluation missing)")
    return {"preference": em["preference"], "preference_ci": em["preference_ci"], "mc1": em["mc1"]}


def steer_step(base, out: Path, seed: int, recipe: ChatDemoRecipe, say) -> dict:
    from saediff.evaluation.pairs import pair_evaluator

    say("steering the base model (design split chooses, held-out split reports)")
    select = replace(pair_evaluator(recipe.choose_on, recipe.eval_batch_size), progress=False).halves()[0]
    report = replace(pair_evaluator(recipe.report_on, recipe.eval_batch_size), progress=False)
    return steer_by_pairs(
        base,
        out / "diff",
        select,
        report,
        out / "steer",
        n_latents=recipe.steer_latents,
        scales=recipe.steer_scales,
        n_random=recipe.n_random,
        seed=seed,
        finetuned=full_bad_spec(base, out),
    )
