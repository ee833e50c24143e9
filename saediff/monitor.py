"""Drift monitor: an early-warning probe for any fine-tune, as a ``transformers`` callback.

Every ``every`` steps it reads, on held-out prompts with fixed (teacher-forced) answers, the
residual at one block and projects it on candidate directions (a mean difference, the persona
direction, SAE decoder rows), optionally with SAE latent activations and a behavioural EM rate.
Prompts, not tokens, are the independent units: each prompt's mean projection over its answer
tokens is compared with its own value at the previous check. The alert fires the first time

- the paired t statistic of those per-prompt changes exceeds ``z`` (the movement is real), and
- the mean change per training step exceeds ``rate_threshold`` (the movement is fast).

Ordinary fine-tuning also moves every prompt a little and consistently along any direction, so
a significance test alone fires on harmless fine-tunes. ``rate_threshold`` is calibrated on an
aligned-data control fine-tune with the same recipe (``calibrate_rate``: a margin above the
fastest movement the control showed); uncalibrated it is 0 (significance only).

    monitor = DriftMonitor(model, toks.input_ids, toks.select("response"), layer, direction[None])
    trainer = Trainer(..., callbacks=[monitor])      # or saediff.finetune.finetune(..., callbacks=[monitor])
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from transformers import TrainerCallback

from saediff.hooks import capture_resid
from saediff.errors import SaediffError

__all__ = ["DriftMonitor", "DriftHistory", "paired_t", "calibrate_rate"]

log = logging.getLogger(__name__)


@dataclass
class DriftHistory:
    steps: list[int] = field(default_factory=list)
    projection: list[float] = field(default_factory=list)
    """mean projection (residual . unit direction, averaged over directions, tokens and prompts)"""
    rate: list[float] = field(default_factory=list)
    """mean per-prompt change of the projection since the previous check, per training step"""
    t_stat: list[float] = field(default_factory=list)
    """paired t statistic (over prompts) of the change since the previous check"""
    alignment: list[float] = field(default_factory=list)
    """cosine between the mean residual change since the start and the (mean unit) direction: how
    much of what the fine-tune changes at this block lies along the direction"""
    latents: list[list[float]] = field(default_factory=list)
    em: list[float | None] = field(default_factory=list)
    threshold: float | None = None
    """the t statistic that must be exceeded"""
    rate_threshold: float | None = None
    """the rate that must be exceeded (calibrated on a control fine-tune)"""
    alert_step: int | None = None

    def to_json(self) -> dict:
        return asdict(self)


def paired_t(now: torch.Tensor, before: torch.Tensor) -> tuple[float, float]:
    """(mean, paired t) of the per-prompt change ``now - before`` (both (n_prompts,)):
    t = mean(d) / (sd(d) / sqrt(n))."""
    d = (now - before).double()
    n = d.numel()
    mean = float(d.mean())
    sd = float(d.std()) if n > 1 else 0.0
    return mean, (mean / (sd / n**0.5) if sd > 0 else (float("inf") if mean > 0 else 0.0))


def calibrate_rate(control: DriftHistory | dict, margin: float = 1.5) -> float:
    """``rate_threshold`` from a control fine-tune's monitor history (aligned data, same recipe,
    same prompts and direction): ``margin`` x the fastest rise it showed."""
    rates = control.rate if isinstance(control, DriftHistory) else control["rate"]
    rates = [r for r in rates[1:] if r == r]  # the first check has no previous one
    if not rates:
        raise SaediffError("calibrate_rate: the control history has fewer than two checks")
    return margin * max(0.0, max(rates))


class DriftMonitor(TrainerCallback):
    """Callback for the ``transformers`` Trainer (``on_train_begin`` / ``on_step_end``) and for
    ``saediff.finetune.train_lm`` (``monitor(step, loss)``; call ``monitor.check(-1)`` first)."""

    def __init__(self, model, input_ids: torch.Tensor, mask: torch.Tensor, layer: int, directions: torch.Tensor,
                 *, every: int = 25, z: float = 5.0, rate_threshold: float = 0.0, sae=None,
                 latents: list[int] | None = None, em_fn: Callable[[], float] | None = None, early: bool = False):
        """``input_ids`` (N, T), right-padded prompts with their answers; ``mask`` (N, T) bool: the
        answer tokens read; ``directions`` (k, d): the projection averages over their unit vectors.
        ``early``: also check after steps 1, 2, 4, ... below ``every`` (a fast fine-tune can move
        behaviour within its first ``every`` steps; the rate is per step, so it stays comparable)."""
        if mask.sum(1).min() < 1:
            raise SaediffError("DriftMonitor: every prompt needs at least one masked (answer) token")
        self.model, self.input_ids, self.mask, self.layer = model, input_ids, mask, layer
        self.U = directions / directions.norm(dim=-1, keepdim=True)  # (k, d)
        self.every, self.z, self.rate_threshold, self.early = every, z, rate_threshold, early
        self.sae, self.latents, self.em_fn = sae, latents or [], em_fn
        self.history = DriftHistory(threshold=z, rate_threshold=rate_threshold)
        self._start: torch.Tensor | None = None
        self._last: tuple[int, torch.Tensor] | None = None

    @torch.no_grad()
    def _measure(self) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        """Per-prompt mean projection (n_prompts,), per-prompt mean residual (n_prompts, d) and the
        mean latent activations."""
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        resid = capture_resid(self.model, [self.layer], self.input_ids.to(device))[self.layer].float()  # (N, T, D)
        if was_training:
            self.model.train()
        mask = self.mask.to(device).float()
        proj_NT = (resid @ self.U.to(device).float().T).mean(-1)
        per_prompt = (proj_NT * mask).sum(1) / mask.sum(1)
        mean_ND = (resid * mask[..., None]).sum(1) / mask.sum(1)[:, None]
        lat = []
        if self.sae is not None and self.latents:
            self.sae.to(device)
            lat = self.sae.encode(resid[mask.bool()].to(self.sae.W_enc.dtype))[:, self.latents].mean(0).tolist()
        return per_prompt.cpu(), mean_ND.cpu(), lat

    def check(self, step: int) -> None:
        """Measure after ``step`` (0-based; -1: before training) and update the alert."""
        proj, mean_ND, lat = self._measure()
        h = self.history
        if self._start is None:
            self._start, self._start_ND = proj, mean_ND
        rate, t = 0.0, 0.0
        if self._last is not None and step > self._last[0]:
            change, t = paired_t(proj, self._last[1])
            rate = change / (step - self._last[0])
        self._last = (step, proj)
        shift_D = (mean_ND - self._start_ND).mean(0)
        u = self.U.float().mean(0).cpu()
        h.steps.append(step + 1)
        h.projection.append(float(proj.mean()))
        h.rate.append(rate)
        h.t_stat.append(t)
        h.alignment.append(float(shift_D @ u / (shift_D.norm() * u.norm()).clamp_min(1e-12)))
        h.latents.append(lat)
        h.em.append(self.em_fn() if self.em_fn else None)
        if h.alert_step is None and t > self.z and rate > self.rate_threshold:
            h.alert_step = step + 1
            log.warning("drift monitor: projection rises %.3g per step (t=%.1f) at step %d", rate, t, step + 1)

    def due(self, n_steps: int) -> bool:
        """Whether to check after ``n_steps`` completed steps."""
        power_of_two = n_steps > 0 and n_steps & (n_steps - 1) == 0
        return n_steps % self.every == 0 or (self.early and power_of_two and n_steps < self.every)

    def __call__(self, step: int, loss: float) -> None:
        if self.due(step + 1):
            self.check(step)

    # transformers.TrainerCallback
    def on_train_begin(self, args, state, control, **kwargs):
        if self._start is None:
            self.check(state.global_step - 1)

    def on_step_end(self, args, state, control, **kwargs):
        if self.due(state.global_step):
            self.check(state.global_step - 1)
