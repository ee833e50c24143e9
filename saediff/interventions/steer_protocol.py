"""saediff's one steering protocol, ``select_and_report``: a scale chosen on one half of the
questions under a coherence budget, every figure reported on the other half beside random
directions of the same norm. ``saediff steer``, ``saediff discover``, the neighbourhood probe's
``--steer`` check and the organism's steering check all call it, so a fix to how a scale is chosen
reaches every one of them.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from saediff.errors import SaediffError
from saediff.evaluation.evals import Evaluator, evaluate_once
from saediff.interventions.steering import add_direction
from saediff.models.loading import LoadedModel

__all__ = [
    "NO_COHERENT_SCALE",
    "Arm",
    "Selection",
    "SteerSelection",
    "induce_summary",
    "random_units",
    "rates",
    "select_and_report",
    "steer_headline",
]

log = logging.getLogger(__name__)


def random_units(d_model: int, n: int, seed: int) -> list[torch.Tensor]:
    """``n`` seeded random unit vectors of length ``d_model`` (the protocol's control directions)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        v = torch.randn(d_model, generator=g)
        out.append(v / v.norm())
    return out


NO_COHERENT_SCALE = (
    "no scale kept the coherent rate within the budget of the unsteered model's on the select "
    "half: nothing reported, nothing kept"
)


@dataclass(frozen=True)
class Arm:
    """One model the protocol steers. ``sign`` +1 adds the candidate direction, -1 subtracts it;
    the arm's *effect* is ``sign x (EM steered - EM unsteered)``: the EM that steering the base model
    toward the fine-tune's change adds (induce, +1), or that steering the fine-tune back removes
    (repair, -1)."""

    name: str
    lm: LoadedModel
    sign: float = 1.0
    unsteered: str = "base"
    """folder name of this arm's unsteered evaluation (under ``select/`` and ``report/``)"""


@dataclass(frozen=True)
class Selection:
    """One candidate through the protocol."""

    passed: bool
    """some scale kept every arm's coherent rate within the budget on the select half"""
    scale: float | None
    """the scale chosen on the select half (None when none passed: then nothing is reported)"""
    scale_abs: float | None
    """``scale`` x the protocol's unit: the norm of the added vector"""
    select_sweep: dict
    """per scale: each arm's select-half rate, their summed ``effect``, the largest ``coherence_drop``
    and whether it stays within the budget (``coherent``)"""
    report: dict | None
    """per arm, on the report half at ``scale``: the rate and its 95% interval, ``effect``,
    ``coherence_drop``, and the random directions of the same norm beside it (``random``,
    ``random_mean_em_rate``, ``random_effect``)"""

    def to_json(self) -> dict:
        return {**asdict(self), "note": None if self.passed else NO_COHERENT_SCALE}


@dataclass(frozen=True)
class SteerSelection:
    unsteered: dict
    """per arm: the unsteered model's rate on the ``select`` and the ``report`` half"""
    coherence_floor: dict
    """per arm: the coherent rate a scale must keep on the select half"""
    candidates: dict[str, Selection]


def select_and_report(
    candidates: dict[str, torch.Tensor],
    arms: list[Arm],
    layer: int,
    scales: tuple[float, ...],
    unit: float,
    select: Evaluator,
    report: Evaluator,
    folder: Path,
    *,
    n_random: int = 3,
    coherence_budget: float = 0.10,
    seed: int = 0,
) -> SteerSelection:
    """saediff's steering protocol. Each candidate (a direction of shape ``(d_model,)``; only its
    unit vector matters) is added at block ``layer`` as ``sign x scale x unit x u`` to every arm's
    model. The scale is chosen on ``select``'s questions: the largest summed effect among the scales
    whose coherent rate falls by at most ``coherence_budget`` from the unsteered model's in every arm.
    Every reported figure comes from ``report``'s questions at that scale, beside ``n_random`` random
    directions of the same norm (shared by the candidates chosen at that scale: a random direction's
    distribution does not depend on the candidate). A candidate with no coherent scale says so
    (``passed`` False) and gets no figures: there is no fallback to an incoherent scale.
    Conditions are cached under ``folder/select/`` and ``folder/report/`` (a rerun resumes)."""
    scales = tuple(scales)
    if not candidates:
        raise SaediffError("select_and_report: no candidate directions")
    if not scales or min(scales) <= 0:
        raise SaediffError(f"steering scales must be positive, got {scales}")
    run = _Protocol(arms, layer, scales, unit, select, report, folder, n_random, coherence_budget, seed)
    ref = {
        a.name: {"select": run.em(a, select, a.unsteered), "report": run.em(a, report, a.unsteered)}
        for a in arms
    }
    floor = {a: r["select"]["coherent_rate"] - coherence_budget for a, r in ref.items()}
    d_model = next(iter(candidates.values())).shape[-1]
    out = {}
    for name, vec in candidates.items():
        u = vec.detach().float().cpu()
        u = u / u.norm()
        sweep = run.sweep(name, u, ref)
        ok = [s for s in scales if sweep[f"{s:g}"]["coherent"]]
        if not ok:
            log.info("%s: %s", name, NO_COHERENT_SCALE)
            out[name] = Selection(False, None, None, sweep, None)
            continue
        best = max(ok, key=lambda s: sweep[f"{s:g}"]["effect"])
        out[name] = Selection(True, best, best * unit, sweep, run.held(name, u, best, ref, d_model))
    return SteerSelection(ref, floor, out)


@dataclass
class _Protocol:
    """One call of ``select_and_report``: its settings, the conditions it evaluates (cached on disk
    under ``folder/select`` and ``folder/report``) and the random directions' rates per scale."""

    arms: list[Arm]
    layer: int
    scales: tuple[float, ...]
    unit: float
    select: Evaluator
    report: Evaluator
    folder: Path
    n_random: int
    coherence_budget: float
    seed: int
    randoms: dict[float, dict[str, list[dict]]] = field(default_factory=dict)

    def em(
        self, arm: Arm, half: Evaluator, name: str, u: torch.Tensor | None = None, alpha: float = 0.0
    ) -> dict:
        """``arm``'s model on ``half``'s questions, steered by ``alpha x u`` (signed by the arm)
        when ``u`` is given."""
        ctx = None if u is None else add_direction(arm.lm.model, self.layer, arm.sign * u, alpha)
        where = self.folder / ("select" if half is self.select else "report") / name
        return rates(evaluate_once(half, arm.lm, where, name, ctx))

    def sweep(self, name: str, u: torch.Tensor, ref: dict) -> dict:
        """Per scale, on the select half: each arm's rates, their summed effect over the unsteered
        rates ``ref``, the largest coherence drop and whether it stays within the budget."""
        sweep = {}
        for s in self.scales:
            by_arm = {
                a.name: self.em(a, self.select, f"{name}_{a.name}_x{s:g}", u, s * self.unit)
                for a in self.arms
            }
            drop = max(ref[a]["select"]["coherent_rate"] - r["coherent_rate"] for a, r in by_arm.items())
            effect = sum(
                a.sign * (by_arm[a.name]["em_rate"] - ref[a.name]["select"]["em_rate"]) for a in self.arms
            )
            sweep[f"{s:g}"] = {
                **by_arm,
                "effect": effect,
                "coherence_drop": drop,
                "coherent": drop <= self.coherence_budget + 1e-12,
            }
        return sweep

    def held(self, name: str, u: torch.Tensor, best: float, ref: dict, d_model: int) -> dict:
        """Per arm, on the report half at scale ``best``: the rates, the effect and coherence drop
        over the unsteered ``ref``, and the random directions of the same norm beside them."""
        rnd = self.random_rates(best, d_model)
        held = {}
        for a in self.arms:
            r, base = (
                self.em(a, self.report, f"{name}_{a.name}_x{best:g}", u, best * self.unit),
                ref[a.name]["report"],
            )
            mean = sum(x["em_rate"] for x in rnd[a.name]) / len(rnd[a.name])
            held[a.name] = {
                **r,
                "effect": a.sign * (r["em_rate"] - base["em_rate"]),
                "coherence_drop": base["coherent_rate"] - r["coherent_rate"],
                "random": rnd[a.name],
                "random_mean_em_rate": mean,
                "random_effect": a.sign * (mean - base["em_rate"]),
            }
        return held

    def random_rates(self, s: float, d_model: int) -> dict[str, list[dict]]:
        """Per arm, the report-half rates of ``n_random`` random directions at scale ``s`` (drawn
        once per scale and shared by every candidate chosen there)."""
        if s not in self.randoms:
            units = random_units(d_model, self.n_random, self.seed + 1000 * self.scales.index(s))
            self.randoms[s] = {
                a.name: [
                    self.em(a, self.report, f"random{k}_seed{self.seed}_{a.name}_x{s:g}", v, s * self.unit)
                    for k, v in enumerate(units)
                ]
                for a in self.arms
            }
        return self.randoms[s]


def induce_summary(c: Selection, arm: str = "induce") -> dict:
    """One candidate's figures under a single-arm protocol, flat: the chosen scale and the
    report-half rate beside the random directions' (all None, with a note, when no scale passed)."""
    r = (c.report or {}).get(arm) or {}
    return {
        "scale": c.scale,
        "scale_abs": c.scale_abs,
        "coherent_scale_found": c.passed,
        "select_sweep": {s: row[arm] for s, row in c.select_sweep.items()},
        **{k: r.get(k) for k in ("em_rate", "em_rate_ci", "coherent_rate", "n_responses")},
        "random": r.get("random", []),
        "random_mean_em_rate": r.get("random_mean_em_rate"),
        "note": None if c.passed else NO_COHERENT_SCALE,
    }


def steer_headline(sel, name: str) -> dict:
    """The candidate's report-half effect beside the random directions' (None with a note when no scale passed)."""
    c = sel.candidates[name]
    if not c.passed:
        return {"scale": None, "note": c.to_json()["note"]}
    r = c.report["induce"]
    return {
        "scale": c.scale,
        "em_rate": r["em_rate"],
        "em_rate_ci": r["em_rate_ci"],
        "effect": r["effect"],
        "random_effect": r["random_effect"],
        "random_em_rates": [x["em_rate"] for x in r["random"]],
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
