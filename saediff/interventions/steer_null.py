"""The steering protocol's null: directions that should not matter, and the statistics that compare
a candidate with them.

Null directions (``NullConfig``), seeded independently of any fine-tune seed and recorded:

- ``isotropic``: uniform on the unit sphere;
- ``covariance``: Gaussian with the residual's covariance at the steered block (``Sigma^1/2 z``,
  drawn as ``X_c^T g / sqrt(n)`` from centred residuals, so Sigma is never formed): directions
  that look like activations;
- ``permuted``: for an estimator of the mean-difference family, the same estimator with the
  misaligned / aligned labels permuted within each question (supplied by the caller).

A candidate's effect is compared with the null's effects at the same cost: the empirical p-value
``(1 + nulls at or above) / (1 + nulls)``, the null's quantiles, and a verdict from the effect's
interval (``verdict``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from saediff.errors import SaediffError

__all__ = [
    "NULL_SEED",
    "NullConfig",
    "NullDirection",
    "covariance_matched",
    "empirical_p",
    "isotropic",
    "null_quantiles",
    "verdict",
]

NULL_SEED = 20261207
"""the null's default seed: fixed, and independent of every fine-tune seed"""


@dataclass(frozen=True)
class NullConfig:
    """How the protocol's null is drawn and read."""

    n_isotropic: int = 10
    """isotropic random unit directions"""
    n_covariance: int = 10
    """random directions with the residual's covariance at the steered block"""
    n_permuted: int = 10
    """per candidate of the mean-difference family that brings its estimator: the estimator with
    the labels permuted within each question"""
    seed: int = NULL_SEED
    """seed of the null's draws (recorded per direction); independent of the fine-tune seed"""
    alpha: float = 0.05
    """a candidate beats the null when its empirical p-value is at most this"""

    def __post_init__(self):
        if min(self.n_isotropic, self.n_covariance, self.n_permuted) < 0:
            raise SaediffError("NullConfig: direction counts must be >= 0")
        if self.n_isotropic + self.n_covariance < 1:
            raise SaediffError("NullConfig needs at least one isotropic or covariance-matched direction")
        if not 0 < self.alpha < 1:
            raise SaediffError(f"NullConfig.alpha must lie in (0, 1), got {self.alpha}")


@dataclass(frozen=True)
class NullDirection:
    name: str
    kind: str
    """``isotropic``, ``covariance`` or ``permuted``"""
    seed: int
    vector: torch.Tensor


def isotropic(d_model: int, n: int, seed: int) -> list[NullDirection]:
    """``n`` unit directions uniform on the sphere; direction k is drawn from seed ``seed + k``."""
    out = []
    for k in range(n):
        v = torch.randn(d_model, generator=torch.Generator().manual_seed(seed + k))
        out.append(NullDirection(f"null_iso{k}", "isotropic", seed + k, v / v.norm()))
    return out


def covariance_matched(acts_ND: torch.Tensor, n: int, seed: int) -> list[NullDirection]:
    """``n`` unit directions drawn from N(0, Sigma), Sigma the covariance of ``acts_ND`` (rows are
    residuals); direction k from seed ``seed + k``."""
    X = acts_ND.double()
    if X.shape[0] < 2:
        raise SaediffError("covariance-matched null directions need at least 2 residual rows")
    Xc = X - X.mean(0)
    out = []
    for k in range(n):
        g = torch.randn(X.shape[0], generator=torch.Generator().manual_seed(seed + k), dtype=torch.float64)
        v = (Xc.T @ g).float()
        out.append(NullDirection(f"null_cov{k}", "covariance", seed + k, v / v.norm()))
    return out


def empirical_p(effect: float, null_effects) -> float:
    """``(1 + #nulls >= effect) / (1 + #nulls)``: with 20 nulls the smallest p-value is 1/21."""
    null = np.asarray(list(null_effects), dtype=float)
    if null.size == 0:
        raise SaediffError("an empirical p-value needs at least one null effect")
    return float((1 + np.sum(null >= effect)) / (1 + null.size))


QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def null_quantiles(null_effects) -> dict[str, float]:
    """The null effects' quantiles (linear interpolation), keyed ``q05`` ... ``q95``."""
    null = np.asarray(list(null_effects), dtype=float)
    return {f"q{round(q * 100):02d}": float(np.quantile(null, q)) for q in QUANTILES}


def verdict(effect_ci: list[float] | None, p_value: float, null_q95: float, alpha: float = 0.05) -> str:
    """``holds`` when the candidate beats the null (``p_value <= alpha``) and its effect's interval
    lies above 0; ``fails`` when the whole interval lies at or below the null's 95th percentile (it
    cannot be told from a direction that should not matter); otherwise ``inconclusive``."""
    if effect_ci is None:
        return "inconclusive"
    if p_value <= alpha and effect_ci[0] > 0:
        return "holds"
    if effect_ci[1] <= null_q95:
        return "fails"
    return "inconclusive"
