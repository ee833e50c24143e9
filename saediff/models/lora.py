"""PEFT LoRA adapters read straight from disk, without guessing.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys like
``base_model.model.model.layers.{L}.mlp.down_proj.lora_A.weight`` (r, d_in) and
``...lora_B.weight`` (d_out, r). The update a module adds is ``scale * B @ A @ x`` with
``scale = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). For a rank-1 ``down_proj`` adapter,
``B[:, 0]`` is the residual-stream direction it writes; a rank-r module writes into the span of
the left singular vectors of ``scale * B @ A`` (``LoraModule.svd``). Only the modules whose output
is the residual stream (``o_proj``: attention, ``down_proj``: MLP) have residual-space directions.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from jaxtyping import Float

from saediff.errors import MissingFileError, SaediffError
from saediff.models.validate import read_json_file

__all__ = [
    "RESIDUAL_WRITERS",
    "LoraAdapter",
    "LoraModule",
    "LoraSVD",
    "check_adapter_matches",
    "read_adapter",
]

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
RESIDUAL_WRITERS = {"down_proj": "hook_resid_post", "o_proj": "hook_resid_mid"}
"""module kinds whose output is added to the residual stream, and the hook where it first appears
in block L (Llama / Qwen / Mistral / Gemma names; q/k/v/gate/up write into the block's inside)"""


class LoraSVD(NamedTuple):
    """``scale * B @ A = U diag(S) V^T``, singular values descending."""

    U: Float[torch.Tensor, "d_out r"]
    """left singular vectors: the output-space (for o_proj / down_proj: residual) directions"""
    S: Float[torch.Tensor, " r"]
    """singular values, the adapter scale included: the output norm per unit input along V[:, i]"""
    V: Float[torch.Tensor, "d_in r"]


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: ``name`` as in the base model (``model.layers.3.mlp.down_proj``)."""

    name: str
    layer: int | None
    A: Float[torch.Tensor, "r d_in"]
    B: Float[torch.Tensor, "d_out r"]
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def kind(self) -> str:
        """The module's own name, e.g. ``down_proj``."""
        return self.name.rsplit(".", 1)[-1]

    def direction(self) -> Float[torch.Tensor, " d_out"]:
        """``B[:, 0]`` of a rank-1 adapter: the output-space (for down_proj: residual) direction."""
        if self.rank != 1:
            raise SaediffError(
                f"{self.name}: direction() needs a rank-1 adapter, this one has rank {self.rank}"
            )
        return self.B[:, 0]

    def delta_weight(self) -> Float[torch.Tensor, "d_out d_in"]:
        return self.scale * self.B @ self.A

    def svd(self) -> LoraSVD:
        """The SVD of ``delta_weight()`` from the thin factors (QR of B and A^T, then an r x r SVD),
        in float64, never forming the d_out x d_in matrix. Signs, arbitrary in an SVD, are fixed so
        that each left singular vector's largest-magnitude entry is positive."""
        qb, rb = torch.linalg.qr(self.B.double())  # (d_out, r), (r, r)
        qa, ra = torch.linalg.qr(self.A.double().T)  # (d_in, r), (r, r)
        u, s, vh = torch.linalg.svd(self.scale * rb @ ra.T)
        U, V = qb @ u, qa @ vh.T
        sign = torch.sign(U.gather(0, U.abs().argmax(0, keepdim=True)))  # (1, r)
        sign[sign == 0] = 1
        return LoraSVD((U * sign).float(), s.float(), (V * sign).float())


@dataclass(frozen=True)
class LoraAdapter:
    path: Path
    config: dict
    modules: dict[str, LoraModule]

    @property
    def layers(self) -> list[int]:
        return sorted({m.layer for m in self.modules.values() if m.layer is not None})

    def by_kind(self, kind: str = "down_proj") -> dict[int, LoraModule]:
        """Adapted modules of one kind, keyed by layer."""
        return {m.layer: m for m in self.modules.values() if m.kind == kind and m.layer is not None}

    def directions(self, kind: str = "down_proj") -> dict[int, torch.Tensor]:
        """Rank-1 ``B`` directions per layer (unnormalised, scale not applied)."""
        return {layer: m.direction() for layer, m in sorted(self.by_kind(kind).items())}


def read_adapter(path: str | Path) -> LoraAdapter:
    """Read a PEFT LoRA folder. Errors name the file or key at fault."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_path, w_path = path / "adapter_config.json", path / "adapter_model.safetensors"
    for f in (cfg_path, w_path):
        if not f.exists():
            raise MissingFileError(f"adapter file missing: {f}")
    config = read_json_file(cfg_path, "adapter config")
    if config.get("peft_type", "LORA") != "LORA":
        raise SaediffError(f"{cfg_path}: peft_type {config.get('peft_type')!r} is not LORA")
    r, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    tensors = load_file(str(w_path))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            continue  # e.g. modules_to_save copies
        parts.setdefault(m.group("module"), {})[m.group("ab")] = t.float()
    modules = {}
    for name, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise SaediffError(f"{w_path}: module {name} has lora_{''.join(ab)} but not both A and B")
        A, B = ab["A"], ab["B"]
        if A.shape[0] != B.shape[1]:
            raise SaediffError(
                f"{w_path}: {name} lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} ranks differ"
            )
        layer = _LAYER.search(name)
        modules[name] = LoraModule(name, int(layer.group(1)) if layer else None, A, B, scale)
    if not modules:
        raise SaediffError(f"{w_path}: no lora_A/lora_B weights found")
    return LoraAdapter(path, config, modules)


def check_adapter_matches(adapter: LoraAdapter, model: torch.nn.Module) -> None:
    """Raise a one-line error if an adapted module is missing from ``model`` or its shape differs."""
    named = dict(model.named_modules())
    for name, m in adapter.modules.items():
        target = named.get(name)
        if target is None:
            raise SaediffError(f"adapter {adapter.path}: module {name} not found in the model")
        w = getattr(target, "weight", None)
        if w is None or tuple(w.shape) != (m.B.shape[0], m.A.shape[1]):
            shape = None if w is None else tuple(w.shape)
            raise SaediffError(
                f"adapter {adapter.path}: {name} expects weight (d_out, d_in) = "
                f"{(m.B.shape[0], m.A.shape[1])}, the model has {shape}"
            )
