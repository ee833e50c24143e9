"""The head-to-head: every direction-finding method saediff has, on one fine-tune pair, in one table.

Per method: its direction at the SAE's block, its cosine with the ground truth (where one is
known: the organism), its steering effect on held-out questions by saediff's one protocol
(``steer_protocol.select_and_report``: each direction priced by the KL it causes on neutral text,
the cost level chosen on one half of the evaluator's questions, the paired effect reported on the
other half against a null of directions at the same cost, with its empirical p-value and verdict;
the mean-difference family's own label-permuted estimators join that null), its agreement with the
other methods (cosines) and its cost in seconds. The methods are then compared pairwise on the same
report-half questions (paired t-tests, Holm-adjusted, ``paired_comparisons``), and "which to try
first" says only what those tests support (``which_first``). The methods are the registry's
(``saediff.methods.base.registry``: one module each under ``saediff/methods/``, in their
``order``); today:

- from a diff run (``saediff diff``, one pass; its seconds are shared): ``sae_diff`` (the SAE
  latent that rose most), ``mean_diff_models`` (or ``lora_downstream`` for an adapter),
  ``mean_diff_responses``, ``in_context``, ``lora_b`` (where the adapter writes at that block);
- computed here: ``crosscoder`` (the most clearly new fine-tune-only latent by latent scaling),
  ``diff_sae`` (the diff-SAE latent carrying the largest share of the mean difference), ``adl``
  (the mean shift on the first answer tokens), ``persona`` (Chen et al.'s persona vector with
  reference answers: mean response residual of misaligned minus aligned answers, base model).

    saediff head-to-head RUN --prompts data.jsonl --contrast pairs.jsonl --pairs offdomain:heldout --out H2H
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from saediff import _io
from saediff.errors import SaediffError
from saediff.interventions.steer_null import NullConfig
from saediff.interventions.steer_protocol import DEFAULT_KL_BUDGET, CostConfig
from saediff.methods.base import MethodConfig, get_method, method_names
from saediff.models.loading import LoadedModel

__all__ = [
    "HeadToHeadConfig",
    "holm",
    "markdown_table",
    "method_inputs",
    "paired_comparisons",
    "paired_t",
    "run_head_to_head",
    "which_first",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadToHeadConfig(MethodConfig):
    """The methods' own knobs (``MethodConfig``: crosscoder and diff-SAE widths, k and steps, ADL
    positions, batch, lr, seed) and the head-to-head's: which methods, and the steering check."""

    methods: tuple[str, ...] = field(default_factory=method_names)
    """registered method names (``methods.base.registry``), the table's rows; default: every one"""
    kl_budget: float = DEFAULT_KL_BUDGET
    """the most a steering vector may cost: mean KL per neutral token (nats); used where
    ``run_head_to_head`` is given no cost of its own"""
    null: NullConfig = field(default_factory=NullConfig)
    """the null directions every method's direction is compared with at equal cost"""
    alpha: float = 0.05
    """family-wise level of the Holm-adjusted paired comparisons between methods"""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for m in self.methods:
            get_method(m)  # one line naming the registered methods when m is not one
        if self.kl_budget <= 0:
            raise SaediffError(f"HeadToHeadConfig.kl_budget must be > 0, got {self.kl_budget}")
        if not 0 < self.alpha < 1:
            raise SaediffError(f"HeadToHeadConfig.alpha must lie in (0, 1), got {self.alpha}")


def _candidates(inputs, wanted: list) -> tuple[dict[str, torch.Tensor], dict, dict, dict]:
    """Each wanted method's best direction, its seconds, its detail and its label-permuted estimator
    (where it has one), in the registry's order. The paired read that some methods share is done
    first and charged to them in equal parts."""
    sharing = [m for m in wanted if m.uses_paired_rows]
    if sharing:
        inputs.paired_rows()
    vecs, cost, notes, permuted = {}, {}, {}, {}
    for m in wanted:  # the diff run's methods carry the diff run's seconds (None when it recorded none)
        res = m.find(inputs) if m.from_diff_run else m.timed(lambda m=m: m.find(inputs))
        if res.best is not None:
            vecs[m.name] = res.best.vector
            cost[m.name] = (
                None
                if res.seconds is None
                else res.seconds + (inputs.read_seconds / len(sharing) if m.uses_paired_rows else 0.0)
            )
            if res.permuted is not None:
                permuted[m.name] = res.permuted
        if res.detail:
            notes[m.name] = res.detail
    return vecs, cost, notes, permuted


def method_inputs(run_dir: Path, prompts: list, contrast: list, cfg: HeadToHeadConfig, in_context=None):
    """The diff run's fine-tune pair, block and directions as ``MethodInputs``, and the ground truth
    at that block (None outside the organism). ``in_context``: how the run's in-context direction
    was built (``methods.in_context.InContextSource``), for its permuted null."""
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
    inputs = MethodInputs(
        lm_base, lm_ft, L, list(prompts), list(contrast), cfg, size, found, info, run_dir, in_context
    )
    return inputs, (gt.vector if gt is not None else None)


# long: its signature and docstring; the code itself is 45 lines
def run_head_to_head(
    diff_run: str | Path,
    out: str | Path,
    prompts: list,
    evaluator,
    *,
    contrast: list = (),
    cfg: HeadToHeadConfig = HeadToHeadConfig(),
    cost: CostConfig | Callable[[LoadedModel], CostConfig] | None = None,
    in_context=None,
    progress: bool = True,
) -> dict:
    """Every method on the diff run's fine-tune pair (its base, fine-tune and SAE block); writes and
    returns ``out/head2head.json`` and ``out/head2head.md``. ``prompts`` feed the crosscoder, the
    diff-SAE and the ADL; ``contrast`` (question / misaligned / aligned) the persona vector (and the
    in-context direction's rebuild, unless ``in_context`` says how it was built); ``evaluator``
    (``halves()``: select, report) the steering check, priced by ``cost``: a ``CostConfig``, or a
    function of the loaded base model that builds one (the CLI's ``steering_cost``); default
    ``causal.chat_cost`` of the base model at ``cfg.kl_budget``."""
    from saediff.interventions.causal import chat_cost, residual_stats
    from saediff.interventions.steer_protocol import Arm, select_and_report
    from saediff.methods.directions import Direction, cosine_table

    run_dir, out = Path(diff_run), Path(out)
    inputs, gt = method_inputs(run_dir, prompts, contrast, cfg, in_context)
    info, L, lm_base = inputs.diff_info, inputs.layer, inputs.lm_base
    wanted = sorted((get_method(m) for m in set(cfg.methods)), key=lambda m: (m.order, m.name))
    vecs, secs, notes, permuted = _candidates(inputs, wanted)
    if not vecs:
        raise SaediffError("head-to-head: no method gave a direction")
    if cost is None:
        cost = chat_cost(lm_base, cfg.kl_budget)
    elif not isinstance(cost, CostConfig):
        cost = cost(lm_base)
    select, report = evaluator.halves()
    norms, _ = residual_stats(lm_base, run_dir, {})
    sel = select_and_report(
        vecs,
        [Arm("induce", lm_base)],
        L,
        norms[L],
        select,
        report,
        out / "steer",
        cost,
        null=cfg.null,
        permuted=permuted,
    )
    table = cosine_table([Direction(m, v, info["sae_hook"], "random") for m, v in vecs.items()])
    rows = [_row(m, v, sel.candidates[m], table, vecs, gt, secs, notes) for m, v in vecs.items()]
    effects = {m: c.item_effects for m, c in sel.candidates.items() if c.passed and c.item_effects}
    comparisons = paired_comparisons(effects, cfg.alpha)
    res = {
        "diff_run": str(run_dir),
        "base": info["base"],
        "finetuned": info["finetuned"],
        "adapter": info["adapter"],
        "hook": info["sae_hook"],
        "unsteered": sel.unsteered["induce"]["report"],
        "unsteered_em_rate": sel.unsteered["induce"]["report"]["em_rate"],
        "costs": sel.costs,
        "kl_budget": cost.budget,
        "neutral": cost.neutral.source,
        "null_config": sel.null_config,
        "settings": asdict(cfg),
        "methods": rows,
        "comparisons": comparisons,
        "which_first": which_first(rows, comparisons, cfg.alpha),
        "cosines": table.to_json(),
        "missing": {m: n for m, n in notes.items() if m not in vecs},
    }
    _io.atomic_write_json(out / "head2head.json", res)
    (out / "head2head.md").write_text(markdown_table(res) + "\n")
    return res


def _row(m: str, v: torch.Tensor, c, table, vecs: dict, gt, secs: dict, notes: dict) -> dict:
    """One method's row: norm, cosine with the ground truth, the steering check's report half
    against the null at the same cost, agreement with the other methods, seconds, and notes."""
    r = (c.report or {}).get("induce") or {}
    others = [abs(table.get(m, o)) for o in vecs if o != m]
    null = c.null or {}
    return {
        "method": m,
        "norm": float(v.norm()),
        "cos_ground_truth": float(torch.cosine_similarity(v.float(), gt.float(), 0))
        if gt is not None
        else None,
        "steer_scale": c.scale,
        "steer_cost_kl": c.cost_kl,
        "steer_effect": c.effect,
        "steer_effect_ci": c.effect_ci,
        "steer_p_value": c.p_value,
        "beats_null": c.beats_null,
        "verdict": c.verdict,
        "null_quantiles": c.null_quantiles,
        "null_q95": (c.null_quantiles or {}).get("q95"),
        "n_null": len(null),
        "n_permuted_null": sum(n["kind"] == "permuted" for n in null.values()),
        "equal_norm_null_effect": (c.equal_norm or {}).get("null_mean_effect"),
        "steer_em_rate": r.get("em_rate"),
        "steer_em_rate_ci": r.get("em_rate_ci"),
        "mean_abs_cos_others": sum(others) / len(others) if others else None,
        "seconds": secs.get(m),
        **({"note": c.to_json()["note"]} if not c.passed else {}),
        **({"detail": notes[m]} if m in notes else {}),
    }


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment, in the input's order: the k-th smallest of m p-values times
    (m - k + 1), made non-decreasing along that order and capped at 1. Reject where the adjusted
    p-value is at most the family-wise level."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    out, running = [0.0] * m, 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * p_values[i]))
        out[i] = running
    return out


def paired_t(diffs) -> dict:
    """Mean of paired differences, its 95% t interval and the two-sided p-value of a zero mean
    (n < 2: no interval, p 1; no spread: p 0 unless the mean is 0)."""
    from scipy import stats

    x = np.asarray(list(diffs), dtype=float)
    n = len(x)
    mean = float(np.mean(x)) if n else 0.0
    if n < 2:
        return {"mean": mean, "ci": None, "p": 1.0, "n": n}
    se = float(np.std(x, ddof=1) / math.sqrt(n))
    if se == 0.0:
        return {"mean": mean, "ci": [mean, mean], "p": 1.0 if mean == 0 else 0.0, "n": n}
    q = float(stats.t.ppf(0.975, n - 1))
    p = float(2 * stats.t.sf(abs(mean / se), n - 1))
    return {"mean": mean, "ci": [mean - q * se, mean + q * se], "p": p, "n": n}


def paired_comparisons(item_effects: dict[str, dict[str, float]], alpha: float = 0.05) -> list[dict]:
    """Every pair of methods (``item_effects``: method -> report-half question -> its steering
    effect) compared on the questions both were scored on: ``a - b`` (mean, 95% interval, paired t
    p-value), the Holm-adjusted p-value over all pairs, and ``better``: the method whose effect is
    larger where the adjusted p-value is at most ``alpha``, else None (not distinguishable)."""
    pairs = list(itertools.combinations(item_effects, 2))
    rows = []
    for a, b in pairs:
        ea, eb = item_effects[a], item_effects[b]
        ids = sorted(set(ea) & set(eb))
        t = paired_t(ea[i] - eb[i] for i in ids)
        rows.append({"a": a, "b": b, "difference": t["mean"], "ci": t["ci"], "p_value": t["p"], "n": t["n"]})
    for r, p in zip(rows, holm([r["p_value"] for r in rows])):
        r["p_holm"] = p
        r["better"] = (r["a"] if r["difference"] > 0 else r["b"]) if p <= alpha else None
    return rows


def which_first(rows: list[dict], comparisons: list[dict], alpha: float = 0.05) -> str:
    """Which method to try first, saying only what the tests support: the method with the largest
    report-half effect among those that hold against the null (else among all, said so), the methods
    the paired comparisons (Holm-adjusted) show it beats and those it cannot be told from, then how
    many other pairs the tests tell apart (named when at most 3), and the methods without a scale."""
    passed = [r for r in rows if r["steer_effect"] is not None]
    if not passed:
        return "no method's direction reached a cost level on the neutral text: nothing to recommend"
    holding = [r for r in passed if r.get("verdict") == "holds"]
    top = max(holding or passed, key=lambda r: r["steer_effect"])
    name, ci = top["method"], top["steer_effect_ci"]
    interval = f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""
    what = "the largest effect" if holding else "the largest effect, though none holds"
    text = [
        f"{name} has {what} ({top['steer_effect']:+.3f}{interval}; against the null at equal "
        f"cost p {top['steer_p_value']:.3f}, {top['verdict']})"
    ]
    if not holding:
        text.append(f"{name} does not hold against the null, so no method is shown to steer here")
    mine = sorted((c for c in comparisons if name in (c["a"], c["b"])), key=lambda c: c["p_holm"])

    def other(c):
        return c["b"] if c["a"] == name else c["a"]

    beats = [f"{other(c)} (Holm p {c['p_holm']:.2g})" for c in mine if c["better"] == name]
    ties = [f"{other(c)} (Holm p {c['p_holm']:.2g})" for c in mine if c["better"] is None]
    losses = [f"{other(c)} (Holm p {c['p_holm']:.2g})" for c in mine if c["better"] not in (None, name)]
    if beats:
        text.append(f"{name} beats " + ", ".join(beats))
    if ties:
        text.append(f"{name} vs " + ", ".join(ties) + " not distinguishable")
    if losses:
        text.append(f"{name} is beaten by " + ", ".join(losses) + " (which do not hold against the null)")
    rest = [c for c in comparisons if c["better"] is not None and c not in mine]
    if rest:
        named = [
            f"{c['better']} beats {c['b'] if c['better'] == c['a'] else c['a']} (Holm p {c['p_holm']:.2g})"
            for c in rest
        ]
        text.append(
            f"other pairs told apart: {', '.join(named)}"
            if len(rest) <= 3
            else f"{len(rest)} other pairs told apart (the comparisons table)"
        )
    unscaled = [r["method"] for r in rows if r["steer_effect"] is None]
    if unscaled:
        text.append(f"not compared (no scale reached a cost level): {', '.join(unscaled)}")
    return "; ".join(text) + f". Paired t-tests on the report-half questions, Holm-adjusted at {alpha:g}."


def markdown_table(res: dict) -> str:
    """The head-to-head as a markdown table, one row per method, then the paired comparisons and
    which method to try first."""
    f = lambda v, d=3: "n/a" if v is None else f"{v:.{d}f}"

    def effect(r):
        if r["steer_effect"] is None:
            return "no scale"
        ci = r["steer_effect_ci"]
        return f"{r['steer_effect']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")

    lines = [
        f"unsteered report-half EM {f(res['unsteered_em_rate'])}; KL budget {res['kl_budget']:g} nats/token "
        f"on {res['neutral']}",
        "| method | cos ground truth | effect [95% CI] | cost KL | p-value | verdict | null q95 "
        "| equal-norm null effect | mean abs cos others | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["methods"]:
        lines.append(
            f"| {r['method']} | {f(r['cos_ground_truth'], 2)} | {effect(r)} | {f(r['steer_cost_kl'], 4)} | "
            f"{f(r['steer_p_value'])} | {r['verdict'] or 'n/a'} | {f(r['null_q95'])} | "
            f"{f(r['equal_norm_null_effect'])} | {f(r['mean_abs_cos_others'], 2)} | {f(r['seconds'], 0)} |"
        )
    if res["comparisons"]:
        lines += ["", "| A | B | A - B [95% CI] | p | Holm p | better |", "|---|---|---|---|---|---|"]
        for c in res["comparisons"]:
            ci = f" [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]" if c["ci"] else ""
            lines.append(
                f"| {c['a']} | {c['b']} | {c['difference']:+.3f}{ci} | {c['p_value']:.3g} | "
                f"{c['p_holm']:.3g} | {c['better'] or 'not distinguishable'} |"
            )
    lines += ["", f"Which to try first: {res['which_first']}"]
    return "\n".join(lines)
