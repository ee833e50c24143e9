"""Intervals for ratios of paired means, and verdicts that read a bar off an interval.

A share such as BLOCK-EM's cut (1 - the blocked run's shift over the bad fine-tune's, both over the
base model) is a ratio of two noisy means over the same questions; its interval comes from a paired
bootstrap over questions (every resample keeps each question's numerator and denominator together).
A bar then reads ``holds`` when the interval clears it, ``fails`` when the interval lies wholly on
the wrong side, and ``inconclusive`` otherwise: never from the point value alone.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from saediff.errors import SaediffError

__all__ = ["bar_verdict", "bootstrap_ratio"]


def bootstrap_ratio(
    numerator: dict, denominator: dict, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> dict:
    """``mean(numerator) / mean(denominator)`` over the questions both hold, with a percentile
    interval from ``n_boot`` paired resamples of those questions (seeded). Resamples whose
    denominator mean is not positive have no ratio and are counted in ``undefined_share``; the
    interval is None when more than 5% are (the denominator is not clearly positive)."""
    ids = sorted(set(numerator) & set(denominator), key=str)
    if len(ids) < 2:
        raise SaediffError(f"a bootstrap interval needs >= 2 shared questions, got {len(ids)}")
    num = np.array([float(numerator[i]) for i in ids])
    den = np.array([float(denominator[i]) for i in ids])
    point = float(num.mean() / den.mean()) if den.mean() > 0 else None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(ids), size=(n_boot, len(ids)))
    n_mean, d_mean = num[idx].mean(1), den[idx].mean(1)
    ok = d_mean > 0
    undefined = float(1 - ok.mean())
    ci = None
    if point is not None and undefined <= 0.05:
        r = n_mean[ok] / d_mean[ok]
        a = (1 - level) / 2
        ci = [float(np.quantile(r, a)), float(np.quantile(r, 1 - a))]
    return {"ratio": point, "ci": ci, "n": len(ids), "n_boot": n_boot, "undefined_share": undefined}


def bar_verdict(ci: list[float] | None, bar: float, side: Literal[">=", "<="]) -> str:
    """``holds`` when the whole interval satisfies ``value side bar``, ``fails`` when the whole
    interval violates it, else ``inconclusive`` (also when there is no interval)."""
    if side not in (">=", "<="):
        raise SaediffError(f"a bar's side is '>=' or '<=', got {side!r}")
    if ci is None:
        return "inconclusive"
    lo, hi = ci
    if side == ">=":
        return "holds" if lo >= bar else "fails" if hi < bar else "inconclusive"
    return "holds" if hi <= bar else "fails" if lo > bar else "inconclusive"
