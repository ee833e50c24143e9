"""Interventions at inference: add a direction to the residual stream, or project it out."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch

from saediff.models.hooks import add_resid_hook, decoder_layers

__all__ = ["add_direction", "clamp_latent", "clamp_projection", "project_out"]


@contextmanager
def add_direction(
    model: torch.nn.Module, layer: int, vector: torch.Tensor, alpha: float = 1.0
) -> Iterator[None]:
    """Add ``alpha * vector`` to the output residual of block ``layer`` at every position."""
    v = vector.detach()

    def fn(resid_BTD: torch.Tensor) -> torch.Tensor:
        return resid_BTD + alpha * v.to(resid_BTD)

    with add_resid_hook(model, layer, fn):
        yield


@contextmanager
def project_out(
    model: torch.nn.Module, layer: int | Sequence[int] | str, vector: torch.Tensor
) -> Iterator[None]:
    """Remove the component along ``vector`` from the output residual of block ``layer``.

    ``layer`` may be a list of blocks, or ``"all"``: directional ablation as in the refusal-
    direction work (Arditi et al. 2024), the same direction removed after every block, so later
    layers cannot rebuild it from what earlier layers wrote.
    """
    u = vector.detach() / vector.norm()
    layers = (
        range(len(decoder_layers(model))) if layer == "all" else [layer] if isinstance(layer, int) else layer
    )

    def fn(resid_BTD: torch.Tensor) -> torch.Tensor:
        u_ = u.to(resid_BTD)
        return resid_BTD - (resid_BTD @ u_)[..., None] * u_

    with ExitStack() as stack:
        for L in layers:
            stack.enter_context(add_resid_hook(model, L, fn))
        yield


@contextmanager
def clamp_projection(
    model: torch.nn.Module, values: dict[int, float], vector: torch.Tensor
) -> Iterator[None]:
    """Set the component along ``vector`` to ``values[L]`` after each block ``L`` given:
    ``x + (value - x.u) u``. Clamping to the base model's mean keeps whatever the base model holds
    on that axis (its aligned prior), where projecting the axis out would remove it too."""
    u = vector.detach() / vector.norm()

    def make(value: float):
        def fn(resid_BTD: torch.Tensor) -> torch.Tensor:
            u_ = u.to(resid_BTD)
            return resid_BTD + (value - resid_BTD @ u_)[..., None] * u_

        return fn

    with ExitStack() as stack:
        for L, value in values.items():
            stack.enter_context(add_resid_hook(model, L, make(float(value))))
        yield


@contextmanager
def clamp_latent(model: torch.nn.Module, layer: int, sae, latent: int, value: float) -> Iterator[None]:
    """Set one SAE latent to ``value`` at every position, keeping the SAE's error term:
    ``x + (value - z_latent(x)) * W_dec[latent]``."""
    w = sae.W_dec[latent].detach()

    def fn(resid_BTD: torch.Tensor) -> torch.Tensor:
        if sae.W_enc.device != resid_BTD.device:
            sae.to(resid_BTD.device)
        z = sae.encode(resid_BTD.to(sae.W_enc.dtype))[..., latent]
        return resid_BTD + ((value - z)[..., None] * w.to(resid_BTD.device)).to(resid_BTD.dtype)

    with add_resid_hook(model, layer, fn):
        yield
