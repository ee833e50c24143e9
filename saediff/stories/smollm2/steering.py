"""Steering by the pair metric: saediff's one steering protocol
(``steer_protocol.select_and_report``) on the base model along the diff's candidates, each priced by
the KL it causes on neutral text (the base model's own greedy answers to benign questions), its cost
level chosen on half of the design split, its effect reported on the held-out split against a null
of random directions at the same cost; then the same candidates projected out of (or clamped in) the
fine-tune."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch

from saediff._io import atomic_write_json, read_json_if_exists
from saediff.interventions.steer_null import NullConfig
from saediff.interventions.steer_protocol import DEFAULT_KL_BUDGET
from saediff.stories.smollm2.finetunes import full_bad_spec
from saediff.stories.smollm2.recipe import ChatDemoRecipe

__all__ = ["project_by_pairs", "steer_by_pairs", "steer_step"]

PROTOCOL = (
    "each candidate's scale searched for at the cost levels (mean KL per token of the base model's "
    "greedy answers to benign questions), the level with the largest preference added chosen on the "
    "design split's first half; the preference added (nats/token, paired over questions) on the held-out "
    "split against the null's directions at the same cost (empirical p-value, verdict from the interval)"
)
"""steer.json's ``protocol``: how its figures were made"""


# long: its signature and docstring; the code itself is 46 lines
def steer_by_pairs(
    base,
    run_dir: Path,
    select,
    report,
    out: Path,
    *,
    n_latents: int,
    kl_budget: float = DEFAULT_KL_BUDGET,
    levels: tuple[float, ...] = (0.25, 0.5, 1.0),
    null: NullConfig = NullConfig(),
    finetuned=None,
) -> dict:
    """Steer the base model (``base``: a ``ModelSpec``, loaded only when something must be measured)
    along the diff run's candidates at the SAE's block (its top ``n_latents`` latents and the dense
    directions there), by ``select_and_report``: each candidate priced by the KL it causes on the base
    model's greedy answers to the shipped benign questions (``causal.chat_cost``, at ``levels`` x
    ``kl_budget`` nats per token), the level chosen on ``select`` (pair evaluator), the effect reported
    on ``report`` against ``null`` at the same cost. A candidate's ``effect`` is the preference
    (nats/token) steering adds to the base model, paired over the report questions (95% t interval
    ``effect_ci``), with its ``p_value`` against the null, ``beats_null``, ``verdict`` and the null's
    quantiles; ``select_effect`` is the same on the select half (what a headline picks a candidate by).
    Scales are in units of the mean residual norm at that block. With ``finetuned`` (the fine-tune's
    ``ModelSpec``), the projection check too (``project_by_pairs``, under ``project``), beside the
    null's isotropic directions. Writes ``out/steer.json``; a rerun of the same setup reads it back,
    and an interrupted one resumes from the protocol's cached conditions under ``out``."""
    from saediff.interventions.causal import SteerConfig, chat_cost, residual_stats, steer_candidates
    from saediff.interventions.steer_null import isotropic
    from saediff.methods.directions import Direction
    from saediff.models.loading import load_model

    made_by = _made_by(base, run_dir, select, report, n_latents, kl_budget, levels, null, finetuned)
    prev = read_json_if_exists(out / "steer.json")
    if prev is not None and prev.get("made_by") == made_by:
        return prev
    base_lm = load_model(base)
    cands, layer = steer_candidates(run_dir, SteerConfig(n_latents=n_latents))
    controls = {}
    if finetuned is not None:  # the projection check's controls; their base means come from the same pass
        first = next(iter(cands.values()))
        controls = {
            d.name: Direction(d.name, d.vector, first.hook, "random", {"kind": d.kind, "seed": d.seed})
            for d in isotropic(first.vector.shape[-1], null.n_isotropic, null.seed)
        }
    norms, base_means = residual_stats(base_lm, run_dir, {**cands, **controls} if controls else {})
    cost = chat_cost(base_lm, kl_budget, levels=levels)
    result = {
        "kind": "saediff.pair_steering",
        "made_by": made_by,
        "layer": layer,
        "resid_norm": norms[layer],
        "neutral": {
            "source": cost.neutral.source,
            "n_tokens": cost.neutral.n_tokens,
            **cost.neutral.fingerprint(),
        },
    }
    result.update(_induce(base_lm, cands, layer, norms[layer], select, report, out, cost, null))
    if finetuned is not None:
        del base_lm
        result["project"] = project_by_pairs(
            finetuned,
            {n: d.vector for n, d in cands.items()},
            report,
            out,
            base_preference=result["base"]["preference"],
            randoms={n: d.vector for n, d in controls.items()},
            base_means=base_means,
            base_scores=_scores(out / "report" / "base"),  # select_and_report's unsteered base
        )
        result["project"]["random_directions"] = {n: d.provenance for n, d in controls.items()}
    atomic_write_json(out / "steer.json", result)
    return result


def _induce(
    base_lm, cands: dict, layer: int, resid_norm: float, select, report, out: Path, cost, null: NullConfig
) -> dict:
    """``select_and_report`` on the base model along ``cands`` at block ``layer`` (scales in units of
    ``resid_norm``, priced by ``cost``, against ``null``); steer.json's protocol figures: the budget
    and cost levels, the null's settings, the unsteered preference on both halves, each candidate's
    row and the best effect."""
    from saediff.interventions.steer_protocol import Arm, select_and_report

    sel = select_and_report(
        {n: d.vector for n, d in cands.items()},
        [Arm("induce", base_lm, 1.0, "base")],
        layer,
        resid_norm,
        select,
        report,
        out,
        cost,
        null=null,
    )
    unsteered = sel.unsteered["induce"]
    rows = {name: _candidate_row(c) for name, c in sel.candidates.items()}
    done = [r["effect"] for r in rows.values() if r.get("effect") is not None]
    return {
        "protocol": PROTOCOL,
        "kl_budget": cost.budget,
        "costs": sel.costs,
        "null_config": sel.null_config,
        "base": _figures(unsteered["report"]),
        "select_base": _figures(unsteered["select"]),
        "candidates": rows,
        "best_effect": max(done, default=None),
    }


def _figures(unsteered: dict) -> dict:
    """The unsteered model's preference (with its interval) and MC1 on one half."""
    return {
        "preference": unsteered["preference"],
        "preference_ci": unsteered.get("preference_ci"),
        "mc1": unsteered["em_rate"],
    }


def _made_by(base, run_dir: Path, select, report, n_latents, kl_budget, levels, null, finetuned) -> dict:
    """What decides ``steer_by_pairs``'s result: the protocol's version, the diff's SAE and
    directions, the models, both evaluators, the neutral text's questions and the settings (the key
    its ``steer.json`` is reused by)."""
    from saediff.data.runs import read_run
    from saediff.evaluation.neutral import NEUTRAL_VERSION, neutral_questions
    from saediff.models.provenance import digest, evaluator_fingerprint, file_digest, model_fingerprint

    return json.loads(
        json.dumps(
            {
                "protocol": 5,  # 5: the projection share's bootstrap interval (share_ci)
                "diff": read_run(run_dir)["steps"]["diff"].get("sae_identity"),
                "model": model_fingerprint(base),
                "directions": file_digest(run_dir / "directions" / "directions.safetensors"),
                "select": evaluator_fingerprint(select),
                "report": evaluator_fingerprint(report),
                "neutral": {"version": NEUTRAL_VERSION, "questions": digest(neutral_questions())},
                "n_latents": n_latents,
                "kl_budget": kl_budget,
                "levels": sorted(levels),
                "null": asdict(null),
                "finetuned": None if finetuned is None else model_fingerprint(finetuned),
            }
        )
    )


def _candidate_row(c) -> dict:
    """One candidate's figures (``c``: its ``Selection``): its sweep over the cost levels on the select
    half and, when some level was reached, the chosen scale and cost, the preference it adds on the
    select half (``select_effect``) and on the report half (``effect``, ``effect_ci``) against the null
    at the same cost (``p_value``, ``beats_null``, ``verdict``, ``null_quantiles``; ``null_seeds`` as in
    ``saediff steer``'s steer.json, ``null`` each null direction's kind, seed, scale, cost and effect),
    and the null at equal norm (secondary, ``equal_norm``)."""
    from saediff.interventions.steer_protocol import NO_SCALE

    row = {
        "scale": c.scale,
        "scale_abs": c.scale_abs,
        "cost_kl": c.cost_kl,
        "scale_found": c.passed,
        "select_sweep": {
            level: {
                "scale": v.get("scale"),
                "scale_abs": v["scale_abs"],
                "cost_kl": v["cost_kl"],
                "reached": v["reached"],
                "effect": v.get("effect"),
                "mc1": (v.get("induce") or {}).get("em_rate"),
            }
            for level, v in c.select_sweep.items()
        },
        "note": None if c.passed else NO_SCALE,
    }
    if not c.passed:
        return row
    level = next(k for k, v in c.select_sweep.items() if v["reached"] and v["scale_abs"] == c.scale_abs)
    r = c.report["induce"]
    row.update(
        cost_level=float(level),
        select_effect=c.select_sweep[level]["effect"],
        effect=c.effect,
        effect_ci=c.effect_ci,
        n=r["n"],
        p_value=c.p_value,
        beats_null=c.beats_null,
        verdict=c.verdict,
        null_quantiles=c.null_quantiles,
        null_seeds={n: {"kind": d["kind"], "seed": d["seed"]} for n, d in c.null.items()},
        null={n: {k: v for k, v in d.items() if k != "arms"} for n, d in c.null.items()},
        equal_norm=c.equal_norm,
        mc1=r["em_rate"],
        mc1_ci=r["em_rate_ci"],
    )
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
    base_scores: dict[str, float] | None = None,
) -> dict:
    """The projection checks: each candidate direction removed from the fine-tune's residual after
    every block (``project``: directional ablation, ``steering.project_out``) or held there at the
    base model's mean projection (``clamp``: ``steering.clamp_projection`` with ``base_means[name]``
    per block, which keeps the base model's own position on the axis, its aligned prior), scored
    by the pair evaluator ``report``, beside the ``randoms`` directions treated the same way.
    ``removed``: the preference the intervention takes away from the fine-tune, paired over the
    same questions (95% t interval); ``share``: that over the fine-tune's shift from the base model
    (``base_preference``), when the shift is positive, with ``share_ci``, its 95% interval from a
    paired bootstrap over questions (``intervals.bootstrap_ratio`` of each question's removal over
    its shift; needs the base model's per-question preferences ``base_scores``, else None).
    Evaluations are cached under ``out/report/`` (``evals.evaluate_once``)."""
    from saediff.evaluation.evals import evaluate_once
    from saediff.models.loading import load_model

    lm = load_model(finetuned)
    ft = evaluate_once(report, lm, out / "report" / "finetuned", "finetuned")["preference"]
    shift = ft - base_preference
    removed = partial(
        _removed, lm, report, out, _pair_rows(out / "report" / "finetuned"), shift, base_means, base_scores
    )
    result = {
        "finetuned_preference": ft,
        "shift": shift,
        "protocol": "each direction projected out of (project) or clamped at the base model's mean projection "
        "in (clamp) the fine-tune after every block; preference (nats/token) on the held-out split "
        "beside random directions (the null's isotropic ones) treated the same way",
    }
    for kind in ("project", "clamp"):
        rnd = [removed(n, kind, v)["removed"] for n, v in randoms.items()]
        rows = {n: removed(n, kind, v) for n, v in candidates.items()}
        for row in rows.values():
            row["above_random"] = row["removed"] > max(rnd) if rnd else None
        result[kind] = {"random_removed": rnd, "candidates": rows}
    return result


def _scores(folder: Path) -> dict[str, float]:
    """The per-question preferences of an evaluation's ``em.json`` (``scores``)."""
    from saediff.interventions.steer_protocol import item_scores

    return item_scores(json.loads((folder / "em.json").read_text()))


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
    base_scores: dict[str, float] | None,
    name: str,
    kind: str,
    vector: torch.Tensor,
) -> dict:
    """Direction ``vector`` (d,) projected out of (``kind`` ``project``) or clamped at the base
    model's mean projection in (``clamp``) the fine-tune ``lm`` after every block, scored by
    ``report``: the preference it removes, paired with the fine-tune's rows ``ft_rows`` over the
    same questions, and that as a share of the fine-tune's ``shift`` when the shift is positive, with
    its paired bootstrap interval over questions when ``base_scores`` gives the base model's."""
    from saediff.evaluation.evals import evaluate_once
    from saediff.evaluation.intervals import bootstrap_ratio
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
    rows = _pair_rows(out / "report" / cond)
    paired = paired_difference(ft_rows, rows, a="finetuned", b=cond)
    share_ci = None
    if shift > 0 and base_scores is not None:
        ft = {str(x["id"]): float(x["preference"]) for x in ft_rows}
        after = {str(x["id"]): float(x["preference"]) for x in rows}
        removed = {q: ft[q] - after[q] for q in ft}  # (fine-tune - ablated) per question
        gained = {q: ft[q] - base_scores[q] for q in ft if q in base_scores}  # (fine-tune - base)
        share_ci = bootstrap_ratio(removed, gained)["ci"]
    return {
        "preference": r["preference"],
        "mc1": r["em_rate"],
        "removed": paired["difference"],
        "removed_ci": paired["ci"],
        "removed_t": paired["t"],
        "share": paired["difference"] / shift if shift > 0 else None,
        "share_ci": share_ci,
    }


def steer_step(base, out: Path, seed: int, recipe: ChatDemoRecipe, say) -> dict:
    """The story's steering (``steer_by_pairs``) by ``recipe``; the fine-tune ``seed`` reaches it only
    through the diff and the fine-tune (the null is seeded by ``recipe.null``, independently)."""
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
        kl_budget=recipe.kl_budget,
        levels=recipe.kl_levels,
        null=recipe.null,
        finetuned=full_bad_spec(base, out),
    )
