"""Steering by the pair metric: saediff's one steering protocol
(``steer_protocol.select_and_report``) on the base model along the diff's candidates, each priced by
the KL it causes on neutral text (the base model's own greedy answers to benign questions), its cost
level chosen on half of the design split, its effect reported on the held-out split against a null
of random directions at the same cost; the same candidates again on the style-crossed pair set (its
halves choose and report), so a direction that only carries the references' style shows; then the
projection checks (``projection.project_by_pairs``): each candidate projected out of (clamped in) the
bad fine-tune and the base model, read as the fine-tune's shift that survives."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

from saediff._io import atomic_write_json, read_json_if_exists
from saediff.interventions.steer_null import NullConfig
from saediff.interventions.steer_protocol import DEFAULT_KL_BUDGET
from saediff.stories.smollm2.finetunes import full_bad_spec
from saediff.stories.smollm2.projection import project_by_pairs
from saediff.stories.smollm2.recipe import ChatDemoRecipe

__all__ = ["project_by_pairs", "steer_by_pairs", "steer_step"]

PROTOCOL = (
    "each candidate's scale searched for at the cost levels (mean KL per token of the base model's "
    "greedy answers to benign questions), the level with the largest preference added chosen on the "
    "design split's first half; the preference added (nats/token, paired over questions) on the held-out "
    "split against the null's directions at the same cost (empirical p-value, verdict from the interval)"
)
"""steer.json's ``protocol``: how its figures were made"""

CROSS_KEYS = (
    "scale",
    "cost_kl",
    "cost_level",
    "scale_found",
    "select_effect",
    "effect",
    "effect_ci",
    "n",
    "p_value",
    "beats_null",
    "verdict",
    "null_quantiles",
    "note",
)
"""a candidate's figures on the style-crossed pairs (steer.json ``candidates.NAME.style_crossed``)"""


# long: its signature and docstring; the code itself is 55 lines
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
    style_crossed=None,
    ablation_randoms: int = 20,
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
    Scales are in units of the mean residual norm at that block.

    With ``style_crossed`` (a pair evaluator, the style-crossed set), the same candidates through the
    same protocol with its halves choosing and reporting (under ``out/style_crossed/``): each
    candidate's ``style_crossed`` figures (``CROSS_KEYS``) and the unsteered figures under the top-level
    ``style_crossed``. With ``finetuned`` (the fine-tune's ``ModelSpec``), the projection checks
    (``projection.project_by_pairs``, under ``project``) beside ``ablation_randoms`` random unit
    directions (the null's isotropic draws). Writes ``out/steer.json``; a rerun of the same setup
    reads it back, and an interrupted one resumes from the protocol's cached conditions under ``out``."""
    from saediff.interventions.causal import SteerConfig, chat_cost, residual_stats, steer_candidates
    from saediff.models.loading import load_model

    made_by = _made_by(
        base,
        run_dir,
        select,
        report,
        n_latents,
        kl_budget,
        levels,
        null,
        finetuned,
        style_crossed,
        ablation_randoms,
    )
    prev = read_json_if_exists(out / "steer.json")
    if prev is not None and prev.get("made_by") == made_by:
        return prev
    base_lm = load_model(base)
    cands, layer = steer_candidates(run_dir, SteerConfig(n_latents=n_latents))
    # the projection check's controls; their base means come from the same pass as the candidates'
    controls = _controls(cands, ablation_randoms, null.seed) if finetuned is not None else {}
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
    vectors = {n: d.vector for n, d in cands.items()}
    steer = _protocol(base_lm, vectors, layer, norms[layer], cost, null)
    result.update(_induce(steer(select, report, out), cost))
    if style_crossed is not None:
        halves = style_crossed.halves()
        _add_style_crossed(result, steer(*halves, _cross_folder(out)), style_crossed.source, halves)
    if finetuned is not None:
        result["project"] = project_by_pairs(
            load_model(finetuned),
            base_lm,
            vectors,
            report,
            out,
            randoms={n: d.vector for n, d in controls.items()},
            base_means=base_means,
            alpha=null.alpha,
        )
        result["project"]["random_directions"] = {n: d.provenance for n, d in controls.items()}
    atomic_write_json(out / "steer.json", result)
    return result


def _controls(cands: dict, n: int, seed: int) -> dict:
    """``n`` random unit directions (the null's isotropic draws from ``seed``) as ``Direction``s at the
    candidates' hook, each recording its kind and seed."""
    from saediff.interventions.steer_null import isotropic
    from saediff.methods.directions import Direction

    first = next(iter(cands.values()))
    return {
        d.name: Direction(d.name, d.vector, first.hook, "random", {"kind": d.kind, "seed": d.seed})
        for d in isotropic(first.vector.shape[-1], n, seed)
    }


def _protocol(base_lm, vectors: dict, layer: int, resid_norm: float, cost, null: NullConfig):
    """``select_and_report`` on the base model along ``vectors`` at block ``layer`` (scales in units of
    ``resid_norm``, priced by ``cost``, against ``null``), as a function of the select and report
    evaluators and the folder its conditions are cached in."""
    from saediff.interventions.steer_protocol import Arm, select_and_report

    arm = Arm("induce", base_lm, 1.0, "base")

    def run(select, report, folder: Path):
        return select_and_report(vectors, [arm], layer, resid_norm, select, report, folder, cost, null=null)

    return run


def _induce(sel, cost) -> dict:
    """steer.json's protocol figures from ``select_and_report``'s result ``sel``: the budget and cost
    levels, the null's settings, the unsteered preference on both halves, each candidate's row and
    the best effect."""
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


def _cross_folder(out: Path) -> Path:
    """``out/style_crossed``, seeded with the held-out run's KL points (``costs.json``: keyed by the
    direction, block, neutral text and models, not by the questions), so its scale searches are not
    run twice."""
    folder = out / "style_crossed"
    folder.mkdir(parents=True, exist_ok=True)
    if (out / "costs.json").exists() and not (folder / "costs.json").exists():
        shutil.copyfile(out / "costs.json", folder / "costs.json")
    return folder


def _add_style_crossed(result: dict, sel, source: str, halves: tuple) -> None:
    """The style-crossed run ``sel`` (on ``halves``, select and report, of the pair set ``source``) into
    ``result`` (steer.json): each candidate's figures (``CROSS_KEYS``) under its ``style_crossed`` key,
    the set, its halves' sizes and its unsteered figures under the top-level one."""
    for name, c in sel.candidates.items():
        row = _candidate_row(c)
        result["candidates"][name]["style_crossed"] = {k: row.get(k) for k in CROSS_KEYS}
    unsteered = sel.unsteered["induce"]
    result["style_crossed"] = {
        "pair_set": source,
        "n_select": len(halves[0].pairs),
        "n_report": len(halves[1].pairs),
        "base": _figures(unsteered["report"]),
        "select_base": _figures(unsteered["select"]),
    }


def _figures(unsteered: dict) -> dict:
    """The unsteered model's preference (with its interval) and MC1 on one half."""
    return {
        "preference": unsteered["preference"],
        "preference_ci": unsteered.get("preference_ci"),
        "mc1": unsteered["em_rate"],
    }


def _made_by(
    base,
    run_dir: Path,
    select,
    report,
    n_latents,
    kl_budget,
    levels,
    null,
    finetuned,
    style_crossed,
    n_random,
) -> dict:
    """What decides ``steer_by_pairs``'s result: the protocol's version, the diff's SAE and
    directions, the models, the evaluators, the neutral text's questions and the settings (the key
    its ``steer.json`` is reused by)."""
    from saediff.data.runs import read_run
    from saediff.evaluation.neutral import NEUTRAL_VERSION, neutral_questions
    from saediff.models.provenance import digest, evaluator_fingerprint, file_digest, model_fingerprint

    return json.loads(
        json.dumps(
            {
                # 5: the projection share's bootstrap interval; 6: projections read as the shift that
                # survives (both models ablated, p-value against random directions), style-crossed pairs
                "protocol": 6,
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
                "style_crossed": None if style_crossed is None else evaluator_fingerprint(style_crossed),
                "ablation_randoms": n_random if finetuned is not None else None,
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
        select_effect=c.select_sweep[level].get("effect"),  # None: one cost level, nothing chosen
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


def steer_step(base, out: Path, seed: int, recipe: ChatDemoRecipe, say) -> dict:
    """The story's steering (``steer_by_pairs``) by ``recipe``; the fine-tune ``seed`` reaches it only
    through the diff and the fine-tune (the null is seeded by ``recipe.null``, independently)."""
    from saediff.evaluation.pairs import pair_evaluator

    say("steering the base model (design split chooses, held-out split reports; style-crossed pairs)")
    evaluator = lambda name: replace(pair_evaluator(name, recipe.eval_batch_size), progress=False)
    select, report = evaluator(recipe.choose_on).halves()[0], evaluator(recipe.report_on)
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
        style_crossed=evaluator(recipe.style_crossed) if recipe.style_crossed else None,
        ablation_randoms=recipe.ablation_randoms,
    )
