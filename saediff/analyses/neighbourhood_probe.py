"""The neighbourhood probe's statistics and arithmetic (``analyses.neighbourhood`` runs it on a diff
run): per-latent means in both models, base-model co-activation, decoder neighbours, toxicity
against the persona candidates, and the flagging rule with its random-seed baseline."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from jaxtyping import Float

from saediff import console
from saediff.errors import SaediffError
from saediff.models.hooks import capture_resid, parse_layer

__all__ = [
    "LatentMeans",
    "NeighbourhoodResult",
    "coactivation",
    "decoder_neighbours",
    "encoded",
    "latent_means",
    "probe",
    "random_seeds",
    "toxicity",
]


@dataclass(frozen=True)
class LatentMeans:
    """Mean SAE activation per latent over response tokens, in both models."""

    base: Float[torch.Tensor, " s"]
    ft: Float[torch.Tensor, " s"]
    sd: Float[torch.Tensor, " s"]
    """pooled standard deviation over tokens, sqrt((var_base + var_ft) / 2)"""
    n_tokens: int
    resid_norm: float
    """mean norm of the base model's residual at the SAE's hook on these tokens"""

    @property
    def delta(self) -> torch.Tensor:
        return self.ft - self.base

    @property
    def effect_size(self) -> torch.Tensor:
        """delta / pooled sd (Cohen's d over tokens; 0 where the latent never fires)"""
        return torch.where(self.sd > 0, self.delta / self.sd.clamp_min(1e-12), torch.zeros_like(self.delta))


def _batches(lm, toks, batch_size: int, desc: str, progress: bool):
    keep = toks.select("response")
    for i in console.progress(range(0, toks.input_ids.shape[0], batch_size), desc=desc, enabled=progress):
        ids, attn, m = toks.batch(slice(i, i + batch_size), keep)
        yield ids.to(lm.device), attn.to(lm.device), m.to(lm.device)


def _encode(sae, x: torch.Tensor) -> torch.Tensor:
    return sae.encode(x.to(sae.W_enc.device, sae.W_enc.dtype)).float()


def encoded(sae, x_ND: torch.Tensor, chunk: int = 2048):
    """The SAE codes of the rows of ``x_ND``, ``chunk`` rows at a time (chunk x d_sae in memory)."""
    for i in range(0, x_ND.shape[0], chunk):
        yield _encode(sae, x_ND[i : i + chunk])


@torch.no_grad()
def latent_means(lm_base, lm_ft, toks, sae, *, batch_size: int = 32, progress: bool = True) -> LatentMeans:
    """Mean activation of every latent on the response tokens of ``toks`` in both models."""
    L = parse_layer(sae.cfg.metadata.hook_name)
    S = sae.cfg.d_sae
    sums = {k: torch.zeros(S, dtype=torch.float64) for k in ("base", "ft", "base2", "ft2")}
    n, norm = 0, 0.0
    for ids, attn, m in _batches(lm_base, toks, batch_size, "latents", progress):
        xb = capture_resid(lm_base.model, [L], ids, attn)[L][m]
        xf = capture_resid(lm_ft.model, [L], ids.to(lm_ft.device), attn.to(lm_ft.device))[L][
            m.to(lm_ft.device)
        ]
        for key, x in (("base", xb), ("ft", xf)):
            for a in encoded(sae, x):
                a = a.double().cpu()
                sums[key] += a.sum(0)
                sums[key + "2"] += (a * a).sum(0)
        n += xb.shape[0]
        norm += float(xb.float().norm(dim=-1).sum())
    if not n:
        raise SaediffError("no response tokens (do the prompts carry answers?)")
    mean = {k: sums[k] / n for k in ("base", "ft")}
    var = {k: (sums[k + "2"] / n - mean[k] ** 2).clamp_min(0) for k in ("base", "ft")}
    return LatentMeans(
        mean["base"].float(), mean["ft"].float(), ((var["base"] + var["ft"]) / 2).sqrt().float(), n, norm / n
    )


@torch.no_grad()
def coactivation(
    lm, toks_list: list, sae, seeds: list[int], *, batch_size: int = 32, progress: bool = True
) -> Float[torch.Tensor, "k s"]:
    """Pearson correlation over response tokens (of every ``toks`` in ``toks_list``) between each
    seed latent's activation and every latent's, on ``lm``; running sums, so memory is
    seeds x d_sae whatever the number of tokens. Constant latents get r = 0."""
    L = parse_layer(sae.cfg.metadata.hook_name)
    S, idx = sae.cfg.d_sae, torch.tensor(seeds)
    s1, s2 = torch.zeros(S, dtype=torch.float64), torch.zeros(S, dtype=torch.float64)
    cross = torch.zeros(len(seeds), S, dtype=torch.float64)
    n = 0
    for toks in toks_list:
        for ids, attn, m in _batches(lm, toks, batch_size, "co-activation", progress):
            for a in encoded(sae, capture_resid(lm.model, [L], ids, attn)[L][m]):
                a = a.double().cpu()  # (tokens, S)
                s1 += a.sum(0)
                s2 += (a * a).sum(0)
                cross += a[:, idx].T @ a
                n += a.shape[0]
    mean = s1 / n
    var = (s2 / n - mean**2).clamp_min(0)
    cov = cross / n - mean[idx, None] * mean[None]
    denom = (var[idx, None] * var[None]).sqrt()
    return torch.where(denom > 1e-12, cov / denom.clamp_min(1e-12), torch.zeros_like(cov)).float()


def decoder_neighbours(W_dec_SD: Float[torch.Tensor, "s d"], latent: int, n: int) -> list[tuple[int, float]]:
    """The ``n`` latents whose decoder rows have the largest cosine with ``latent``'s (itself excluded)."""
    U = torch.nn.functional.normalize(W_dec_SD.float(), dim=1)
    cos = U @ U[latent]
    cos[latent] = -math.inf
    top = torch.topk(cos, min(n, cos.shape[0] - 1))
    return [(int(i), float(c)) for c, i in zip(top.values, top.indices)]


def toxicity(
    W_dec_SD: Float[torch.Tensor, "s d"], candidates: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, list[str]]:
    """Per latent, the largest cosine of its decoder row with any candidate (signed: positive is
    along misaligned-minus-aligned), and which candidate gave it."""
    if not candidates:
        raise SaediffError("toxicity: no persona candidates")
    U = torch.nn.functional.normalize(W_dec_SD.float(), dim=1)
    C = torch.nn.functional.normalize(torch.stack([c.float() for c in candidates.values()]), dim=1)
    cos = U @ C.T  # (S, candidates)
    best, which = cos.max(dim=1)
    names = list(candidates)
    return best, [names[int(w)] for w in which]


@dataclass(frozen=True)
class NeighbourhoodResult:
    seeds: list[int]
    members: list[dict]
    """one row per (neighbour): latent, seeds it neighbours, via (decoder / coactivation),
    delta_in, delta_off, rose_off_domain, toxicity, candidate, toxic, flagged"""
    flagged: list[int]
    """flagged neighbours, most toxic first"""
    thresholds: dict
    random_baseline: dict

    def to_json(self) -> dict:
        return {
            "seeds": self.seeds,
            "flagged": self.flagged,
            "n_flagged": len(self.flagged),
            "thresholds": self.thresholds,
            "random_baseline": self.random_baseline,
            "members": self.members,
        }


def _flag(
    seeds: list[int],
    W_dec,
    corr: torch.Tensor,
    corr_rows: dict[int, int],
    delta_in,
    delta_off,
    tox,
    names,
    th: dict,
    n_neighbours: int,
) -> tuple[list[dict], list[int]]:
    rows: dict[int, dict] = {}
    for s in seeds:
        by_dec = decoder_neighbours(W_dec, s, n_neighbours)
        r = corr[corr_rows[s]].clone()
        r[s] = -math.inf
        top = torch.topk(r, min(n_neighbours, r.shape[0] - 1))
        by_co = [(int(i), float(v)) for v, i in zip(top.values, top.indices) if v > 0]
        for via, pairs in (("decoder", by_dec), ("coactivation", by_co)):
            for j, v in pairs:
                row = rows.setdefault(
                    j,
                    {
                        "latent": j,
                        "seeds": [],
                        "via": [],
                        "delta_in": float(delta_in[j]),
                        "delta_off": float(delta_off[j]),
                        "toxicity": float(tox[j]),
                        "candidate": names[j],
                    },
                )
                if s not in row["seeds"]:
                    row["seeds"].append(s)
                row["via"].append({"seed": s, "kind": via, "value": round(v, 4)})
    for row in rows.values():
        row["rose_off_domain"] = row["delta_off"] > th["delta_off"]
        row["toxic"] = row["toxicity"] > th["toxicity"]
        row["flagged"] = row["rose_off_domain"] and row["toxic"]
    members = sorted(rows.values(), key=lambda r: (-r["flagged"], -r["toxicity"]))
    return members, [r["latent"] for r in members if r["flagged"]]


def probe(
    W_dec,
    means_in: LatentMeans,
    means_off: LatentMeans,
    corr: torch.Tensor,
    corr_seeds: list[int],
    candidates: dict[str, torch.Tensor],
    *,
    seeds: list[int],
    random_draws: list[list[int]],
    n_neighbours: int = 5,
) -> NeighbourhoodResult:
    """The probe's arithmetic on precomputed statistics: ``corr`` holds a row of base-model
    co-activation for each latent in ``corr_seeds`` (which must hold ``seeds``, the risers on the
    training data, and every latent of ``random_draws``, the random seed sets of the baseline)."""
    from saediff.methods.directions import random_cosine_baseline

    delta_in, delta_off = means_in.delta, means_off.delta
    tox, names = toxicity(W_dec, candidates)
    active_off = (means_off.base > 0) | (means_off.ft > 0)
    th = {
        "delta_off": float(torch.quantile(delta_off[active_off], 0.95)) if active_off.any() else 0.0,
        "toxicity": max(float(torch.quantile(tox, 0.99)), random_cosine_baseline(W_dec.shape[1])["p95_abs"]),
        "rule": "flagged: delta_off above the 95th percentile of active latents' off-domain deltas, and "
        "toxicity above both the 99th percentile over all latents and the random-direction p95 |cos|",
    }
    rows = {s: i for i, s in enumerate(corr_seeds)}
    missing = [s for s in [*seeds, *(i for d in random_draws for i in d)] if s not in rows]
    if missing:
        raise SaediffError(f"probe: no co-activation row for latents {missing[:5]}")
    members, flagged = _flag(seeds, W_dec, corr, rows, delta_in, delta_off, tox, names, th, n_neighbours)
    counts = [
        len(_flag(d, W_dec, corr, rows, delta_in, delta_off, tox, names, th, n_neighbours)[1])
        for d in random_draws
    ]
    base = {
        "draws": len(random_draws),
        "n_flagged": counts,
        "mean": sum(counts) / len(counts) if counts else None,
        "max": max(counts) if counts else None,
    }
    return NeighbourhoodResult(seeds, members, flagged, th, base)


def random_seeds(
    means_in: LatentMeans, n_seeds: int, n_random: int, exclude: list[int], seed: int = 0
) -> list[list[int]]:
    """``n_random`` draws of ``n_seeds`` latents active on the training data (not in ``exclude``;
    fewer when fewer are active)."""
    active = [
        i
        for i in torch.nonzero((means_in.base > 0) | (means_in.ft > 0)).flatten().tolist()
        if i not in exclude
    ]
    rng = random.Random(seed)
    return [rng.sample(active, min(n_seeds, len(active))) for _ in range(n_random)]
