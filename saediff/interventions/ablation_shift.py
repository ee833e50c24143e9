"""Ablations measured as the fine-tune's shift that survives them, not as levels.

Projecting a direction out of a model (or clamping its projection at the base model's mean) also
changes how *any* model reads the evaluation: under the pair metric, removing the axis the model
tells the two references apart by pushes every preference toward 0, so the fine-tune's level after
an ablation says little. What the ablation removes of the *fine-tune's change* is read instead,
per question (item):

    shift     = fine-tune - base                      (the change the fine-tune made)
    surviving = fine-tune ablated - base ablated      (what is left of it under the same ablation)
    removed   = shift - surviving

each a paired mean with its t interval, the surviving share with a paired bootstrap interval
(``evaluation.intervals.bootstrap_ratio``), and the removed part against the same figure for
null directions (random unit directions, ablated the same way in both models): an empirical
p-value. BLOCK-EM and CAFT models are evaluated without an intervention, so their cuts keep the
plain reading.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from saediff.evaluation.evals import Evaluator, evaluate_once
from saediff.evaluation.intervals import bootstrap_ratio
from saediff.interventions.steer_null import empirical_p, isotropic
from saediff.interventions.steer_protocol import item_scores, paired_effect, rates
from saediff.interventions.steering import clamp_projection, project_out
from saediff.models.loading import LoadedModel

__all__ = ["AblationShift", "ablation_null", "shift_figures"]


def shift_figures(ft: dict, base: dict, ft_ablated: dict, base_ablated: dict) -> dict:
    """Per-item scores (id -> score) of the four conditions -> ``shift``, ``surviving`` and
    ``removed`` (paired means with t intervals, over the items all four hold) and
    ``surviving_share`` (surviving / shift, paired bootstrap)."""
    ids = sorted(set(ft) & set(base) & set(ft_ablated) & set(base_ablated), key=str)
    shift = {i: ft[i] - base[i] for i in ids}
    surviving = {i: ft_ablated[i] - base_ablated[i] for i in ids}
    removed = {i: shift[i] - surviving[i] for i in ids}
    out = {}
    for key, d in (("shift", shift), ("surviving", surviving), ("removed", removed)):
        e = paired_effect(d.values())
        out[key], out[f"{key}_ci"] = e["effect"], e["effect_ci"]
    share = bootstrap_ratio(surviving, shift) if len(ids) >= 2 else {"ratio": None, "ci": None}
    out.update(surviving_share=share["ratio"], surviving_share_ci=share["ci"], n=len(ids))
    return out


class AblationShift:
    """The ablation checks of one run: the fine-tune ``lm_ft`` and the base ``lm_base`` on
    ``report``'s items, unablated (``ref``) and with each direction projected out of / clamped in
    both, at ``layer`` and after every block; the ``null`` directions (name -> unit vector, see
    ``ablation_null``) are ablated the same way. Every condition is cached under ``folder/report``."""

    def __init__(
        self,
        lm_ft: LoadedModel,
        lm_base: LoadedModel,
        report: Evaluator,
        folder: Path,
        layer: int,
        null: dict[str, torch.Tensor],
    ):
        self.lm_ft, self.lm_base, self.report, self.folder, self.layer = lm_ft, lm_base, report, folder, layer
        self.n_layers = lm_ft.model.config.num_hidden_layers
        self.ref = {
            "ft": self._em(lm_ft, "finetuned", None),
            "base": self._em(lm_base, "base", None),
        }
        self.null = null
        self._null_figs: dict = {}

    def _em(self, lm: LoadedModel, cond: str, ctx) -> dict:
        return evaluate_once(self.report, lm, self.folder / "report" / cond, cond, ctx)

    def _blocks(self, where: str) -> list[int]:
        return [self.layer] if where == "layer" else list(range(self.n_layers))

    def _ctx(self, lm: LoadedModel, kind: str, where: str, vector: torch.Tensor, means: dict | None):
        blocks = self._blocks(where)
        if kind == "project":
            return project_out(lm.model, self.layer if where == "layer" else "all", vector)
        return clamp_projection(lm.model, {b: means[b] for b in blocks}, vector)

    def figures(self, name: str, vector: torch.Tensor, base_means: dict[int, float] | None) -> dict:
        """``{"project": {"layer": ..., "all": ...}, "clamp": {...}}`` for one direction (``base_means``:
        the base model's mean projection on its unit vector per block, for clamping; None: no clamp)."""
        out: dict = {}
        for kind in ("project", "clamp") if base_means is not None else ("project",):
            out[kind] = {}
            for where in ("layer", "all"):
                cond = f"{name}_{kind}_{where}"
                ft = self._em(self.lm_ft, cond, self._ctx(self.lm_ft, kind, where, vector, base_means))
                base = self._em(
                    self.lm_base, f"{cond}_base", self._ctx(self.lm_base, kind, where, vector, base_means)
                )
                fig = shift_figures(*(item_scores(x) for x in (self.ref["ft"], self.ref["base"], ft, base)))
                out[kind][where] = {**rates(ft), "base_ablated_em_rate": base["em_rate"], **fig}
        return out

    def with_null(self, figs: dict, base_means_null: dict[str, dict[int, float]] | None) -> dict:
        """``figs`` with, per ablation, the null directions' removed parts, their mean and the
        candidate's empirical p-value ((1 + nulls removing at least as much) / (1 + nulls))."""
        if not self._null_figs:
            for n, v in self.null.items():
                self._null_figs[n] = self.figures(
                    n, v, None if base_means_null is None else base_means_null[n]
                )
        for kind, per in figs.items():
            for where, f in per.items():
                null = [
                    self._null_figs[n][kind][where]["removed"]
                    for n in self.null
                    if kind in self._null_figs[n]
                ]
                if null:
                    f["null_removed"] = null
                    f["null_removed_mean"] = float(np.mean(null))
                    f["p_value"] = empirical_p(f["removed"], null)
        return figs


def ablation_null(d_model: int, n: int, seed: int) -> dict[str, torch.Tensor]:
    """The ablation's null: ``n`` isotropic unit directions (``steer_null.isotropic``), by name."""
    return {f"ablation_{d.name}_s{d.seed}": d.vector for d in isotropic(d_model, n, seed)}
