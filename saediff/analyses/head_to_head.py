"""The head-to-head: every direction-finding method saediff has, on one fine-tune pair, in one table.

Per method: its direction at the SAE's block, its cosine with the ground truth (where one is
known: the organism), its steering effect on held-out questions beside random directions of equal
norm (``causal.select_and_report``: the scale chosen on one half of the evaluator's questions,
every figure from the other half), its agreement with the other methods (cosines) and its cost in
seconds. The methods are the registry's (``saediff.methods.base.registry``: one module each
under ``saediff/methods/``, in their ``order``); today:

- from a diff run (``saediff diff``, one pass; its seconds are shared): ``sae_diff`` (the SAE
  latent that rose most), ``mean_diff_models`` (or ``lora_downstream`` for an adapter),
  ``mean_diff_responses``, ``in_context``, ``lora_b`` (where the adapter writes at that block);
- computed here: ``crosscoder`` (the most clearly new fine-tune-only latent by latent scaling),
  ``diff_sae`` (the diff-SAE latent carrying the largest share of the mean difference), ``adl``
  (the mean shift on the first answer tokens), ``persona`` (Chen et al.'s persona vector with
  reference answers: mean response residual of misaligned minus aligned answers, base model).

    saediff head-to-head --diff-run RUN --prompts data.jsonl --contrast pairs.jsonl --pairs offdomain --out H2H
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from saediff import _io
from saediff.errors import SaediffError
from saediff.methods.base import MethodConfig, get_method, method_names

__all__ = ["HeadToHeadConfig", "beats_random", "markdown_table", "method_inputs", "run_head_to_head"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadToHeadConfig(MethodConfig):
    """The methods' own knobs (``MethodConfig``: crosscoder and diff-SAE widths, k and steps, ADL
    positions, batch, lr, seed) and the head-to-head's: which methods, and the steering check."""

    methods: tuple[str, ...] = field(default_factory=method_names)
    """registered method names (``methods.base.registry``), the table's rows; default: every one"""
    scales: tuple[float, ...] = (0.5, 1.0)
    """steering scales, x the base model's mean residual norm at the block"""
    n_random: int = 3
    coherence_budget: float = 0.10
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for m in self.methods:
            get_method(m)  # one line naming the registered methods when m is not one


def _candidates(inputs, wanted: list) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Each wanted method's best direction, its seconds and its detail, in the registry's order.
    The paired read that some methods share is done first and charged to them in equal parts."""
    sharing = [m for m in wanted if m.uses_paired_rows]
    if sharing:
        inputs.paired_rows()
    vecs, cost, notes = {}, {}, {}
    for m in wanted:  # the diff run's methods carry the diff run's seconds (None when it recorded none)
        res = m.find(inputs) if m.from_diff_run else m.timed(lambda m=m: m.find(inputs))
        if res.best is not None:
            vecs[m.name] = res.best.vector
            cost[m.name] = (
                None
                if res.seconds is None
                else res.seconds + (inputs.read_seconds / len(sharing) if m.uses_paired_rows else 0.0)
            )
        if res.detail:
            notes[m.name] = res.detail
    return vecs, cost, notes


def method_inputs(run_dir: Path, prompts: list, contrast: list, cfg: HeadToHeadConfig):
    """The diff run's fine-tune pair, block and directions as ``MethodInputs``, and the ground truth
    at that block (None outside the organism)."""
    from saediff.data.runs import read_run
    from saediff.methods.base import MethodInputs
    from saediff.methods.export import load_directions
    from saediff.models.hooks import parse_layer
    from saediff.models.loading import load_pair
    from saediff.saes.loading import load_sae

    info = read_run(run_dir)["steps"]["diff"]
    L = parse_layer(info["sae_hook"])
    found = load_directions(run_dir / "directions")
    gt = found.get(f"ground_truth_L{L}")
    lm_base, lm_ft = load_pair(info["base"], info["finetuned"], info["adapter"])
    sae = load_sae(info["sae"])
    size = {"d_sae": sae.cfg.d_sae, "k": getattr(sae.cfg, "k", None) or 32}
    inputs = MethodInputs(lm_base, lm_ft, L, list(prompts), list(contrast), cfg, size, found, info)
    return inputs, (gt.vector if gt is not None else None)


def run_head_to_head(
    diff_run: str | Path,
    out: str | Path,
    prompts: list,
    evaluator,
    *,
    contrast: list = (),
    cfg: HeadToHeadConfig = HeadToHeadConfig(),
    progress: bool = True,
) -> dict:
    """Every method on the diff run's fine-tune pair (its base, fine-tune and SAE block); writes and
    returns ``out/head2head.json`` and ``out/head2head.md``. ``prompts`` feed the crosscoder, the
    diff-SAE and the ADL; ``contrast`` (question / misaligned / aligned) the persona vector;
    ``evaluator`` (``halves()``: select, report) the steering check."""
    from saediff.interventions.causal import Arm, residual_stats, select_and_report
    from saediff.methods.directions import Direction, cosine_table

    run_dir, out = Path(diff_run), Path(out)
    inputs, gt = method_inputs(run_dir, prompts, contrast, cfg)
    info, L, lm_base = inputs.diff_info, inputs.layer, inputs.lm_base
    wanted = sorted((get_method(m) for m in set(cfg.methods)), key=lambda m: (m.order, m.name))
    vecs, cost, notes = _candidates(inputs, wanted)
    if not vecs:
        raise SaediffError("head-to-head: no method gave a direction")
    select, report = evaluator.halves()
    norms, _ = residual_stats(lm_base, run_dir, {})
    arms = [Arm("induce", lm_base)]
    sel = select_and_report(
        vecs,
        arms,
        L,
        cfg.scales,
        norms[L],
        select,
        report,
        out / "steer",
        n_random=cfg.n_random,
        coherence_budget=cfg.coherence_budget,
        seed=cfg.seed,
    )
    table = cosine_table([Direction(m, v, info["sae_hook"], "random") for m, v in vecs.items()])
    res = {
        "diff_run": str(run_dir),
        "base": info["base"],
        "finetuned": info["finetuned"],
        "adapter": info["adapter"],
        "hook": info["sae_hook"],
        "unsteered_em_rate": sel.unsteered["induce"]["report"]["em_rate"],
        "settings": asdict(cfg),
        "methods": [_row(m, v, sel.candidates[m], table, vecs, gt, cost, notes) for m, v in vecs.items()],
        "cosines": table.to_json(),
        "missing": {m: n for m, n in notes.items() if m not in vecs},
    }
    _io.atomic_write_json(out / "head2head.json", res)
    (out / "head2head.md").write_text(markdown_table(res) + "\n")
    return res


def _row(m: str, v: torch.Tensor, c, table, vecs: dict, gt, cost: dict, notes: dict) -> dict:
    """One method's row: norm, cosine with the ground truth, the steering check's report half beside
    the random directions, agreement with the other methods, seconds, and notes."""
    r = (c.report or {}).get("induce") or {}
    others = [abs(table.get(m, o)) for o in vecs if o != m]
    return {
        "method": m,
        "norm": float(v.norm()),
        "cos_ground_truth": float(torch.cosine_similarity(v.float(), gt.float(), 0))
        if gt is not None
        else None,
        "steer_scale": c.scale,
        "steer_effect": r.get("effect"),
        "steer_em_rate": r.get("em_rate"),
        "steer_em_rate_ci": r.get("em_rate_ci"),
        "random_effect": r.get("random_effect"),
        "random_em_rates": [x["em_rate"] for x in r.get("random", [])],
        "beats_random": beats_random(r) if r else None,
        "mean_abs_cos_others": sum(others) / len(others) if others else None,
        "seconds": cost.get(m),
        **({"note": c.to_json()["note"]} if not c.passed else {}),
        **({"detail": notes[m]} if m in notes else {}),
    }


def beats_random(report: dict) -> bool:
    """Whether the candidate's report-half rate lies above every random direction's with its 95%
    interval: the interval's lower end above the highest random rate."""
    return report["em_rate_ci"][0] > max(x["em_rate"] for x in report["random"])


def markdown_table(res: dict) -> str:
    """The head-to-head as a markdown table, one row per method."""
    f = lambda v, d=3: "n/a" if v is None else f"{v:.{d}f}"
    lines = [
        f"unsteered report-half rate {f(res['unsteered_em_rate'])}",
        "| method | cos ground truth | steer effect (report half) | random effects | above random (95%) | mean abs cos others | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["methods"]:
        rnd = ", ".join(f(x - res["unsteered_em_rate"]) for x in r["random_em_rates"]) or "n/a"
        lines.append(
            f"| {r['method']} | {f(r['cos_ground_truth'], 2)} | {f(r['steer_effect'])} | {rnd} | "
            f"{r['beats_random']} | {f(r['mean_abs_cos_others'], 2)} | {f(r['seconds'], 0)} |"
        )
    return "\n".join(lines)
