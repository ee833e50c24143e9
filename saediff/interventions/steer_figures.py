"""Reading the steering protocol's results: per-item scores, paired effects, and flat summaries of one
candidate (``induce_summary``, ``steer_headline``) for reports and steer.json files."""

from __future__ import annotations

import math

import numpy as np

from saediff.errors import SaediffError

__all__ = ["induce_summary", "item_scores", "paired_effect", "rates", "steer_headline"]

NO_SCALE = (
    "no scale reached any of the cost levels on the neutral text (the direction barely changes "
    "the model's predictions there): nothing reported, nothing kept"
)


def item_scores(em: dict) -> dict[str, float]:
    """An evaluation's continuous EM score per item: ``scores`` when the evaluator gives them (the
    pair metric's preference per question, the organism's verdict per answer), else ``per_question``
    (a judge's EM rate per question)."""
    scores = em.get("scores") or em.get("per_question")
    if not scores:
        raise SaediffError("the evaluator returned no per-item scores (em.json 'scores' or 'per_question')")
    return {str(k): float(v) for k, v in scores.items()}


def paired_effect(diffs) -> dict:
    """Mean of per-item differences with its 95% paired t interval (``ci`` None for n < 2)."""
    from scipy import stats

    x = np.asarray(list(diffs), dtype=float)
    n, m = len(x), float(np.mean(x))
    if n < 2:
        return {"effect": m, "effect_ci": None, "n": n}
    se = float(np.std(x, ddof=1) / math.sqrt(n))
    q = float(stats.t.ppf(0.975, n - 1))
    return {"effect": m, "effect_ci": [m - q * se, m + q * se], "n": n}


def induce_summary(c, arm: str = "induce") -> dict:
    """One candidate's figures under a single-arm protocol, flat."""
    r = (c.report or {}).get(arm) or {}
    keys = ("em_rate", "em_rate_ci", "coherent_rate", "n_responses", "effect", "effect_ci", "n")
    return {
        "scale": c.scale,
        "scale_abs": c.scale_abs,
        "cost_kl": c.cost_kl,
        "scale_found": c.passed,
        "select_sweep": c.select_sweep,
        **{k: r.get(k) for k in keys},
        "p_value": c.p_value,
        "beats_null": c.beats_null,
        "verdict": c.verdict,
        "null_quantiles": c.null_quantiles,
        "equal_norm": c.equal_norm,
        "null": c.null,
        "note": None if c.passed else NO_SCALE,
    }


def steer_headline(sel, name: str) -> dict:
    """The candidate's report-half effect beside the null's (None with a note when no scale passed)."""
    c = sel.candidates[name]
    if not c.passed:
        return {"scale": None, "note": NO_SCALE}
    r = c.report["induce"]
    return {
        "scale": c.scale,
        "cost_kl": c.cost_kl,
        "em_rate": r["em_rate"],
        "em_rate_ci": r["em_rate_ci"],
        "effect": c.effect,
        "effect_ci": c.effect_ci,
        "p_value": c.p_value,
        "beats_null": c.beats_null,
        "verdict": c.verdict,
        "null_quantiles": c.null_quantiles,
        "null_effects": [n["effect"] for n in c.null.values()],
        "equal_norm_null_effect": (c.equal_norm or {}).get("null_mean_effect"),
        "unsteered": sel.unsteered["induce"]["report"]["em_rate"],
    }


def rates(em: dict) -> dict:
    """An evaluation's EM and coherent rates, the EM rate's interval and the answer count."""
    return {
        "em_rate": em["em_rate"],
        "em_rate_ci": list(em["em_rate_ci"]),
        "coherent_rate": em["coherent_rate"],
        "n_responses": em["n_responses"],
    }
