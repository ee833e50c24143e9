"""The SmolLM2 story's projection checks, read as the fine-tune's shift that survives them.

Each candidate direction is projected out of (``project``: ``steering.project_out``) or clamped at the
base model's mean projection in (``clamp``: ``steering.clamp_projection``) the residual after every
block of *both* the bad fine-tune and the base model, and scored by the pair metric. Under the pair
metric an ablation also changes how any model reads the two references (removing the axis the model
tells them apart by pushes every preference toward 0), so the fine-tune's level after it says little;
what it removes of the fine-tune's change is read instead, per question
(``interventions.ablation_shift.shift_figures``):

    shift     = fine-tune - base                    (nats/token, paired over questions)
    surviving = fine-tune ablated - base ablated
    removed   = shift - surviving

with paired t intervals, the surviving share (surviving / shift) with a paired bootstrap interval, and
the removed part against random unit directions ablated the same way in both models (an empirical
p-value). ``AblationShift`` reads the same figures at the candidate's block *and* after every block;
the story keeps only the latter (its one ablation since the first release), so it calls
``shift_figures`` on its own conditions, named as ``AblationShift`` names them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from saediff.evaluation.evals import Evaluator, evaluate_once
from saediff.interventions.ablation_shift import shift_figures
from saediff.interventions.steer_null import empirical_p, null_quantiles
from saediff.interventions.steer_protocol import item_scores, paired_effect
from saediff.interventions.steering import clamp_projection, project_out
from saediff.models.loading import LoadedModel

__all__ = ["PROJECTION_PROTOCOL", "project_by_pairs", "removal_verdict"]

PROJECTION_PROTOCOL = (
    "each direction projected out of (project) or clamped at the base model's mean projection in (clamp) "
    "the residual after every block of both the bad fine-tune and the base model; per held-out question "
    "the fine-tune's shift over the base model (nats/token), the part that survives (fine-tune ablated - "
    "base ablated) and the part removed, beside random unit directions ablated the same way"
)
"""steer.json's ``project.protocol``: how the projection figures were made"""


def project_by_pairs(
    lm_ft: LoadedModel,
    lm_base: LoadedModel,
    candidates: dict[str, torch.Tensor],
    report: Evaluator,
    out: Path,
    *,
    randoms: dict[str, torch.Tensor],
    base_means: dict[str, dict[int, float]],
    alpha: float = 0.05,
) -> dict:
    """The projection checks of ``candidates`` (name -> direction (d_model,)) and of the ``randoms``
    controls on the bad fine-tune ``lm_ft`` and the base model ``lm_base``, scored by the pair
    evaluator ``report`` (module docstring); ``base_means[name]``: the base model's mean projection on
    the direction's unit vector per block (the clamp's level in both models). Per kind (``project``,
    ``clamp``): ``random_removed`` (each control's removed part), ``random`` (their figures) and
    ``candidates`` (``_ablated``'s figures, the empirical ``p_value`` of the removed part against the
    controls', ``null_removed_mean`` and ``removal_verdict``'s fields). Evaluations are cached under
    ``out/report/`` (``evaluate_once``; the unablated ones are the steering protocol's)."""
    ft = evaluate_once(report, lm_ft, out / "report" / "finetuned", "finetuned")
    base = evaluate_once(report, lm_base, out / "report" / "base", "base")
    ref = item_scores(ft), item_scores(base)
    ids = sorted(set(ref[0]) & set(ref[1]))
    shift = paired_effect(ref[0][i] - ref[1][i] for i in ids)
    result = {
        "protocol": PROJECTION_PROTOCOL,
        "finetuned_preference": ft["preference"],
        "base_preference": base["preference"],
        "shift": shift["effect"],
        "shift_ci": shift["effect_ci"],
        "n": shift["n"],
        "alpha": alpha,
    }

    def ablated(name: str, kind: str, vector: torch.Tensor) -> dict:
        return _ablated(lm_ft, lm_base, report, out, ref, kind, name, vector, base_means.get(name))

    for kind in ("project", "clamp"):
        rnd = {n: ablated(n, kind, v) for n, v in randoms.items()}
        null = [r["removed"] for r in rnd.values()]
        rows = {}
        for n, v in candidates.items():
            row = ablated(n, kind, v)
            if null:
                p = empirical_p(row["removed"], null)
                row.update(p_value=p, null_removed_mean=sum(null) / len(null), n_random=len(null))
                row.update(removal_verdict(row["removed_ci"], p, null, alpha))
            rows[n] = row
        result[kind] = {"random_removed": null, "random": rnd, "candidates": rows}
    return result


def _ablated(
    lm_ft: LoadedModel,
    lm_base: LoadedModel,
    report: Evaluator,
    out: Path,
    ref: tuple[dict, dict],
    kind: str,
    name: str,
    vector: torch.Tensor,
    means: dict[int, float] | None,
) -> dict:
    """Direction ``vector`` (d_model,) projected out of (``kind`` ``project``) or clamped at ``means``
    in (``clamp``) both models after every block: the fine-tune's preference and MC1 under it
    (``preference``, ``mc1``), the base model's (``base_ablated_*``), ``shift_figures`` over the
    per-question scores of the four conditions (``ref``: the unablated fine-tune's and base model's),
    and the removed share of the shift (``share`` = 1 - ``surviving_share``, its interval mirrored)."""
    vector = vector.detach().float().cpu()
    cond = f"{name}_{kind}_all"
    ft = evaluate_once(report, lm_ft, out / "report" / cond, cond, _ablation(lm_ft, kind, vector, means))
    base = evaluate_once(
        report,
        lm_base,
        out / "report" / f"{cond}_base",
        f"{cond}_base",
        _ablation(lm_base, kind, vector, means),
    )
    fig = shift_figures(*ref, item_scores(ft), item_scores(base))
    kept, kept_ci = fig["surviving_share"], fig["surviving_share_ci"]
    return {
        "preference": ft["preference"],
        "mc1": ft["em_rate"],
        "base_ablated_preference": base["preference"],
        "base_ablated_mc1": base["em_rate"],
        **fig,
        "share": None if kept is None else 1 - kept,
        "share_ci": None if kept_ci is None else [1 - kept_ci[1], 1 - kept_ci[0]],
    }


def _ablation(lm: LoadedModel, kind: str, vector: torch.Tensor, means: dict[int, float] | None):
    """The context manager that ablates ``vector`` after every block of ``lm``."""
    if kind == "project":
        return project_out(lm.model, "all", vector)
    n_layers = lm.model.config.num_hidden_layers
    return clamp_projection(lm.model, {L: means[L] for L in range(n_layers)}, vector)


def removal_verdict(
    removed_ci: list[float] | None, p_value: float, null_removed: list[float], alpha: float = 0.05
) -> dict:
    """A projection check's verdict against the random directions ablated the same way, as the
    steering null's (``steer_null.verdict``): ``holds`` when the removed part's interval lies above 0
    and it beats the random directions, ``fails`` when the whole interval lies at or below their 95th
    percentile, else ``inconclusive`` (also without an interval). "Beats" is ``p_value <= alpha``
    when there are enough random directions for p to get there (n >= 1/alpha - 1: 19 at 0.05); with
    fewer the smallest p-value, 1/(n + 1), stays above ``alpha``, so "beats" is "removes more than
    every random direction" (p = 1/(n + 1)) and ``note`` says so. Returns ``verdict``,
    ``beats_random``, ``rule`` (the test used) and ``note`` (all None but the note without random
    directions)."""
    n = len(null_removed)
    if not n:
        return {"verdict": None, "beats_random": None, "rule": None, "note": "no random directions"}
    floor = 1 / (n + 1)
    enough = floor <= alpha
    beats = p_value <= alpha if enough else p_value <= floor * (1 + 1e-9)
    note = None
    if not enough:
        note = (
            f"{n} random directions: the smallest p-value is 1/{n + 1} = {floor:.3f} > {alpha:g}, so "
            f"'beats every random direction' stands in for p <= {alpha:g}"
        )
    q95 = null_quantiles(null_removed)["q95"]
    if removed_ci is None:
        verdict = "inconclusive"
    elif removed_ci[0] > 0 and beats:
        verdict = "holds"
    elif removed_ci[1] <= q95:
        verdict = "fails"
    else:
        verdict = "inconclusive"
    return {
        "verdict": verdict,
        "beats_random": beats,
        "rule": f"p <= {alpha:g}" if enough else "beats every random direction",
        "note": note,
    }
