"""Causal checks of a diff run's candidate directions on any model (``saediff steer RUN``).

For each candidate (the top SAE latents and the dense directions at the SAE's layer):

- **induce**: steer the base model along the unit direction by saediff's one protocol
  (``steer_protocol.select_and_report``): the scale priced by the KL it causes on neutral text, the
  cost level chosen on one half of the questions, the effect (paired over questions, with its
  interval) reported on the other against a null of at least 20 directions at the same cost, with
  its empirical p-value and a verdict; scales are read in units of ``|resid|``, the mean residual
  norm at that layer on the run's own answers;
- **remove**: project it out at its layer and after every block;
- **clamp**: hold its projection at the base model's mean (per block, measured on the run's
  answers) at its layer and after every block: removing an axis also removes whatever alignment
  the base model holds on it, so projection alone can raise EM; clamping is the matched test.
  Both ablations act on the fine-tune *and* the base model, and what they remove of the
  fine-tune's shift over the base model is reported beside random directions ablated the same way
  (``ablation_shift``).

Every EM rate comes from an ``Evaluator`` (LLM judges, or the organism's exact judge); each
condition has its own folder under ``RUN/steer/``, so a rerun resumes and reuses nothing across
conditions. Results: ``RUN/steer.json``.

Beside it, the same protocol (``steer_protocol.select_and_report``) screens a diff's latents for
BLOCK-EM (``discover_latents``, ``saediff discover``) and checks one method's direction
(``steer_check``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from saediff._io import atomic_write_json, read_jsonl
from saediff.data.runs import read_run, update_run
from saediff.errors import SaediffError
from saediff.evaluation.evals import Evaluator, evaluate_once
from saediff.evaluation.neutral import neutral_answers, neutral_from_file
from saediff.interventions.ablation_shift import AblationShift, ablation_null
from saediff.interventions.steer_null import NullConfig
from saediff.interventions.steer_protocol import (
    DEFAULT_KL_BUDGET,
    NO_SCALE,
    Arm,
    CostConfig,
    Selection,
    induce_summary,
    rates,
    select_and_report,
    steer_headline,
)
from saediff.methods.directions import Direction
from saediff.methods.export import load_directions
from saediff.models.hooks import parse_layer, resid_post
from saediff.models.loading import LoadedModel, ModelSpec, load_model
from saediff.models.provenance import sae_fingerprint

__all__ = [
    "DiscoverConfig",
    "SteerConfig",
    "chat_cost",
    "discover_latents",
    "residual_stats",
    "run_causal_checks",
    "steer_candidates",
    "steer_check",
    "steer_directions",
    "verdict_row",
]

DENSE = ("mean_diff_models", "lora_downstream", "mean_diff_responses", "in_context", "ground_truth")


@dataclass(frozen=True)
class SteerConfig:
    n_latents: int = 3
    """top SAE latents of the run to check"""
    kl_budget: float = DEFAULT_KL_BUDGET
    """the most a steering vector may cost: mean KL per neutral token (nats)"""
    levels: tuple[float, ...] = (0.25, 0.5, 1.0)
    """cost levels tried per candidate, as fractions of ``kl_budget``"""
    null: NullConfig = field(default_factory=NullConfig)
    """the null directions each candidate is compared with at equal cost"""
    neutral: str | None = None
    """a JSONL of neutral text (``evaluation.neutral``); default: the base model's own greedy
    answers to the shipped benign questions"""
    n_ablation_null: int = 5
    """random directions projected out of (clamped in) both models beside each candidate"""

    def __post_init__(self):
        if self.n_latents < 0 or self.n_ablation_null < 1:
            raise SaediffError("SteerConfig needs n_latents >= 0 and n_ablation_null >= 1")
        _check_budget(self.kl_budget, self.levels)


def _check_budget(budget: float, levels: tuple[float, ...]) -> None:
    if budget <= 0 or not levels or min(levels) <= 0 or max(levels) > 1:
        raise SaediffError(f"the KL budget must be > 0 and its levels in (0, 1], got {budget} and {levels}")


def chat_cost(
    lm: LoadedModel,
    budget: float = DEFAULT_KL_BUDGET,
    neutral: str | Path | None = None,
    levels: tuple[float, ...] = (0.25, 0.5, 1.0),
) -> CostConfig:
    """The steering cost of a chat model: KL on ``neutral`` (a JSONL, ``neutral_from_file``) or on
    the model's own greedy answers to the shipped benign questions (cached, ``neutral_answers``)."""
    text = neutral_from_file(lm, neutral) if neutral else neutral_answers(lm)
    return CostConfig(text, budget, tuple(levels))


@torch.no_grad()
def residual_stats(
    lm: LoadedModel, run_dir: Path, vectors: dict[str, Direction], batch_size: int = 32
) -> tuple[dict[int, float], dict]:
    """Mean residual norm per block, and per candidate the base model's mean projection on its
    unit vector per block, over the response tokens of the run's own answers (at most 256).
    Read with plain forward hooks: the TransformerLens bridge rewires the HF model in place, after
    which its own ``generate`` no longer works."""
    from saediff.activations.collect import tokenize_prompts
    from saediff.data.prompts import Prompt
    from saediff.models.hooks import capture_resid

    rows = [row for _, row in read_jsonl(run_dir / "responses.jsonl", "the run's responses")]
    toks = tokenize_prompts(
        lm, [Prompt(str(r["id"]), r["messages"], r["response"] or ".") for r in rows[:256]]
    )
    n_layers = lm.model.config.num_hidden_layers
    d_model = lm.model.config.hidden_size
    U = torch.stack([d.unit() for d in vectors.values()]) if vectors else torch.zeros(0, d_model)
    U = U.to(lm.device)  # (k, d)
    norm_sum, proj_sum, n = torch.zeros(n_layers), torch.zeros(n_layers, len(vectors)), 0
    response = toks.select("response")
    for i in range(0, toks.input_ids.shape[0], batch_size):
        ids, attn, keep = (t.to(lm.device) for t in toks.batch(slice(i, i + batch_size), response))
        acts = capture_resid(lm.model, list(range(n_layers)), ids, attn)
        for L in range(n_layers):
            x = acts[L][keep].float()  # (n_tok, d)
            norm_sum[L] += x.norm(dim=-1).sum().cpu()
            proj_sum[L] += (x @ U.T).sum(0).cpu()
        n += int(keep.sum())
    norms = {L: float(norm_sum[L] / n) for L in range(n_layers)}
    means = {name: {L: float(proj_sum[L, j] / n) for L in range(n_layers)} for j, name in enumerate(vectors)}
    return norms, means


def steer_candidates(run_dir: Path, cfg: SteerConfig) -> tuple[dict[str, Direction], int]:
    """The diff run's candidates at its SAE's block, by name (its top ``cfg.n_latents`` latents'
    decoder rows ``sae_I`` and the dense directions there, ``NAME_L{block}``), and that block."""
    info = read_run(run_dir)["steps"]["diff"]
    dirs = load_directions(run_dir / "directions")
    L = parse_layer(info["sae_hook"])
    chosen = {
        f"sae_{i}": dirs[f"sae_{i}"] for i in info["top_latents"][: cfg.n_latents] if f"sae_{i}" in dirs
    }
    chosen.update({f"{m}_L{L}": dirs[f"{m}_L{L}"] for m in DENSE if f"{m}_L{L}" in dirs})
    if not chosen:
        raise SaediffError(f"{run_dir}: no candidate directions at block {L}")
    return chosen, L


# long: its signature and docstring; the code itself is 53 lines
def run_causal_checks(
    run_dir: str | Path,
    base: ModelSpec,
    finetuned: ModelSpec,
    select: Evaluator,
    report: Evaluator,
    cfg: SteerConfig = SteerConfig(),
    *,
    cost: CostConfig | Callable[[LoadedModel], CostConfig] | None = None,
    permuted: dict[str, Callable[[int], torch.Tensor]] | Callable | None = None,
) -> dict:
    """Induce, remove and clamp checks of every candidate (``permuted``: candidate name -> its
    estimator with the labels permuted within each question, for a seed: its label-permuted null;
    or a function of the loaded base and fine-tuned models giving name -> ``PermutedNull``, whose
    notes go beside the induce figures, so the estimators read the models the checks load); ``select`` evaluates the questions
    that choose the cost level, ``report`` the held-out ones every reported figure uses (the induce
    check is ``select_and_report``, priced by ``cost``, default ``chat_cost`` of the base model; a
    candidate no scale reaches a cost level for has ``scale`` None and a ``note``). Writes and
    returns ``steer.json``."""
    run_dir = Path(run_dir)
    cands, L = steer_candidates(run_dir, cfg)
    lm_base, lm_ft = load_model(base), load_model(finetuned)
    null = ablation_null(lm_base.model.config.hidden_size, cfg.n_ablation_null, cfg.null.seed)
    null_dirs = {n: Direction(n, v, resid_post(L), "random") for n, v in null.items()}
    norms, base_means = residual_stats(lm_base, run_dir, {**cands, **null_dirs})  # one pass for both
    folder = run_dir / "steer"
    cost = _cost(cost, lm_base, cfg)
    notes = {}
    if callable(permuted):
        found = permuted(lm_base, lm_ft)
        notes = {n: p.note for n, p in found.items()}
        permuted = {n: p.estimator for n, p in found.items() if p.estimator is not None}
    sel = select_and_report(
        {n: d.vector for n, d in cands.items()},
        [Arm("induce", lm_base, 1.0, "base")],
        L,
        norms[L],
        select,
        report,
        folder,
        cost,
        null=cfg.null,
        permuted={n: f for n, f in (permuted or {}).items() if n in cands},
    )
    result: dict = {
        "layer": L,
        "resid_norm": norms[L],
        "config": asdict(cfg),
        "neutral": cost.neutral.source,
        "costs": sel.costs,
        "base": sel.unsteered["induce"]["report"],
        "finetuned": rates(evaluate_once(report, lm_ft, folder / "report" / "finetuned", "finetuned")),
        "induce": {
            n: {**induce_summary(c), **({"permuted_null": notes[n]} if n in notes else {})}
            for n, c in sel.candidates.items()
        },
        "remove": {},
        "clamp": {},
    }
    shifts = AblationShift(lm_ft, lm_base, report, folder, L, null)
    for name, d in cands.items():
        figs = shifts.with_null(shifts.figures(name, d.vector, base_means[name]), base_means)
        result["remove"][name], result["clamp"][name] = figs["project"], figs["clamp"]
    atomic_write_json(run_dir / "steer.json", result)
    update_run(
        run_dir,
        "steer",
        {
            "file": "steer.json",
            "base": base.model,
            "finetuned": finetuned.model,
            "adapter": finetuned.adapter,
        },
    )
    return result


@dataclass(frozen=True)
class DiscoverConfig:
    pool: int = 20
    """candidates: the latents that rose most and as many that fell most in the diff"""
    kl_budget: float = DEFAULT_KL_BUDGET
    """the most a steering vector may cost: mean KL per neutral token (nats), the largest over
    the base and the fine-tuned model"""
    levels: tuple[float, ...] = (0.25, 0.5, 1.0)
    """cost levels tried per latent, as fractions of ``kl_budget``; per latent the level with the
    largest induce + repair on the select half of the questions"""
    null: NullConfig = field(default_factory=NullConfig)
    """the null directions each latent is compared with at equal cost"""
    neutral: str | None = None
    """a JSONL of neutral text; default: the base model's own greedy answers to benign questions"""

    def __post_init__(self):
        if self.pool < 1:
            raise SaediffError("DiscoverConfig.pool must be >= 1")
        _check_budget(self.kl_budget, self.levels)


# long: its signature and docstring; the code itself is 47 lines
def discover_latents(
    run_dir: str | Path,
    base: ModelSpec,
    finetuned: ModelSpec,
    evaluator: Evaluator,
    cfg: DiscoverConfig = DiscoverConfig(),
    *,
    cost: CostConfig | Callable[[LoadedModel], CostConfig] | None = None,
) -> dict:
    """The BLOCK-EM paper's latent screening: from a diff run's candidate pool, keep the latents
    that both *induce* EM (steering the base model toward the fine-tune's change along the latent)
    and *repair* it (steering the fine-tuned model back). Latents that rose (K+, held down in
    BLOCK-EM) are steered along their decoder row; latents that fell (K-, held up) against it.
    Through ``select_and_report`` (priced by ``cost``, default ``chat_cost`` of the base model): the
    cost level is chosen on half of the evaluator's questions, keep or drop is decided on the other
    half against the null at the same cost (``_verdict``: both arms must hold), and a latent no
    scale reaches a cost level for is dropped with a note. Writes ``RUN/latents.json`` (``low``:
    K+, ``high``: K-, and each candidate's figures), which ``saediff block --latents`` reads."""
    from saediff.interventions.latent_sets import latents_from_diff
    from saediff.saes.loading import load_sae

    run_dir = Path(run_dir)
    info = read_run(run_dir)["steps"]["diff"]
    L = parse_layer(info["sae_hook"])
    pool = latents_from_diff(run_dir, cfg.pool, cfg.pool)
    sae = load_sae(info["sae"])
    pool.check(sae, info["sae"])  # the SAE folder may have been retrained since the diff
    lm_base, lm_ft = load_model(base), load_model(finetuned)
    norms, _ = residual_stats(lm_base, run_dir, {})
    select, report = evaluator.halves()
    cands, where = _signed_rows(pool, sae)
    arms = [Arm("induce", lm_base, 1.0, "base"), Arm("repair", lm_ft, -1.0, "finetuned")]
    cost = _cost(cost, lm_base, cfg)
    sel = select_and_report(
        cands, arms, L, norms[L], select, report, run_dir / "discover", cost, null=cfg.null
    )
    figures = {
        i: {**where[i], **_verdict(c, cfg), "select_sweep": c.select_sweep} for i, c in sel.candidates.items()
    }
    kept = {side: _kept(figures, side) for side in ("low", "high")}
    result = {
        "kind": "saediff.latents",
        "hook_name": info["sae_hook"],
        "sae": info["sae"],
        "sae_identity": sae_fingerprint(sae, info["sae"]),
        "config": asdict(cfg),
        "base_em_rate": sel.unsteered["induce"]["report"]["em_rate"],
        "finetuned_em_rate": sel.unsteered["repair"]["report"]["em_rate"],
        "costs": sel.costs,
        "rule": "kept: on the report half, induce and repair each hold against the null at the same cost "
        "(empirical p-value <= alpha and the effect's interval above 0); cost level chosen on the select half",
        "low": [int(i) for i in kept["low"]],
        "high": [int(i) for i in kept["high"]],
        "candidates": figures,
    }
    atomic_write_json(run_dir / "latents.json", result)
    return result


def _signed_rows(pool, sae) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Each latent of ``pool`` (``LatentSets``) by name: its decoder row (d,), negated for a latent
    that fell (K-: steered against it), and its set and rank in the diff."""
    cands, where = {}, {}
    for side, latents, sign in (("low", pool.low, 1.0), ("high", pool.high, -1.0)):
        for rank, i in enumerate(latents):
            cands[str(i)] = sign * sae.W_dec[i].detach().float().cpu()
            where[str(i)] = {"set": side, "delta_rank": rank}
    return cands, where


def _kept(figures: dict[str, dict], side: str) -> list[str]:
    """The latents of set ``side`` that pass, the largest margin over random first."""
    return sorted(
        (i for i, f in figures.items() if f["set"] == side and f["passes"]),
        key=lambda i: -figures[i]["margin"],
    )


def _verdict(c: Selection, cfg: DiscoverConfig) -> dict:
    """Keep or drop, on the report half: ``induce`` and ``repair`` are the latent's effects (EM
    added to the base model, removed from the fine-tune) with their intervals, p-values and
    verdicts against the null at the same cost; ``margin`` the sum of both excesses over the null's
    median; ``passes`` when both arms hold."""
    if not c.passed:
        return {"scale": None, "passes": False, "margin": None, "note": NO_SCALE}
    ind, rep = c.report["induce"], c.report["repair"]
    row = {"scale": c.scale, "cost_kl": c.cost_kl}
    for arm, r in (("induce", ind), ("repair", rep)):
        row.update(
            {
                arm: r["effect"],
                f"{arm}_ci": r["effect_ci"],
                f"{arm}_p_value": r["p_value"],
                f"{arm}_verdict": r["verdict"],
                f"{arm}_null_median": r["null_quantiles"]["q50"],
                f"{arm}_em_rate": r["em_rate"],
            }
        )
    row["margin"] = (ind["effect"] - ind["null_quantiles"]["q50"]) + (
        rep["effect"] - rep["null_quantiles"]["q50"]
    )
    row["passes"] = ind["verdict"] == "holds" and rep["verdict"] == "holds"
    row["note"] = None
    return row


def steer_check(
    name: str,
    vector: torch.Tensor,
    lm: LoadedModel,
    layer: int,
    unit: float,
    out: Path,
    *,
    evaluator: Evaluator,
    json_name: str,
    cost: CostConfig,
    null: NullConfig = NullConfig(),
    permuted=None,
) -> dict:
    """One method's candidate through ``select_and_report`` (the model steered at ``layer``, scales
    in units of ``unit``, priced by ``cost``, the cost level chosen on the evaluator's select half,
    the effect reported on the other against ``null`` at the same cost; ``permuted``: the method's
    estimator with labels permuted, for a seed; conditions cached under ``out/steer``). Writes the
    selection to ``out/json_name`` and returns the headline (``steer_headline``)."""
    select, report = evaluator.halves()
    sel = select_and_report(
        {name: vector},
        [Arm("induce", lm)],
        layer,
        unit,
        select,
        report,
        out / "steer",
        cost,
        null=null,
        permuted=None if permuted is None else {name: permuted},
    )
    atomic_write_json(out / json_name, sel.to_json())
    return steer_headline(sel, name)


def _cost(cost, lm: LoadedModel, cfg) -> CostConfig:
    """``cost`` as given; or built for ``lm`` by a function of the loaded model (which supplies the
    neutral text: the budget and levels are ``cfg``'s); or ``chat_cost``."""
    if cost is None:
        return chat_cost(lm, cfg.kl_budget, cfg.neutral, cfg.levels)
    if isinstance(cost, CostConfig):
        return cost
    return replace(cost(lm), budget=cfg.kl_budget, levels=tuple(cfg.levels))


def verdict_row(c: Selection, arm: str = "induce") -> dict:
    """One direction's figures as ``steer.json`` keeps them: the effect on the report half with its
    interval, its cost, scale, p-value, ``beats_null`` and verdict, the null's quantiles and every
    null direction's kind and seed (None figures and a note when no scale reached a cost level)."""
    if not c.passed:
        return {"effect": None, "beats_null": False, "verdict": None, "note": NO_SCALE}
    r = c.report[arm]
    return {
        "effect": c.effect,
        "effect_ci": c.effect_ci,
        "cost_kl": c.cost_kl,
        "scale": c.scale,
        "scale_abs": c.scale_abs,
        "p_value": c.p_value,
        "beats_null": c.beats_null,
        "verdict": c.verdict,
        "null_quantiles": c.null_quantiles,
        "null_seeds": {n: {"kind": v["kind"], "seed": v["seed"]} for n, v in c.null.items()},
        "equal_norm": c.equal_norm,
        "em_rate": r["em_rate"],
        "em_rate_ci": r["em_rate_ci"],
        "coherent_rate": r["coherent_rate"],
        "n": r["n"],
        "note": None,
    }


def steer_directions(
    directions: dict[str, Direction],
    model: ModelSpec,
    evaluators: dict[str, Evaluator],
    out: str | Path,
    cfg: SteerConfig = SteerConfig(),
    *,
    cost: CostConfig | Callable[[LoadedModel], CostConfig] | None = None,
) -> dict:
    """Any directions (from any export folder: a persona vector from another tool, a paper's
    direction) through the protocol on ``model``: each steered at the block its hook names, on each
    evaluator of ``evaluators`` (name -> evaluator; its halves choose and report), priced by
    ``cost`` (default ``chat_cost`` of the model), against the null at equal cost (directions at one
    block share it). Writes and returns ``out/steer.json``: per direction and evaluator,
    ``verdict_row``."""
    out = Path(out)
    if not directions:
        raise SaediffError("steer: no directions given")
    if not evaluators:
        raise SaediffError("steer: no evaluator (--pairs or --judge-url)")
    lm = load_model(model)
    n_layers = lm.model.config.num_hidden_layers
    by_layer: dict[int, dict[str, Direction]] = {}
    for name, d in directions.items():
        L = parse_layer(d.hook)
        if not 0 <= L < n_layers:
            raise SaediffError(
                f"direction {name}: hook {d.hook} is out of range: the model has {n_layers} blocks"
            )
        if d.vector.shape[-1] != lm.model.config.hidden_size:
            raise SaediffError(
                f"direction {name}: width {d.vector.shape[-1]}, the model's d_model is {lm.model.config.hidden_size}"
            )
        by_layer.setdefault(L, {})[name] = d
    cost = _cost(cost, lm, cfg)
    result: dict = {
        "kind": "saediff.steer",
        "model": model.model,
        "adapter": model.adapter,
        "config": asdict(cfg),
        "neutral": cost.neutral.source,
        "costs": cost.costs(),
        "unsteered": {},
        "directions": {n: {"hook": d.hook, "method": d.method} for n, d in directions.items()},
    }
    for set_name, ev in evaluators.items():
        select, report = ev.halves()
        for L, dirs in sorted(by_layer.items()):
            sel = select_and_report(
                {n: d.vector for n, d in dirs.items()},
                [Arm("induce", lm)],
                L,
                None,
                select,
                report,
                out / "steer" / set_name / f"L{L}",
                cost,
                null=cfg.null,
            )
            result["unsteered"][set_name] = sel.unsteered["induce"]["report"]
            for n, c in sel.candidates.items():
                result["directions"][n][set_name] = verdict_row(c)
    atomic_write_json(out / "steer.json", result)
    return result
