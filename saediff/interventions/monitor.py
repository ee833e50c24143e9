"""Drift monitor: an early-warning probe for any fine-tune, as a ``transformers`` callback.

Every ``every`` steps it reads, on held-out prompts with fixed (teacher-forced) answers, the
residual at one block and projects it on candidate directions (a mean difference, the persona
direction, SAE decoder rows), optionally with SAE latent activations and a behavioural EM rate.
Prompts, not tokens, are the independent units: each prompt's mean projection over its answer
tokens is compared with its own value at the previous check. The alert fires the first time

- the paired t statistic of those per-prompt changes exceeds ``z`` (the movement is real), and
- the mean change per training step exceeds the rate threshold (the movement is fast),

at ``confirm`` consecutive checks (default 2; the alert step is the last of them).

Ordinary fine-tuning also moves every prompt a little and consistently along any direction, so
a significance test alone fires on harmless fine-tunes. The rate threshold is calibrated on an
aligned-data control fine-tune with the same recipe: ``calibrate_rates`` gives one per check, a
margin above the control's rate *at the same step* (floored at a tenth of its fastest, so a step
where the control happens to stand still does not make any motion an alarm); ``calibrate_rate``
the single margin above its fastest rise, used at steps the control did not check. Uncalibrated
it is 0 (significance only). Why per step and confirmed: the first optimizer steps move every
fine-tune fastest, and a blocked fine-tune's first step is the plain fine-tune's (the latent
penalty is zero at the base weights), so a single early check against one global threshold
alerts on a run whose EM never comes.

The same statistics are read along ``n_random`` random directions of the same norm as the
monitored one (seeded): ``shift`` (the change since the start) beside ``random_shift`` shows
whether the direction moves more than an arbitrary one does (``DriftHistory.versus_random``).

    monitor = DriftMonitor(model, toks.input_ids, toks.select("response"), layer, direction[None])
    trainer = Trainer(..., callbacks=[monitor])      # or saediff.interventions.finetune.finetune(..., callbacks=[monitor])
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from transformers import TrainerCallback

from saediff.errors import SaediffError
from saediff.models.hooks import capture_resid

__all__ = ["DriftHistory", "DriftMonitor", "calibrate_rate", "calibrate_rates", "paired_t"]

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
    shift: list[float] = field(default_factory=list)
    """mean per-prompt change of the projection since the start (before training)"""
    random_shift: list[list[float]] = field(default_factory=list)
    """per check, the same along each norm-matched random direction (the sign of a random direction
    is arbitrary: compare magnitudes)"""
    random_rate: list[list[float]] = field(default_factory=list)
    """per check, ``rate`` along each random direction"""
    threshold: float | None = None
    """the t statistic that must be exceeded"""
    rate_threshold: float | None = None
    """the rate that must be exceeded where no per-step threshold is set (calibrated on a control)"""
    rate_thresholds: dict[int, float] | None = None
    """per check step: the rate that must be exceeded there (``calibrate_rates``)"""
    confirm: int = 1
    """consecutive checks that must pass both thresholds"""
    alert_step: int | None = None

    def to_json(self) -> dict:
        return asdict(self)

    def versus_random(self) -> dict:
        """The monitored direction against the random ones at the last check (``shift``: its change
        since the start; ``random_abs_mean`` / ``random_abs_max``: the random directions' |change|;
        ``share_below``: the share of random directions whose |change| is below the direction's
        signed change; ``beats_random``: above all of them) and at the alert, the same for the rate."""
        if not self.shift:
            return {}
        out = _against(self.shift[-1], self.random_shift[-1])
        if self.alert_step is not None:
            i = self.steps.index(self.alert_step)
            out["at_alert"] = _against(self.rate[i], self.random_rate[i])
        return out


def _against(value: float, randoms: list[float]) -> dict:
    mags = [abs(r) for r in randoms]
    if not mags:
        return {"value": value}
    return {
        "value": value,
        "random_abs_mean": sum(mags) / len(mags),
        "random_abs_max": max(mags),
        "share_below": sum(m < value for m in mags) / len(mags),
        "beats_random": value > max(mags),
    }


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


def calibrate_rates(
    control: DriftHistory | dict, margin: float = 1.5, floor: float = 0.1
) -> dict[int, float]:
    """Per-step rate thresholds from a control fine-tune's monitor history (same recipe, prompts,
    direction and schedule): at each check step, ``margin`` x the control's rate at that step,
    floored at ``floor`` x its fastest rise. A run is then compared with what ordinary fine-tuning
    does at the same point of training (the first steps move every fine-tune most)."""
    steps = control.steps if isinstance(control, DriftHistory) else control["steps"]
    peak = calibrate_rate(control, 1.0)
    rates = control.rate if isinstance(control, DriftHistory) else control["rate"]
    return {
        int(s): margin * max(0.0 if math.isnan(r) else r, floor * peak)
        for s, r in list(zip(steps, rates))[1:]
    }


class DriftMonitor(TrainerCallback):
    """Callback for the ``transformers`` Trainer (``on_train_begin`` / ``on_step_end``) and for
    ``saediff.interventions.finetune.train_lm`` (``monitor(step, loss)``; call ``monitor.check(-1)`` first)."""

    def __init__(
        self,
        model,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        layer: int,
        directions: torch.Tensor,
        *,
        every: int = 25,
        z: float = 5.0,
        rate_threshold: float = 0.0,
        rate_thresholds: dict[int, float] | None = None,
        confirm: int = 2,
        n_random: int = 8,
        seed: int = 0,
        sae=None,
        latents: list[int] | None = None,
        em_fn: Callable[[], float] | None = None,
        early: bool = False,
    ):
        """``input_ids`` (N, T), right-padded prompts with their answers; ``mask`` (N, T) bool: the
        answer tokens read; ``directions`` (k, d): the projection averages over their unit vectors.
        ``rate_thresholds``: {check step (1-based, as in the history): rate} from ``calibrate_rates``;
        steps without one use ``rate_threshold``. ``confirm``: consecutive checks that must pass.
        ``n_random``: random directions (seed ``seed``) with the norm of the mean unit direction,
        read alongside. ``early``: also check after steps 1, 2, 4, ... below ``every`` (a fast
        fine-tune can move behaviour within its first ``every`` steps; the rate is per step, so it
        stays comparable)."""
        if mask.sum(1).min() < 1:
            raise SaediffError("DriftMonitor: every prompt needs at least one masked (answer) token")
        if confirm < 1:
            raise SaediffError(f"DriftMonitor: confirm must be at least 1, got {confirm}")
        self.model, self.input_ids, self.mask, self.layer = model, input_ids, mask, layer
        self.U = directions / directions.norm(dim=-1, keepdim=True)  # (k, d)
        g = torch.Generator().manual_seed(seed + 7717)
        R = torch.randn(n_random, self.U.shape[1], generator=g, dtype=torch.float64)
        # norm-matched: the projection along U averages k unit directions, i.e. reads resid . mean(U)
        self.R = (R / R.norm(dim=-1, keepdim=True) * self.U.double().mean(0).norm()).float()  # (n_random, d)
        self.every, self.z, self.rate_threshold, self.early = every, z, rate_threshold, early
        self.rate_thresholds = {int(k): float(v) for k, v in (rate_thresholds or {}).items()} or None
        self.confirm = confirm
        self.sae, self.latents, self.em_fn = sae, latents or [], em_fn
        self.history = DriftHistory(
            threshold=z, rate_threshold=rate_threshold, rate_thresholds=self.rate_thresholds, confirm=confirm
        )
        self._start: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._last: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self._passed = 0  # consecutive checks past both thresholds

    @torch.no_grad()
    def _capture(self) -> torch.Tensor:
        """The residual after block ``layer`` on the monitor's prompts, (N, T, D) float32."""
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        resid = capture_resid(self.model, [self.layer], self.input_ids.to(device))[self.layer].float()
        if was_training:
            self.model.train()
        return resid

    def check(self, step: int) -> None:
        """Measure after ``step`` (0-based; -1: before training) and update the alert."""
        self.observe(step, self._capture())

    @torch.no_grad()
    def observe(self, step: int, resid_NTD: torch.Tensor) -> None:
        """Update the history and the alert from the residual ``resid_NTD`` (N, T, D) read after
        ``step`` (0-based; -1: before training). ``check`` captures it from the model."""
        device = resid_NTD.device
        mask = self.mask.to(device).float()  # (N, T)
        n_tok = mask.sum(1)
        proj = ((resid_NTD @ self.U.to(device).float().T).mean(-1) * mask).sum(1).cpu() / n_tok.cpu()  # (N,)
        proj_NK = (torch.einsum("ntd,kd->ntk", resid_NTD, self.R.to(device)) * mask[..., None]).sum(
            1
        ).cpu() / n_tok.cpu()[:, None]  # (N, n_random)
        mean_ND = ((resid_NTD * mask[..., None]).sum(1) / n_tok[:, None]).cpu()
        lat = []
        if self.sae is not None and self.latents:
            self.sae.to(device)
            lat = (
                self.sae.encode(resid_NTD[mask.bool()].to(self.sae.W_enc.dtype))[:, self.latents]
                .mean(0)
                .tolist()
            )
        h = self.history
        if self._start is None:
            self._start = (proj, proj_NK, mean_ND)
        rate, t, rate_K = 0.0, 0.0, [0.0] * proj_NK.shape[1]
        if self._last is not None and step > self._last[0]:
            change, t = paired_t(proj, self._last[1])
            rate = change / (step - self._last[0])
            rate_K = ((proj_NK - self._last[2]).double().mean(0) / (step - self._last[0])).tolist()
        self._last = (step, proj, proj_NK)
        shift_D = (mean_ND - self._start[2]).mean(0)
        u = self.U.float().mean(0).cpu()
        h.steps.append(step + 1)
        h.projection.append(float(proj.mean()))
        h.rate.append(rate)
        h.t_stat.append(t)
        h.alignment.append(float(shift_D @ u / (shift_D.norm() * u.norm()).clamp_min(1e-12)))
        h.latents.append(lat)
        h.shift.append(float((proj - self._start[0]).double().mean()))
        h.random_shift.append((proj_NK - self._start[1]).double().mean(0).tolist())
        h.random_rate.append(rate_K)
        h.em.append(self.em_fn() if self.em_fn else None)
        bar = (self.rate_thresholds or {}).get(step + 1, self.rate_threshold)
        self._passed = self._passed + 1 if t > self.z and rate > bar else 0
        if h.alert_step is None and self._passed >= self.confirm:
            h.alert_step = step + 1
            log.warning(
                "drift monitor: projection rises %.3g per step (t=%.1f) at step %d, %d checks in a row",
                rate,
                t,
                step + 1,
                self.confirm,
            )

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
