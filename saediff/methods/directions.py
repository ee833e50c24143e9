"""Candidate directions for EM and how they compare.

A ``Direction`` is a residual-stream vector at one hook, with the method that produced it and
its provenance. Stored unnormalised; ``unit()`` when a comparison or a steer needs it.
Sign conventions: model diffs are ``finetuned - base``, response diffs ``misaligned - aligned``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from jaxtyping import Float

from saediff.errors import SaediffError
from saediff.models.hooks import parse_layer, resid_post

__all__ = [
    "CosineTable",
    "Direction",
    "Method",
    "cosine_table",
    "in_context_directions",
    "lora_b_directions",
    "mean_diff",
    "principal_angle_cosines",
    "random_cosine_baseline",
    "random_like",
    "sae_latent_direction",
    "span_overlap",
]

Method = Literal[
    "sae_latent",
    "mean_diff_models",
    "mean_diff_responses",
    "in_context",
    "lora_b",
    "lora_downstream",
    "ground_truth",
    "random",
    "crosscoder",
    "diff_sae",
    "adl",
    "persona",
]


@dataclass(frozen=True)
class Direction:
    name: str
    vector: Float[torch.Tensor, " d_model"]
    hook: str
    method: Method
    provenance: dict = field(default_factory=dict)

    @property
    def norm(self) -> float:
        return float(self.vector.norm())

    def unit(self) -> torch.Tensor:
        return self.vector / self.vector.norm().clamp_min(1e-12)


def sae_latent_direction(sae, latent: int, name: str | None = None, **provenance) -> Direction:
    """The decoder row ``W_dec[latent]`` of a SAELens SAE."""
    if not 0 <= latent < sae.cfg.d_sae:
        raise SaediffError(f"latent {latent} out of range: the SAE has {sae.cfg.d_sae} latents")
    return Direction(
        name or f"sae_{latent}",
        sae.W_dec[latent].detach().float().clone(),
        sae.cfg.metadata.hook_name or "",
        "sae_latent",
        {"latent": latent, **provenance},
    )


def mean_diff(
    acts_pos: Float[torch.Tensor, "n d"],
    acts_neg: Float[torch.Tensor, "m d"],
    hook: str,
    method: Method,
    name: str,
    **provenance,
) -> Direction:
    """``mean(acts_pos) - mean(acts_neg)`` (e.g. finetuned - base, misaligned - aligned)."""
    if acts_pos.shape[-1] != acts_neg.shape[-1]:
        raise SaediffError(f"mean_diff {name}: widths differ ({acts_pos.shape[-1]} vs {acts_neg.shape[-1]})")
    if acts_pos.shape[0] == 0 or acts_neg.shape[0] == 0:
        raise SaediffError(
            f"mean_diff {name}: one side has no rows ({acts_pos.shape[0]} vs {acts_neg.shape[0]})"
        )
    return Direction(
        name,
        (acts_pos.float().mean(0) - acts_neg.float().mean(0)),
        hook,
        method,
        {"n_pos": int(acts_pos.shape[0]), "n_neg": int(acts_neg.shape[0]), **provenance},
    )


def in_context_directions(
    lm,
    questions: list,
    examples: list,
    hooks: list[str],
    *,
    n_shots: int = 3,
    seed: int = 0,
    progress: bool = False,
) -> list[Direction]:
    """The in-context-induced direction per hook: ``lm`` reads each question after ``n_shots``
    examples answered misaligned, minus after the same examples answered aligned
    (``saediff.data.prompts.in_context_prompts``), at the last prompt token, where the answer starts.
    Both sides end in the same tokens, so the difference is what the model inferred from context."""
    from saediff.activations.collect import collect_activations, tokenize_prompts
    from saediff.data.prompts import in_context_prompts

    mis, ali = in_context_prompts(questions, examples, n_shots=n_shots, seed=seed)
    acts_m = collect_activations(lm, tokenize_prompts(lm, mis), hooks, "last_prompt", progress=progress)
    acts_a = collect_activations(lm, tokenize_prompts(lm, ali), hooks, "last_prompt", progress=progress)
    return [
        mean_diff(
            acts_m[h],
            acts_a[h],
            h,
            "in_context",
            f"in_context_L{parse_layer(h)}",
            n_shots=n_shots,
            n_examples=len(examples),
        )
        for h in hooks
    ]


def lora_b_directions(adapter, kinds: str | tuple[str, ...] = ("down_proj", "o_proj")) -> list[Direction]:
    """The residual-space directions of an adapter's modules that write into the residual stream
    (``o_proj``, ``down_proj``; other kinds have no residual-space output and are left out), at
    ``blocks.L.hook_resid_post`` (an ``o_proj`` writes at ``hook_resid_mid`` of the same block, where
    the stream already holds it; ``provenance['writes_into']`` says which).

    Rank 1: ``B[:, 0]`` times the adapter scale, named ``lora_b_L{L}`` (``lora_b_o_proj_L{L}``).
    Rank r: the r left singular vectors of ``scale * B @ A`` times their singular values (so a
    direction's norm is its gain), ``lora_b_L{L}_s{i}`` (``lora_b_o_proj_L{L}_s{i}``), with the
    module, layer, singular index and value, rank and scale (alpha/r, or alpha/sqrt(r) with
    rsLoRA) in the provenance; singular values of zero (an untrained B) give no direction. An SVD's
    signs are a convention (``LoraModule.svd``): read a rank-r direction's cosines up to sign."""
    from saediff.models.lora import RESIDUAL_WRITERS

    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    rslora = bool(adapter.config.get("use_rslora"))
    out = []
    for kind in kinds:
        if kind not in RESIDUAL_WRITERS:
            raise SaediffError(
                f"lora_b_directions: {kind} does not write into the residual stream "
                f"(one of {', '.join(RESIDUAL_WRITERS)})"
            )
        prefix = "lora_b" if kind == "down_proj" else f"lora_b_{kind}"
        for layer, m in sorted(adapter.by_kind(kind).items()):
            where = {"writes_into": f"blocks.{layer}.{RESIDUAL_WRITERS[kind]}"} if kind != "down_proj" else {}
            if m.rank == 1:
                out.append(
                    Direction(
                        f"{prefix}_L{layer}",
                        m.direction() * m.scale,
                        resid_post(layer),
                        "lora_b",
                        {"module": m.name, "scale": m.scale, "adapter": str(adapter.path), **where},
                    )
                )
                continue
            out += _singular_directions(m, prefix, kind, layer, rslora, str(adapter.path))
    return out


def _singular_directions(
    m, prefix: str, kind: str, layer: int, rslora: bool, adapter: str
) -> list[Direction]:
    """A rank-r module's directions: the left singular vectors of ``scale * B @ A`` times their
    (non-zero) singular values, largest first."""
    from saediff.models.lora import RESIDUAL_WRITERS

    out = []
    U, S, _ = m.svd()
    for i in range(m.rank):
        if float(S[i]) <= 1e-6 * float(S[0]) or float(S[0]) == 0.0:
            break  # descending: the rest are zero too
        out.append(
            Direction(
                f"{prefix}_L{layer}_s{i}",
                U[:, i] * S[i],
                resid_post(layer),
                "lora_b",
                {
                    "module": m.name,
                    "kind": kind,
                    "layer": layer,
                    "singular_index": i,
                    "singular_value": float(S[i]),
                    "rank": m.rank,
                    "scale": m.scale,
                    "rslora": rslora,
                    "adapter": adapter,
                    "writes_into": f"blocks.{layer}.{RESIDUAL_WRITERS[kind]}",
                },
            )
        )
    return out


def random_like(d: Direction, seed: int = 0) -> Direction:
    """A random direction with the same norm and hook (the control for steering and ablation)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(d.vector.shape[0], generator=g)
    return Direction(
        f"random_like_{d.name}", v / v.norm() * d.norm, d.hook, "random", {"seed": seed, "like": d.name}
    )


def random_cosine_baseline(d_model: int, n: int = 20000, seed: int = 0) -> dict:
    """|cos| between random Gaussian vectors in ``d_model`` dimensions: mean and 95th percentile."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, d_model, generator=g), torch.randn(n, d_model, generator=g)
    c = torch.nn.functional.cosine_similarity(a, b, dim=1).abs()
    return {
        "d_model": d_model,
        "mean_abs": float(c.mean()),
        "p95_abs": float(c.quantile(0.95)),
        "expected_mean_abs": math.sqrt(2 / (math.pi * d_model)),
    }


@dataclass(frozen=True)
class CosineTable:
    names: list[str]
    hook: str
    matrix: torch.Tensor  # (n, n)
    baseline: dict

    def get(self, a: str, b: str) -> float:
        return float(self.matrix[self.names.index(a), self.names.index(b)])

    def to_json(self) -> dict:
        return {
            "kind": "saediff.cosines",
            "hook": self.hook,
            "names": self.names,
            "matrix": [[round(float(x), 6) for x in row] for row in self.matrix],
            "random_baseline": self.baseline,
        }

    def figure(self):
        import plotly.graph_objects as go

        fig = go.Figure(
            go.Heatmap(
                z=self.matrix.tolist(),
                x=self.names,
                y=self.names,
                zmin=-1,
                zmax=1,
                colorscale="RdBu",
                text=[[f"{v:.2f}" for v in r] for r in self.matrix.tolist()],
                texttemplate="%{text}",
            )
        )
        fig.update_layout(
            title=f"cosine similarity at {self.hook} (random |cos| p95 = {self.baseline['p95_abs']:.2f})"
        )
        return fig


def cosine_table(directions: list[Direction]) -> CosineTable:
    """Pairwise cosines of directions that live at one hook and width."""
    if not directions:
        raise SaediffError("cosine_table: no directions")
    hooks = {d.hook for d in directions}
    if len(hooks) != 1:
        raise SaediffError(
            f"cosine_table: directions live at different hooks {sorted(hooks)}; compare per hook"
        )
    widths = {d.vector.shape[0] for d in directions}
    if len(widths) != 1:
        raise SaediffError(f"cosine_table: directions have different widths {sorted(widths)}")
    U = torch.stack([d.unit() for d in directions])
    return CosineTable(
        [d.name for d in directions], hooks.pop(), U @ U.T, random_cosine_baseline(widths.pop())
    )


def principal_angle_cosines(A: Float[torch.Tensor, "k d"], B: Float[torch.Tensor, "m d"]) -> torch.Tensor:
    """Cosines of the principal angles between span(A rows) and span(B rows), descending."""
    qa, _ = torch.linalg.qr(A.T.double())
    qb, _ = torch.linalg.qr(B.T.double())
    return torch.linalg.svdvals(qa.T @ qb).clamp(0, 1).float()


def span_overlap(span: list[Direction], directions: list[Direction]) -> dict:
    """How much of each direction lies in the span of a set (e.g. the top SAE latents' decoder
    rows): the cosine of its angle to that span (the norm of its unit vector's projection), and
    the principal-angle cosines between the two spans. ``random_rms`` = sqrt(k/d) is what a
    random direction would show against a k-dimensional span in d dimensions."""
    if not span or not directions:
        raise SaediffError("span_overlap: needs at least one direction on each side")
    widths = {d.vector.shape[0] for d in [*span, *directions]}
    if len(widths) != 1:
        raise SaediffError(f"span_overlap: directions have different widths {sorted(widths)}")
    A = torch.stack([d.unit() for d in span])
    return {
        "span": [d.name for d in span],
        "per_direction": {d.name: float(principal_angle_cosines(A, d.unit()[None])[0]) for d in directions},
        "principal_cosines": principal_angle_cosines(A, torch.stack([d.unit() for d in directions])).tolist(),
        "random_rms": math.sqrt(min(len(span), widths.pop()) / A.shape[1]),
    }
