"""Causal checks of a diff run's candidate directions on any model (``saediff steer RUN``).

For each candidate (the top SAE latents and the dense directions at the SAE's layer):

- **induce**: steer the base model with ``scale x |resid|`` along the unit direction, where
  ``|resid|`` is the mean residual norm at that layer on the run's own answers (so the scales mean
  the same on a 64-wide organism and a 5120-wide model). The scale is chosen on one half of the
  questions (highest EM rate whose coherent rate stays within ``coherence_budget`` of the
  unsteered model's) and reported on the other half, with its 95% interval, next to at least three
  random directions of the same norm at the same scale;
- **remove**: project it out of the fine-tuned model at its layer and after every block;
- **clamp**: hold its projection at the base model's mean (per block, measured on the run's
  answers) at its layer and after every block: removing an axis also removes whatever alignment
  the base model holds on it, so projection alone can raise EM; clamping is the matched test.

Every EM rate comes from an ``Evaluator`` (LLM judges, or the organism's exact judge); each
condition has its own folder under ``RUN/steer/``, so a rerun resumes and reuses nothing across
conditions. Results: ``RUN/steer.json``.

``select_and_report`` is saediff's one steering protocol: ``saediff steer``, ``saediff discover``,
the neighbourhood probe's ``--steer`` check and the organism's steering check all call it, so a fix
to how a scale is chosen reaches every one of them.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from saediff._io import atomic_write_json, read_jsonl
from saediff.data.runs import read_run, update_run
from saediff.errors import SaediffError
from saediff.evaluation.evals import Evaluator, evaluate_once
from saediff.interventions.steering import add_direction, clamp_projection, project_out
from saediff.methods.directions import Direction
from saediff.methods.export import load_directions
from saediff.models.hooks import parse_layer
from saediff.models.loading import LoadedModel, ModelSpec, load_model
from saediff.models.provenance import sae_fingerprint

__all__ = [
    "NO_COHERENT_SCALE",
    "Arm",
    "DiscoverConfig",
    "Selection",
    "SteerConfig",
    "SteerSelection",
    "discover_latents",
    "induce_summary",
    "residual_stats",
    "run_causal_checks",
    "select_and_report",
    "steer_check",
    "steer_headline",
]

log = logging.getLogger(__name__)
DENSE = ("mean_diff_models", "lora_downstream", "mean_diff_responses", "in_context", "ground_truth")


@dataclass(frozen=True)
class SteerConfig:
    scales: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    """steering scales, in units of the mean residual norm at the direction's layer"""
    n_latents: int = 3
    """top SAE latents of the run to check"""
    n_random: int = 3
    """random directions of equal norm per candidate (the control)"""
    coherence_budget: float = 0.10
    """a steering scale counts only if the coherent rate falls by at most this much"""
    seed: int = 0

    def __post_init__(self):
        if not self.scales or min(self.scales) <= 0:
            raise SaediffError("SteerConfig.scales must be positive")
        if self.n_random < 1:
            raise SaediffError("SteerConfig.n_random must be >= 1")


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


def _candidates(run_dir: Path, cfg: SteerConfig) -> tuple[dict[str, Direction], int]:
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


def _random_units(d_model: int, n: int, seed: int) -> list[torch.Tensor]:
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

    def em(arm: Arm, half: Evaluator, name: str, u: torch.Tensor | None = None, alpha: float = 0.0) -> dict:
        ctx = None if u is None else add_direction(arm.lm.model, layer, arm.sign * u, alpha)
        return _rate(
            evaluate_once(half, arm.lm, folder / ("select" if half is select else "report") / name, name, ctx)
        )

    ref = {a.name: {"select": em(a, select, a.unsteered), "report": em(a, report, a.unsteered)} for a in arms}
    floor = {a: r["select"]["coherent_rate"] - coherence_budget for a, r in ref.items()}
    d_model = next(iter(candidates.values())).shape[-1]
    randoms: dict[float, dict[str, list[dict]]] = {}

    def random_rates(s: float) -> dict[str, list[dict]]:
        if s not in randoms:
            units = _random_units(d_model, n_random, seed + 1000 * scales.index(s))
            randoms[s] = {
                a.name: [
                    em(a, report, f"random{k}_seed{seed}_{a.name}_x{s:g}", v, s * unit)
                    for k, v in enumerate(units)
                ]
                for a in arms
            }
        return randoms[s]

    out = {}
    for name, vec in candidates.items():
        u = vec.detach().float().cpu()
        u = u / u.norm()
        sweep = {}
        for s in scales:
            rates = {a.name: em(a, select, f"{name}_{a.name}_x{s:g}", u, s * unit) for a in arms}
            drop = max(ref[a]["select"]["coherent_rate"] - r["coherent_rate"] for a, r in rates.items())
            effect = sum(a.sign * (rates[a.name]["em_rate"] - ref[a.name]["select"]["em_rate"]) for a in arms)
            sweep[f"{s:g}"] = {
                **rates,
                "effect": effect,
                "coherence_drop": drop,
                "coherent": drop <= coherence_budget + 1e-12,
            }
        ok = [s for s in scales if sweep[f"{s:g}"]["coherent"]]
        if not ok:
            log.info("%s: %s", name, NO_COHERENT_SCALE)
            out[name] = Selection(False, None, None, sweep, None)
            continue
        best = max(ok, key=lambda s: sweep[f"{s:g}"]["effect"])
        rnd = random_rates(best)
        held = {}
        for a in arms:
            r, base = em(a, report, f"{name}_{a.name}_x{best:g}", u, best * unit), ref[a.name]["report"]
            mean = sum(x["em_rate"] for x in rnd[a.name]) / len(rnd[a.name])
            held[a.name] = {
                **r,
                "effect": a.sign * (r["em_rate"] - base["em_rate"]),
                "coherence_drop": base["coherent_rate"] - r["coherent_rate"],
                "random": rnd[a.name],
                "random_mean_em_rate": mean,
                "random_effect": a.sign * (mean - base["em_rate"]),
            }
        out[name] = Selection(True, best, best * unit, sweep, held)
    return SteerSelection(ref, floor, out)


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


def run_causal_checks(
    run_dir: str | Path,
    base: ModelSpec,
    finetuned: ModelSpec,
    select: Evaluator,
    report: Evaluator,
    cfg: SteerConfig = SteerConfig(),
) -> dict:
    """Induce, remove and clamp checks of every candidate; ``select`` evaluates the questions
    that choose the steering scale, ``report`` the held-out ones every reported figure uses (the
    induce check is ``select_and_report``: a candidate with no coherent scale has ``scale`` None,
    no rates and a ``note``). Writes and returns ``steer.json``."""
    run_dir = Path(run_dir)
    cands, L = _candidates(run_dir, cfg)
    lm_base, lm_ft = load_model(base), load_model(finetuned)
    norms, base_means = residual_stats(lm_base, run_dir, cands)
    n_layers = len(norms)
    folder = run_dir / "steer"

    def em(lm: LoadedModel, name: str, ctx=None) -> dict:
        return evaluate_once(report, lm, folder / "report" / name, name, ctx)

    sel = select_and_report(
        {n: d.vector for n, d in cands.items()},
        [Arm("induce", lm_base, 1.0, "base")],
        L,
        cfg.scales,
        norms[L],
        select,
        report,
        folder,
        n_random=cfg.n_random,
        coherence_budget=cfg.coherence_budget,
        seed=cfg.seed,
    )
    result: dict = {
        "layer": L,
        "resid_norm": norms[L],
        "config": asdict(cfg),
        "base": sel.unsteered["induce"]["report"],
        "finetuned": _rate(em(lm_ft, "finetuned")),
        "coherence_floor": sel.coherence_floor["induce"],
        "induce": {n: induce_summary(c) for n, c in sel.candidates.items()},
        "remove": {},
        "clamp": {},
    }
    for name, d in cands.items():
        ft_rate = result["finetuned"]["em_rate"]
        result["remove"][name] = {
            where: _with_cut(
                em(lm_ft, f"{name}_project_{where}", project_out(lm_ft.model, blocks, d.vector)), ft_rate
            )
            for where, blocks in (("layer", L), ("all", "all"))
        }
        result["clamp"][name] = {
            where: _with_cut(
                em(
                    lm_ft,
                    f"{name}_clamp_{where}",
                    clamp_projection(lm_ft.model, {b: base_means[name][b] for b in blocks}, d.vector),
                ),
                ft_rate,
            )
            for where, blocks in (("layer", [L]), ("all", list(range(n_layers))))
        }
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


def _rate(em: dict) -> dict:
    return {
        "em_rate": em["em_rate"],
        "em_rate_ci": list(em["em_rate_ci"]),
        "coherent_rate": em["coherent_rate"],
        "n_responses": em["n_responses"],
    }


def _with_cut(em: dict, ft_rate: float) -> dict:
    r = _rate(em)
    r["relative_cut"] = (1 - r["em_rate"] / ft_rate) if ft_rate else None
    return r


@dataclass(frozen=True)
class DiscoverConfig:
    pool: int = 20
    """candidates: the latents that rose most and as many that fell most in the diff"""
    scales: tuple[float, ...] = (0.25, 0.5, 1.0)
    """steering scales tried, x the mean residual norm at the SAE's block; per latent the coherent
    scale with the largest induce + repair on the select half of the questions"""
    min_induce: float = 0.05
    """EM rate a latent must add when the base model is steered along it (K-: against it), beyond
    what random directions of the same norm add (report half)"""
    min_repair: float = 0.05
    """EM rate it must remove when the fine-tuned model is steered against it (K-: along it),
    beyond what random directions of the same norm remove (report half)"""
    coherence_budget: float = 0.10
    """the coherent rate may fall by at most this much under either intervention"""
    n_random: int = 3
    """random directions of the latent's norm per chosen scale (the control)"""
    seed: int = 0

    def __post_init__(self):
        if not self.scales or min(self.scales) <= 0:
            raise SaediffError("DiscoverConfig.scales must be positive")
        if self.n_random < 1:
            raise SaediffError("DiscoverConfig.n_random must be >= 1")


def discover_latents(
    run_dir: str | Path,
    base: ModelSpec,
    finetuned: ModelSpec,
    evaluator: Evaluator,
    cfg: DiscoverConfig = DiscoverConfig(),
) -> dict:
    """The BLOCK-EM paper's latent screening: from a diff run's candidate pool, keep the latents
    that both *induce* EM (steering the base model toward the fine-tune's change along the latent)
    and *repair* it (steering the fine-tuned model back), within the incoherence budget. Latents
    that rose (K+, held down in BLOCK-EM) are steered along their decoder row; latents that fell
    (K-, held up) against it. Through ``select_and_report``: the scale is chosen on half of the
    evaluator's questions, keep or drop is decided on the other half against random directions of
    the same norm (``_verdict``), and a latent with no coherent scale is dropped with a note.
    Writes ``RUN/latents.json`` (``low``: K+, ``high``: K-, and each candidate's figures), which
    ``saediff block --latents`` reads."""
    from saediff.interventions.blockem import latents_from_diff
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
    cands, where = {}, {}
    for side, latents, sign in (("low", pool.low, 1.0), ("high", pool.high, -1.0)):
        for rank, i in enumerate(latents):
            cands[str(i)] = sign * sae.W_dec[i].detach().float().cpu()
            where[str(i)] = {"set": side, "delta_rank": rank}
    arms = [Arm("induce", lm_base, 1.0, "base"), Arm("repair", lm_ft, -1.0, "finetuned")]
    sel = select_and_report(
        cands,
        arms,
        L,
        cfg.scales,
        norms[L],
        select,
        report,
        run_dir / "discover",
        n_random=cfg.n_random,
        coherence_budget=cfg.coherence_budget,
        seed=cfg.seed,
    )
    figures = {
        i: {**where[i], **_verdict(c, cfg), "select_sweep": c.select_sweep} for i, c in sel.candidates.items()
    }
    kept = {
        side: sorted(
            (i for i, f in figures.items() if f["set"] == side and f["passes"]),
            key=lambda i: -figures[i]["margin"],
        )
        for side in ("low", "high")
    }
    result = {
        "kind": "saediff.latents",
        "hook_name": info["sae_hook"],
        "sae": info["sae"],
        "sae_identity": sae_fingerprint(sae, info["sae"]),
        "config": asdict(cfg),
        "base_em_rate": sel.unsteered["induce"]["report"]["em_rate"],
        "finetuned_em_rate": sel.unsteered["repair"]["report"]["em_rate"],
        "rule": "kept: on the report half, induce and repair each beyond the random directions' by "
        "min_induce / min_repair, coherent rate within the budget; scale chosen on the select half",
        "low": [int(i) for i in kept["low"]],
        "high": [int(i) for i in kept["high"]],
        "candidates": figures,
    }
    atomic_write_json(run_dir / "latents.json", result)
    return result


def _verdict(c: Selection, cfg: DiscoverConfig) -> dict:
    """Keep or drop, on the report half: ``induce`` and ``repair`` are the latent's effects (EM
    added to the base model, removed from the fine-tune), ``random_*`` the mean effect of random
    directions of the same norm, ``margin`` the sum of both excesses over random."""
    if not c.passed:
        return {"scale": None, "passes": False, "margin": None, "note": NO_COHERENT_SCALE}
    ind, rep = c.report["induce"], c.report["repair"]
    row = {
        "scale": c.scale,
        "induce": ind["effect"],
        "repair": rep["effect"],
        "random_induce": ind["random_effect"],
        "random_repair": rep["random_effect"],
        "induce_em_rate": ind["em_rate"],
        "repair_em_rate": rep["em_rate"],
        "random_induce_em_rate": ind["random_mean_em_rate"],
        "random_repair_em_rate": rep["random_mean_em_rate"],
        "coherence_drop": max(ind["coherence_drop"], rep["coherence_drop"]),
    }
    over = (row["induce"] - row["random_induce"], row["repair"] - row["random_repair"])
    row["margin"] = sum(over)
    row["passes"] = (
        over[0] >= cfg.min_induce
        and over[1] >= cfg.min_repair
        and row["coherence_drop"] <= cfg.coherence_budget
    )
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
    scales: tuple[float, ...],
    n_random: int = 3,
    coherence_budget: float = 0.10,
    seed: int = 0,
) -> dict:
    """One method's candidate through ``select_and_report`` (the model steered at ``layer``, scales
    x ``unit``, chosen on the evaluator's select half, reported on the other beside ``n_random``
    random directions of equal norm; conditions cached under ``out/steer``). Writes the selection
    to ``out/json_name`` and returns the headline (``steer_headline``)."""
    select, report = evaluator.halves()
    sel = select_and_report(
        {name: vector},
        [Arm("induce", lm)],
        layer,
        scales,
        unit,
        select,
        report,
        out / "steer",
        n_random=n_random,
        coherence_budget=coherence_budget,
        seed=seed,
    )
    steer = {
        "unsteered": sel.unsteered,
        "coherence_floor": sel.coherence_floor,
        "candidates": {n: c.to_json() for n, c in sel.candidates.items()},
    }
    atomic_write_json(out / json_name, steer)
    return steer_headline(sel, name)


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
