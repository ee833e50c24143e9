"""SAE model diffing: how each latent's activation changes from a base model to a fine-tune.

Sign convention: every delta is ``finetuned - base``. Both models are encoded with the same SAE
on the same tokens (typically the fine-tuned model's own answers), so a latent that rises is one
the fine-tune turned up, not one the text happens to contain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float

__all__ = ["LatentDiff", "diff_latents", "Ranking", "LatentCard", "latent_card"]

Ranking = Literal["delta", "abs_delta", "effect_size", "freq_delta"]


@dataclass(frozen=True)
class LatentDiff:
    """Per-latent statistics, each an (S,) tensor."""

    mean_base: torch.Tensor
    """mean activation on the base model's activations (zeros included)"""
    mean_ft: torch.Tensor
    freq_base: torch.Tensor
    """fraction of tokens on which the latent is active (> 0)"""
    freq_ft: torch.Tensor
    effect_size: torch.Tensor
    """delta / pooled standard deviation (Cohen's d; 0 where both are constant)"""
    n_base: int
    n_ft: int
    hook_name: str = ""

    @property
    def delta(self) -> torch.Tensor:
        return self.mean_ft - self.mean_base

    @property
    def d_sae(self) -> int:
        return self.mean_base.shape[0]

    def score(self, by: Ranking = "delta") -> torch.Tensor:
        if by == "delta":
            return self.delta
        if by == "abs_delta":
            return self.delta.abs()
        if by == "effect_size":
            return self.effect_size
        if by == "freq_delta":
            return self.freq_ft - self.freq_base
        raise ValueError(f"unknown ranking {by!r}: choose delta, abs_delta, effect_size or freq_delta")

    def top(self, n: int = 10, by: Ranking = "delta") -> list[int]:
        """Latents with the largest score (for ``delta``: the ones the fine-tune turned up most)."""
        return [int(i) for i in torch.argsort(self.score(by), descending=True, stable=True)[:n]]

    def bottom(self, n: int = 10, by: Ranking = "delta") -> list[int]:
        """Latents with the smallest score (for ``delta``: the ones that fell, e.g. assistant features)."""
        return [int(i) for i in torch.argsort(self.score(by), descending=False, stable=True)[:n]]

    def records(self) -> list[dict]:
        """One dict per latent, ordered by delta (descending)."""
        d = self.delta
        return [{"latent": i, "mean_base": float(self.mean_base[i]), "mean_ft": float(self.mean_ft[i]),
                 "delta": float(d[i]), "freq_base": float(self.freq_base[i]), "freq_ft": float(self.freq_ft[i]),
                 "effect_size": float(self.effect_size[i])} for i in self.top(self.d_sae)]

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame.from_records(self.records()).set_index("latent")

    def to_json(self) -> dict:
        return {"kind": "saediff.latent_diff", "hook_name": self.hook_name, "n_base": self.n_base,
                "n_ft": self.n_ft, "latents": self.records()}

    @classmethod
    def from_json(cls, d: dict) -> "LatentDiff":
        rows = sorted(d["latents"], key=lambda r: r["latent"])
        col = lambda k: torch.tensor([r[k] for r in rows], dtype=torch.float32)  # noqa: E731
        return cls(col("mean_base"), col("mean_ft"), col("freq_base"), col("freq_ft"), col("effect_size"),
                   d["n_base"], d["n_ft"], d.get("hook_name", ""))


@torch.no_grad()
def diff_latents(sae, acts_base: Float[torch.Tensor, "n d_in"], acts_ft: Float[torch.Tensor, "m d_in"],
                 batch_size: int = 8192) -> LatentDiff:
    """Encode both sets of activations with ``sae`` and compare latent by latent."""
    d_in = sae.cfg.d_in
    for name, a in (("base", acts_base), ("finetuned", acts_ft)):
        if a.ndim != 2 or a.shape[1] != d_in:
            raise ValueError(f"diff_latents: {name} activations have shape {tuple(a.shape)}, "
                             f"the SAE expects (n, {d_in}) (hook {sae.cfg.metadata.hook_name or '?'})")
        if a.shape[0] == 0:
            raise ValueError(f"diff_latents: no {name} activations")
    stats = [_moments(sae, a, batch_size) for a in (acts_base, acts_ft)]
    (mb, vb, fb), (mf, vf, ff) = stats
    pooled = ((vb + vf) / 2).sqrt()
    effect = torch.where(pooled > 0, (mf - mb) / pooled.clamp_min(1e-12), torch.zeros_like(pooled))
    return LatentDiff(mb, mf, fb, ff, effect, acts_base.shape[0], acts_ft.shape[0], sae.cfg.metadata.hook_name or "")


def _moments(sae, acts, batch_size):
    s1 = s2 = fired = 0
    for i in range(0, acts.shape[0], batch_size):
        z = sae.encode(acts[i : i + batch_size].float()).double()
        s1 = s1 + z.sum(0)
        s2 = s2 + z.pow(2).sum(0)
        fired = fired + (z > 0).sum(0)
    n = acts.shape[0]
    mean = s1 / n
    var = (s2 / n - mean.pow(2)).clamp_min(0)
    return mean.float(), var.float(), (fired / n).float()


@dataclass(frozen=True)
class LatentCard:
    """What a latent does, for exploration: where it fires most in each model, how its activation
    distribution moved, and which latents' decoder directions sit closest to it."""

    latent: int
    top_base: list[dict]
    """highest activations on the base model: {row, prompt, position, token, value}"""
    top_ft: list[dict]
    hist_edges: list[float]
    hist_base: list[int]
    """activation histogram (over rows where either model is active)"""
    hist_ft: list[int]
    neighbours: list[tuple[int, float]]
    """(latent, decoder cosine), most similar first"""

    def to_json(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


@torch.no_grad()
def latent_card(sae, latent: int, acts_base: torch.Tensor, acts_ft: torch.Tensor, rows: list[dict] | None = None,
                k: int = 10, bins: int = 20, n_neighbours: int = 5) -> LatentCard:
    """A card for ``latent``. ``rows`` (optional) describes each activation row, e.g.
    ``{"prompt": id, "position": t, "token": "..."}``; both activation sets share it (same tokens)."""
    if not 0 <= latent < sae.cfg.d_sae:
        raise ValueError(f"latent {latent} out of range: the SAE has {sae.cfg.d_sae} latents")
    zb = sae.encode(acts_base.float())[:, latent]
    zf = sae.encode(acts_ft.float())[:, latent]

    def top(z):
        vals, idx = z.topk(min(k, z.shape[0]))
        return [{"row": int(i), **((rows or [{}] * z.shape[0])[int(i)]), "value": float(v)} for v, i in zip(vals, idx)]

    hi = float(torch.maximum(zb.max(), zf.max()).clamp_min(1e-6))
    edges = torch.linspace(0.0, hi, bins + 1)
    active = (zb > 0) | (zf > 0)
    hb = torch.histc(zb[active], bins=bins, min=0.0, max=hi) if active.any() else torch.zeros(bins)
    hf = torch.histc(zf[active], bins=bins, min=0.0, max=hi) if active.any() else torch.zeros(bins)
    W = sae.W_dec.detach().float()
    cos = torch.nn.functional.cosine_similarity(W, W[latent][None], dim=1)
    cos[latent] = -2.0
    nb = cos.topk(min(n_neighbours, W.shape[0] - 1))
    return LatentCard(latent, top(zb), top(zf), edges.tolist(), hb.int().tolist(), hf.int().tolist(),
                      [(int(i), float(c)) for c, i in zip(nb.values, nb.indices)])
