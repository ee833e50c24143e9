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
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from saediff._io import atomic_write_json, read_jsonl
from saediff.directions import Direction
from saediff.evals import Evaluator, evaluate_once
from saediff.export import load_directions
from saediff.hooks import parse_layer
from saediff.models import LoadedModel, ModelSpec, load_model
from saediff.pipeline import read_run, update_run
from saediff.steering import add_direction, clamp_projection, project_out
from saediff.errors import SaediffError

__all__ = ["SteerConfig", "run_causal_checks", "residual_stats", "DiscoverConfig", "discover_latents"]

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
def residual_stats(lm: LoadedModel, run_dir: Path, vectors: dict[str, Direction],
                   batch_size: int = 32) -> tuple[dict[int, float], dict]:
    """Mean residual norm per block, and per candidate the base model's mean projection on its
    unit vector per block, over the response tokens of the run's own answers (at most 256).
    Read with plain forward hooks: the TransformerLens bridge rewires the HF model in place, after
    which its own ``generate`` no longer works."""
    from saediff.activations import tokenize_prompts
    from saediff.hooks import capture_resid
    from saediff.prompts import Prompt

    rows = [row for _, row in read_jsonl(run_dir / "responses.jsonl", "the run's responses")]
    toks = tokenize_prompts(lm, [Prompt(str(r["id"]), r["messages"], r["response"] or ".") for r in rows[:256]])
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
    chosen = {f"sae_{i}": dirs[f"sae_{i}"] for i in info["top_latents"][: cfg.n_latents] if f"sae_{i}" in dirs}
    chosen.update({f"{m}_L{L}": dirs[f"{m}_L{L}"] for m in DENSE if f"{m}_L{L}" in dirs})
    if not chosen:
        raise SaediffError(f"{run_dir}: no candidate directions at block {L}")
    return chosen, L


def _random_units(d: Direction, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        v = torch.randn(d.vector.shape[0], generator=g)
        out.append(v / v.norm())
    return out


def run_causal_checks(run_dir: str | Path, base: ModelSpec, finetuned: ModelSpec, select: Evaluator,
                      report: Evaluator, cfg: SteerConfig = SteerConfig()) -> dict:
    """Induce, remove and clamp checks of every candidate; ``select`` evaluates the questions
    that choose the steering scale, ``report`` the held-out ones every reported figure uses.
    Writes and returns ``steer.json``."""
    run_dir = Path(run_dir)
    cands, L = _candidates(run_dir, cfg)
    lm_base, lm_ft = load_model(base), load_model(finetuned)
    norms, base_means = residual_stats(lm_base, run_dir, cands)
    n_layers = len(norms)
    folder = run_dir / "steer"

    def em(lm: LoadedModel, half: Evaluator, name: str, ctx=None) -> dict:
        return evaluate_once(half, lm, folder / ("select" if half is select else "report") / name, name, ctx)

    ref = {"base": em(lm_base, select, "base"), "base_report": em(lm_base, report, "base"),
           "finetuned_report": em(lm_ft, report, "finetuned")}
    floor = ref["base"]["coherent_rate"] - cfg.coherence_budget
    result: dict = {"layer": L, "resid_norm": norms[L], "config": asdict(cfg),
                    "base": _rate(ref["base_report"]), "finetuned": _rate(ref["finetuned_report"]),
                    "induce": {}, "remove": {}, "clamp": {}}
    for j, (name, d) in enumerate(cands.items()):
        u = d.unit()
        sweep = {}
        for s in cfg.scales:
            r = em(lm_base, select, f"{name}_x{s:g}", add_direction(lm_base.model, L, u, s * norms[L]))
            sweep[f"{s:g}"] = _rate(r)
        ok = {s: v for s, v in sweep.items() if v["coherent_rate"] >= floor} or sweep
        best = max(ok, key=lambda s: ok[s]["em_rate"])
        scale = float(best) * norms[L]
        held = em(lm_base, report, f"{name}_x{best}", add_direction(lm_base.model, L, u, scale))
        rnd = [_rate(em(lm_base, report, f"{name}_x{best}_random{k}", add_direction(lm_base.model, L, v, scale)))
               for k, v in enumerate(_random_units(d, cfg.n_random, cfg.seed + 1000 * j))]
        result["induce"][name] = {"scale": float(best), "scale_abs": scale, "select_sweep": sweep, **_rate(held),
                                  "random": rnd, "random_mean_em_rate": sum(r["em_rate"] for r in rnd) / len(rnd)}
        ft_rate = result["finetuned"]["em_rate"]
        result["remove"][name] = {
            where: _with_cut(em(lm_ft, report, f"{name}_project_{where}", project_out(lm_ft.model, blocks, d.vector)),
                             ft_rate)
            for where, blocks in (("layer", L), ("all", "all"))}
        result["clamp"][name] = {
            where: _with_cut(em(lm_ft, report, f"{name}_clamp_{where}",
                                clamp_projection(lm_ft.model, {b: base_means[name][b] for b in blocks}, d.vector)),
                             ft_rate)
            for where, blocks in (("layer", [L]), ("all", list(range(n_layers))))}
    atomic_write_json(run_dir / "steer.json", result)
    update_run(run_dir, "steer", {"file": "steer.json", "base": base.model, "finetuned": finetuned.model,
                                  "adapter": finetuned.adapter})
    return result


def _rate(em: dict) -> dict:
    return {"em_rate": em["em_rate"], "em_rate_ci": list(em["em_rate_ci"]), "coherent_rate": em["coherent_rate"],
            "n_responses": em["n_responses"]}


def _with_cut(em: dict, ft_rate: float) -> dict:
    r = _rate(em)
    r["relative_cut"] = (1 - r["em_rate"] / ft_rate) if ft_rate else None
    return r


@dataclass(frozen=True)
class DiscoverConfig:
    pool: int = 20
    """candidates: the latents that rose most and as many that fell most in the diff"""
    scales: tuple[float, ...] = (0.25, 0.5, 1.0)
    """steering scales tried, x the mean residual norm at the SAE's block; per latent the scale
    that passes with the largest induce + repair counts"""
    min_induce: float = 0.05
    """EM rate a latent must add when the base model is steered along it (K-: against it)"""
    min_repair: float = 0.05
    """EM rate it must remove when the fine-tuned model is steered against it (K-: along it)"""
    coherence_budget: float = 0.10
    """the coherent rate may fall by at most this much under either intervention"""
    seed: int = 0


def discover_latents(run_dir: str | Path, base: ModelSpec, finetuned: ModelSpec, evaluator: Evaluator,
                     cfg: DiscoverConfig = DiscoverConfig()) -> dict:
    """The BLOCK-EM paper's latent screening: from a diff run's candidate pool, keep the latents
    that both *induce* EM (steering the base model toward the fine-tune's change along the latent)
    and *repair* it (steering the fine-tuned model back), within the incoherence budget. Latents
    that rose (K+, held down in BLOCK-EM) are steered along their decoder row; latents that fell
    (K-, held up) against it. Writes ``RUN/latents.json`` (``low``: K+, ``high``: K-, and each
    candidate's figures), which ``saediff block --latents`` reads."""
    from saediff.blockem import latents_from_diff
    from saediff.saes import load_sae

    run_dir = Path(run_dir)
    info = read_run(run_dir)["steps"]["diff"]
    L = parse_layer(info["sae_hook"])
    pool = latents_from_diff(run_dir, cfg.pool, cfg.pool)
    sae = load_sae(info["sae"])
    lm_base, lm_ft = load_model(base), load_model(finetuned)
    norms, _ = residual_stats(lm_base, run_dir, {})
    folder = run_dir / "discover"

    def em(lm: LoadedModel, name: str, ctx=None) -> dict:
        return evaluate_once(evaluator, lm, folder / name, name, ctx)

    ref_b, ref_f = em(lm_base, "base"), em(lm_ft, "finetuned")
    figures: dict[str, dict] = {}
    kept: dict[str, list[tuple[float, int]]] = {"low": [], "high": []}
    for side, latents, sign in (("low", pool.low, 1.0), ("high", pool.high, -1.0)):
        for i in latents:
            u = sae.W_dec[i].detach().float()
            u = sign * u / u.norm()
            best = None
            for s in cfg.scales:
                a = s * norms[L]
                ind = em(lm_base, f"{i}_induce_x{s:g}", add_direction(lm_base.model, L, u, a))
                rep = em(lm_ft, f"{i}_repair_x{s:g}", add_direction(lm_ft.model, L, -u, a))
                row = {"scale": s, "induce": ind["em_rate"] - ref_b["em_rate"],
                       "repair": ref_f["em_rate"] - rep["em_rate"],
                       "coherence_drop": max(ref_b["coherent_rate"] - ind["coherent_rate"],
                                             ref_f["coherent_rate"] - rep["coherent_rate"])}
                row["passes"] = (row["induce"] >= cfg.min_induce and row["repair"] >= cfg.min_repair
                                 and row["coherence_drop"] <= cfg.coherence_budget)
                score = (row["passes"], row["induce"] + row["repair"])
                if best is None or score > (best["passes"], best["induce"] + best["repair"]):
                    best = row
            figures[str(i)] = {"set": side, "delta_rank": latents.index(i), **best}
            if best["passes"]:
                kept[side].append((best["induce"] + best["repair"], i))
    result = {"kind": "saediff.latents", "hook_name": info["sae_hook"], "sae": info["sae"], "config": asdict(cfg),
              "base_em_rate": ref_b["em_rate"], "finetuned_em_rate": ref_f["em_rate"],
              "low": [i for _, i in sorted(kept["low"], reverse=True)],
              "high": [i for _, i in sorted(kept["high"], reverse=True)], "candidates": figures}
    atomic_write_json(run_dir / "latents.json", result)
    return result
