"""Fingerprints of what produced an artifact, so a saved result is reused only for the setup that made it.

A fingerprint is a small JSON dict: the model and adapter (path and digests of their config and
weights), the data file's digest, the SAE (hook, width, digest of its weights), the latent sets,
the evaluator (judge URL and model, questions, samples) and the condition. Artifacts store it
under ``"provenance"``; ``mismatch`` names the first key where two differ, so a refused reuse says
exactly why.

Digests of large weight files are taken over the file's header, its size and 16 evenly spaced
64 KiB slices (every byte of a file under 64 MiB): retrained weights differ everywhere, so a
sample tells them apart without reading 15 GB of a 7B model at every start.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import torch

__all__ = [
    "digest",
    "evaluator_fingerprint",
    "file_digest",
    "intervention_fingerprint",
    "mismatch",
    "model_fingerprint",
    "sae_fingerprint",
    "tensor_digest",
]

log = logging.getLogger(__name__)
_WHOLE_BELOW = 64 << 20
_SLICE = 64 << 10
_N_SLICES = 16
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def digest(obj) -> str:
    """sha256 (16 hex digits) of a JSON-able object, keys sorted."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: str | Path) -> str | None:
    """Digest of a file's content (sampled above 64 MiB, see the module docstring); None if absent."""
    path = Path(path)
    if not path.is_file():
        return None
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        if size <= _WHOLE_BELOW:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            for i in range(_N_SLICES):
                f.seek((size - _SLICE) * i // (_N_SLICES - 1))
                h.update(f.read(_SLICE))
    return h.hexdigest()[:16]


def _folder_digests(path: Path, config: str) -> dict:
    """``config``: the digest of the folder's config file; ``weights``: of its weight files (or of
    the single file of a GGUF model)."""
    if path.is_file():
        return {"weights": file_digest(path)}
    weights = sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES) if path.is_dir() else []
    return {
        "config": file_digest(path / config),
        "weights": digest({p.name: file_digest(p) for p in weights}) if weights else None,
    }


def model_fingerprint(spec) -> dict:
    """Model and adapter as loaded by ``ModelSpec``: a local path is resolved and digested (config
    and weights); a GGUF file (or packaged short name) by its sha256 alone, the key of its
    materialized folder, so the same file under another path or name matches; a hub name stands
    for itself."""
    from saediff.models.gguf import gguf_digest, gguf_source

    fp: dict = {"dtype": spec.dtype}
    precision = spec.resolved_precision() if hasattr(spec, "resolved_precision") else "fp32"
    if precision != "fp32":  # absent means float32: what every artifact before --precision ran in
        fp["precision"] = precision
    gguf_file = gguf_source(spec.model)
    if gguf_file is not None:
        fp["model"] = f"gguf:{gguf_digest(gguf_file)}"
    elif spec.is_local:
        path = Path(spec.model).expanduser().resolve()
        fp.update(
            model=str(path), **{f"model_{k}": v for k, v in _folder_digests(path, "config.json").items()}
        )
    else:
        fp["model"] = spec.model
    if spec.adapter is not None:
        path = Path(spec.adapter).expanduser().resolve()
        fp.update(
            adapter=str(path),
            **{f"adapter_{k}": v for k, v in _folder_digests(path, "adapter_config.json").items()},
        )
    return fp


def tensor_digest(t: torch.Tensor, max_rows: int = 4096) -> str:
    """Digest of a tensor's shape, dtype and values (at most ``max_rows`` evenly strided rows of a
    large matrix, in float32)."""
    t = t.detach()
    rows = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)
    step = max(1, rows.shape[0] // max_rows)
    sample = rows[::step].to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)}{t.dtype}".encode())
    h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def sae_fingerprint(sae, path: str | Path | None = None) -> dict:
    """An SAE's identity: its hook, width, architecture, the digest of its weights and, when known,
    the folder (or release id) and its ``cfg.json`` digest. The weights decide: the same SAE copied
    elsewhere matches, another SAE at the same path does not."""
    meta = getattr(sae.cfg, "metadata", None)
    fp = {
        "hook": getattr(meta, "hook_name", None),
        "d_sae": int(sae.cfg.d_sae),
        "d_in": int(sae.cfg.d_in),
        "architecture": sae.cfg.architecture() if callable(getattr(sae.cfg, "architecture", None)) else None,
        "weights": digest({k: tensor_digest(v) for k, v in sorted(sae.state_dict().items()) if v.numel()}),
    }
    if path:
        p = Path(str(path)).expanduser()
        fp["path"] = str(p.resolve()) if p.exists() else str(path)
        if (p / "cfg.json").is_file():
            fp["cfg"] = file_digest(p / "cfg.json")
    return fp


def evaluator_fingerprint(evaluator) -> dict:
    """What decides an evaluator's numbers: its own ``fingerprint()`` when it has one, else its
    type and a digest of its fields (a dataclass) or its repr."""
    own = getattr(evaluator, "fingerprint", None)
    if callable(own):
        return own()
    kind = f"{type(evaluator).__module__}.{type(evaluator).__qualname__}"
    if dataclasses.is_dataclass(evaluator):
        return {"evaluator": kind, "fields": digest(dataclasses.asdict(evaluator))}
    return {"evaluator": kind, "repr": digest(repr(evaluator))}


def intervention_fingerprint(intervention) -> dict | None:
    """What an intervention context manager does: the function (``steering.add_direction``, ...)
    and its arguments, tensors by digest, SAEs by ``sae_fingerprint``; the model it acts on is left
    out (the model has its own fingerprint)."""
    if intervention is None:
        return None
    func = getattr(intervention, "func", None)
    if func is None:  # not a @contextmanager: only its type is known
        return {"type": f"{type(intervention).__module__}.{type(intervention).__qualname__}"}

    def one(v):
        if isinstance(v, torch.nn.Module):
            return sae_fingerprint(v) if hasattr(v, "W_dec") and hasattr(v, "cfg") else None
        if torch.is_tensor(v):
            return tensor_digest(v)
        if isinstance(v, dict):
            return {str(k): one(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [one(x) for x in v]
        return v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)

    return {
        "func": f"{func.__module__}.{func.__qualname__}",
        "args": [one(a) for a in intervention.args],
        "kwargs": {k: one(v) for k, v in intervention.kwds.items()},
    }


def _flatten(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def mismatch(old: dict | None, new: dict) -> str | None:
    """None when ``old`` equals ``new`` (both None included: nothing was recorded and nothing is
    asked); else the first differing key with both values, one line (``old`` None alone: the
    artifact carries no fingerprint, e.g. written by an older saediff)."""
    if old is None:
        return None if new is None else "no provenance recorded"
    a, b = (
        _flatten(json.loads(json.dumps(old, default=str))),
        _flatten(json.loads(json.dumps(new, default=str))),
    )
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            return f"{k}: {_short(a.get(k))} (saved) vs {_short(b.get(k))} (now)"
    return None


def _short(v) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 80 else s[:77] + "..."
