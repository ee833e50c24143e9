"""Drift monitor: an early-warning probe for any fine-tune.

Every ``every`` steps it measures, on held-out off-domain prompts (teacher-forced answers), the
mean projection of the residual at one layer onto candidate directions, optionally SAE latent
activations and the behavioural EM rate; it raises an alert the first time the projection
rises significantly: the per-token shift since step 0 (the same held-out tokens each time) has a
paired t statistic above ``z``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from saediff.hooks import capture_resid

__all__ = ["DriftMonitor", "DriftHistory"]

log = logging.getLogger(__name__)


@dataclass
class DriftHistory:
    steps: list[int] = field(default_factory=list)
    projection: list[float] = field(default_factory=list)
    """mean projection (residual . unit direction, averaged over directions and tokens)"""
    latents: list[list[float]] = field(default_factory=list)
    em: list[float | None] = field(default_factory=list)
    t_stat: list[float] = field(default_factory=list)
    """paired t statistic of the per-token projection shift since the first check"""
    threshold: float | None = None
    """the t statistic that raises the alert"""
    alert_step: int | None = None

    def to_json(self) -> dict:
        return asdict(self)


class DriftMonitor:
    """Callback for ``train_lm``: ``monitor(step, loss)``; call ``monitor.check(-1)`` before training."""

    def __init__(self, model, input_ids: torch.Tensor, mask: torch.Tensor, layer: int, directions: torch.Tensor,
                 *, every: int = 25, z: float = 5.0, min_shift: float = 0.0, sae=None, latents: list[int] | None = None,
                 em_fn: Callable[[], float] | None = None):
        self.model, self.input_ids, self.mask, self.layer = model, input_ids, mask, layer
        self.U = directions / directions.norm(dim=-1, keepdim=True)  # (k, d)
        self.every, self.z, self.sae, self.latents, self.em_fn = every, z, sae, latents or [], em_fn
        self.min_shift = min_shift  # optional: also require this mean shift (projection units)
        self.history = DriftHistory()

    @torch.no_grad()
    def _measure(self) -> tuple[torch.Tensor, list[float]]:
        was_training = self.model.training
        self.model.eval()
        resid = capture_resid(self.model, [self.layer], self.input_ids)[self.layer]
        if was_training:
            self.model.train()
        r = resid[self.mask].float()  # (n_tok, d)
        proj = (r @ self.U.T).mean(-1)  # (n_tok,)
        lat = []
        if self.sae is not None and self.latents:
            lat = self.sae.encode(r)[:, self.latents].mean(0).tolist()
        return proj, lat

    def check(self, step: int) -> None:
        proj, lat = self._measure()
        h = self.history
        if h.threshold is None:
            h.threshold = self.z
            self._proj0 = proj
        shift = proj - self._proj0
        se = float(shift.std()) / max(1, shift.numel()) ** 0.5
        t = float(shift.mean()) / se if se > 0 else 0.0
        h.steps.append(step + 1)
        h.projection.append(float(proj.mean()))
        h.t_stat.append(t)
        h.latents.append(lat)
        h.em.append(self.em_fn() if self.em_fn else None)
        if h.alert_step is None and t > h.threshold and float(shift.mean()) > self.min_shift:
            h.alert_step = step + 1
            log.warning("drift monitor: projection shift t=%.1f > %.1f at step %d", t, h.threshold, step + 1)

    def __call__(self, step: int, loss: float) -> None:
        if (step + 1) % self.every == 0:
            self.check(step)
