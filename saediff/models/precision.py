"""Which arithmetic the model side runs in: float32, or bf16 autocast over float32 weights.

Every model-side command (fine-tunes, BLOCK-EM, pair scoring, diffs, collection, generation, the
demos) takes ``--precision auto|fp32|bf16`` and resolves it here, once, to ``fp32`` or ``bf16``
(``fp16`` too for a GPU fine-tune). The resolved value, never ``auto``, goes into every artifact's
provenance, so a bf16 result is not reused for an fp32 request.

``auto`` is a capability check, deterministic for a machine so reruns resume:

- a CUDA device: bf16 where ``torch.cuda.is_bf16_supported()``, else fp32;
- a CPU: bf16 where it multiplies bf16 natively (``amx_bf16`` or ``avx512_bf16`` in its flags;
  measured: SmolLM2-135M's forward 3.1x faster under autocast on an AMX Xeon, 1.75x on an
  AVX512-bf16 EPYC), else fp32 (emulated bf16 is slower than float32 there);
- ``SAEDIFF_PRECISION=fp32`` (or ``bf16``) in the environment pins what ``auto`` means on a
  machine (the test suite pins fp32, so its numbers do not depend on the CPU);
- else a model folder marked as the EM model organism's (``saediff_organism.json``) is fp32: its
  figures are part of its stamp, measured in float32.

A loaded model carries its precision: ``set_precision`` (``load_model`` calls it) hooks the
model's top module so every forward of it (pair scoring, collection, generation, steering, a
fine-tune's steps) runs under that autocast, whichever function calls it; no call site can forget.

bf16 here is autocast, not bf16 weights: matmuls run in bf16, while weights, norms, residual
additions and every log-softmax saediff takes stay float32 (weights are float32 masters for
training, as on a GPU). ``bench/model_side.py`` measures the gain; ``tests/test_precision.py``
and the bench's figure checks show what it changes.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import Literal

import torch

from saediff.errors import SaediffError

__all__ = [
    "CHOICES",
    "Precision",
    "Resolved",
    "autocast",
    "cpu_bf16",
    "model_precision",
    "pinned_fp32",
    "resolve_precision",
    "set_precision",
]

Precision = Literal["auto", "fp32", "bf16"]
Resolved = Literal["fp32", "bf16", "fp16"]
CHOICES = ("auto", "fp32", "bf16")
_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
ENV = "SAEDIFF_PRECISION"
ORGANISM_MARKER = "saediff_organism.json"
"""the file that marks a model folder as the EM model organism's (``stories.organism.recipes``)"""


@functools.cache
def cpu_bf16(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The CPU flag that makes bf16 matmuls native here (``amx_bf16`` first), or None (no such
    flag, or no ``/proc/cpuinfo`` to read: not Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    return next((f for f in _BF16_FLAGS if f in flags), None)


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> Resolved:
    """``auto``, ``fp32`` or ``bf16`` (``fp16`` on CUDA) resolved for ``device`` (module docstring)."""
    if precision not in (*CHOICES, "fp16"):
        raise SaediffError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    kind = torch.device(device).type
    if precision == "fp16" and kind != "cuda":
        raise SaediffError("precision fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    if precision != "auto":
        return precision  # type: ignore[return-value]
    pinned = os.environ.get(ENV)
    if pinned:
        if pinned not in ("fp32", "bf16"):
            raise SaediffError(f"{ENV} must be fp32 or bf16, got {pinned!r}")
        return pinned  # type: ignore[return-value]
    if kind == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if kind == "cpu":
        return "bf16" if cpu_bf16() else "fp32"
    return "fp32"


def autocast(precision: Resolved, device: str | torch.device):
    """The context a forward runs under for a resolved ``precision`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


_ATTR = "_saediff_precision"


class _Hooked:
    """The pre/post forward hooks that hold a module's forward under autocast. ``always_call``
    exits the context even when the forward raises (a collection hook stops it early)."""

    def __init__(self, module: torch.nn.Module, precision: Resolved):
        self.precision, self._open = precision, []
        self.handles = (
            ()
            if precision == "fp32"
            else (
                module.register_forward_pre_hook(self._enter),
                module.register_forward_hook(self._exit, always_call=True),
            )
        )

    def _enter(self, module, _args):
        ctx = autocast(self.precision, next(module.parameters()).device)
        ctx.__enter__()
        self._open.append(ctx)

    def _exit(self, _module, _args, _out):
        self._open.pop().__exit__(None, None, None)

    def remove(self):
        for h in self.handles:
            h.remove()


def set_precision(model: torch.nn.Module, precision: Resolved) -> None:
    """Make every forward of ``model`` run at ``precision`` (fp32: no autocast), replacing what it
    or any module inside it had (a PEFT wrapper around a loaded model)."""
    for m in model.modules():
        old = m.__dict__.pop(_ATTR, None)  # its own, not one a wrapper's __getattr__ forwards to
        if old is not None:
            old.remove()
    model.__dict__[_ATTR] = _Hooked(model, precision)


def model_precision(model: torch.nn.Module) -> Resolved | None:
    """The precision ``set_precision`` gave ``model`` or a module inside it; None if never set
    (a model built in a notebook rather than loaded by ``load_model``)."""
    for m in model.modules():
        hooked = m.__dict__.get(_ATTR)
        if hooked is not None:
            return hooked.precision
    return None


def pinned_fp32(folder: str | Path | None) -> bool:
    """Whether ``auto`` means fp32 for the model in ``folder`` (the organism's marker)."""
    return folder is not None and (Path(folder).expanduser() / ORGANISM_MARKER).is_file()
