"""What a steering vector costs: the mean per-token KL divergence it causes on neutral text.

``CostMeter`` holds one model's unsteered next-token log-probabilities on a ``NeutralText`` (and
its residuals at the steered block, from which the covariance-matched null directions are drawn);
``kl(u, alpha)`` is KL(unsteered || steered), in nats per scored token, with ``alpha x u`` added
to the output of that block at every position. ``scale_for_cost`` finds the scale at which a
direction costs a given KL: KL grows like alpha^2 for small alpha, so a secant in log-log
coordinates, bracketed, converges in a few forwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from saediff.errors import SaediffError
from saediff.evaluation.neutral import NeutralText
from saediff.interventions.steering import add_direction
from saediff.models.hooks import add_resid_hook
from saediff.models.loading import LoadedModel

__all__ = ["CostMeter", "kl_per_token", "scale_for_cost"]


def kl_per_token(ref_logp_NV: torch.Tensor, logp_NV: torch.Tensor) -> float:
    """Mean over rows of KL(ref || other) = sum_v p_ref (log p_ref - log p_other), in nats."""
    p = ref_logp_NV.exp()
    return float((p * (ref_logp_NV - logp_NV)).sum(-1).mean())


class CostMeter:
    """One model's unsteered log-probs on ``neutral`` at its scored positions, in float32, and its
    residuals after block ``layer`` there (``acts_ND``)."""

    def __init__(self, lm: LoadedModel, neutral: NeutralText, layer: int, batch_size: int = 16):
        n_layers = lm.model.config.num_hidden_layers
        if not 0 <= layer < n_layers:
            raise SaediffError(f"steering block {layer} is out of range: the model has {n_layers} blocks")
        self.lm, self.neutral, self.layer, self.batch_size = lm, neutral, layer, batch_size
        acts: list[torch.Tensor] = []

        def keep(resid_BTD):
            acts.append(resid_BTD.detach())
            return resid_BTD

        with add_resid_hook(lm.model, layer, keep):
            self.ref_logp_NV = self._logprobs()
        self.acts_ND = self._scored_rows(acts)
        self.evals = 0

    @torch.no_grad()
    def _logprobs(self) -> torch.Tensor:
        """Float32 log-probs (N, V) at the scored positions, rows in order, one forward per batch."""
        was_training = self.lm.model.training
        self.lm.model.eval()
        out = []
        rows = self.neutral.ids
        pad = self.lm.tokenizer.pad_token_id if self.lm.tokenizer.pad_token_id is not None else 0
        try:
            for i in range(0, len(rows), self.batch_size):
                chunk = rows[i : i + self.batch_size]
                T = max(len(r) for r in chunk)
                ids_BT = torch.full((len(chunk), T), pad, dtype=torch.long)
                mask_BT = torch.zeros((len(chunk), T), dtype=torch.long)
                for b, r in enumerate(chunk):
                    ids_BT[b, : len(r)] = torch.tensor(r)
                    mask_BT[b, : len(r)] = 1
                logits = self.lm.model(
                    input_ids=ids_BT.to(self.lm.device),
                    attention_mask=mask_BT.to(self.lm.device),
                    use_cache=False,
                ).logits
                for b, pos in enumerate(self.neutral.scored[i : i + self.batch_size]):
                    at = torch.tensor(pos, device=logits.device) - 1
                    out.append(logits[b, at].float().log_softmax(-1).cpu())
        finally:
            self.lm.model.train(was_training)
        return torch.cat(out)

    def _scored_rows(self, acts: list[torch.Tensor]) -> torch.Tensor:
        """The block's residuals (N, D) at the positions whose prediction is scored (j - 1)."""
        rows = []
        for k, a_BTD in enumerate(acts):
            for b, pos in enumerate(self.neutral.scored[k * self.batch_size : (k + 1) * self.batch_size]):
                rows.append(a_BTD[b, torch.tensor(pos) - 1].float().cpu())
        return torch.cat(rows)

    def kl(self, u: torch.Tensor, alpha: float) -> float:
        """KL(unsteered || steered) per scored token with ``alpha x u`` added after the block."""
        if alpha == 0:
            return 0.0
        self.evals += 1
        with add_direction(self.lm.model, self.layer, u, alpha):
            return kl_per_token(self.ref_logp_NV, self._logprobs())


def scale_for_cost(
    kl_of: Callable[[float], float],
    target: float,
    start: float,
    *,
    tol: float = 0.05,
    max_evals: int = 12,
    points: dict[float, float] | None = None,
    max_scale: float = 1e4,
) -> tuple[float, float, bool]:
    """The scale ``alpha`` > 0 at which ``kl_of(alpha)`` is within ``tol`` (relative) of ``target``:
    ``(alpha, kl, reached)``. ``points`` (scale -> KL) are earlier measurements of the same
    direction, reused and extended. KL is taken to rise with the scale; when it does not reach
    ``target`` by ``max_scale`` (or within ``max_evals``), the closest scale measured is returned
    with ``reached`` False."""
    if target <= 0:
        raise SaediffError(f"a steering cost must be positive, got {target}")
    pts = points if points is not None else {}

    def at(s: float) -> float:
        if s not in pts:
            pts[s] = kl_of(s)
        return pts[s]

    def close(k: float) -> bool:
        return abs(k / target - 1) <= tol

    s = start
    for _ in range(max_evals):
        for s0, k0 in pts.items():
            if close(k0):
                return s0, k0, True
        below = [(a, k) for a, k in pts.items() if k < target]
        above = [(a, k) for a, k in pts.items() if k > target]
        lo = max(below, default=None)
        hi = min(above, default=None)
        if lo and hi and lo[1] <= 0:
            s = math.sqrt(lo[0] * hi[0])
        elif lo and hi:  # log-log secant inside the bracket (KL ~ alpha^2 for small alpha)
            t = (math.log(target) - math.log(lo[1])) / (math.log(hi[1]) - math.log(lo[1]))
            s = math.exp(math.log(lo[0]) + t * (math.log(hi[0]) - math.log(lo[0])))
        elif lo:  # extrapolate with the quadratic law, at most 4x per step
            grow = math.sqrt(target / lo[1]) if lo[1] > 0 else 4.0
            s = min(lo[0] * min(grow, 4.0), max_scale)
            if s in pts:
                break
        elif hi:
            s = hi[0] * max(math.sqrt(target / hi[1]), 0.25) if hi[1] > 0 else hi[0] / 4
        at(s)
    best = min(pts.items(), key=lambda p: abs(math.log(max(p[1], 1e-30) / target)))
    return best[0], best[1], close(best[1])
