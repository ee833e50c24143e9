"""Export directions: ``directions.safetensors`` + ``manifest.json``, loadable with one call.

Each direction is stored twice: ``<name>`` (unnormalised) and ``<name>.unit`` (unit vector, for
steering); the manifest records hook, method, norm, provenance, score/rank and the scale that was
validated for steering, if any.
"""

from __future__ import annotations

import json
from pathlib import Path

from saediff.directions import Direction

__all__ = ["export_directions", "load_directions"]


def export_directions(directions: list[Direction], out: str | Path, *, model: str = "", extra: dict | None = None,
                      per_direction: dict[str, dict] | None = None) -> Path:
    """Write ``out/directions.safetensors`` and ``out/manifest.json`` (atomically, file by file)."""
    from saediff import __version__
    from saediff._io import atomic_save_safetensors, atomic_write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = [d.name for d in directions]
    if len(set(names)) != len(names):
        raise ValueError(f"export_directions: duplicate names {sorted(n for n in names if names.count(n) > 1)}")
    tensors = {}
    for d in directions:
        tensors[d.name] = d.vector.float().contiguous()
        tensors[f"{d.name}.unit"] = d.unit().float().contiguous()
    atomic_save_safetensors(tensors, out / "directions.safetensors")
    manifest = {"kind": "saediff.directions", "saediff_version": __version__, "model": model, **(extra or {}),
                "directions": [{"name": d.name, "hook": d.hook, "method": d.method, "norm": d.norm,
                                "provenance": d.provenance, **(per_direction or {}).get(d.name, {})}
                               for d in directions]}
    atomic_write_json(out / "manifest.json", manifest)
    return out


def load_directions(path: str | Path) -> dict[str, Direction]:
    """Directions from an export folder (or its ``directions.safetensors``), by name."""
    from safetensors.torch import load_file

    path = Path(path)
    folder = path.parent if path.suffix == ".safetensors" else path
    mpath, wpath = folder / "manifest.json", folder / "directions.safetensors"
    for f in (mpath, wpath):
        if not f.exists():
            raise FileNotFoundError(f"direction export incomplete: {f} missing")
    manifest = json.loads(mpath.read_text())
    tensors = load_file(str(wpath))
    out = {}
    for entry in manifest["directions"]:
        name = entry["name"]
        if name not in tensors:
            raise ValueError(f"{wpath}: manifest lists {name!r} but the file has no such tensor")
        out[name] = Direction(name, tensors[name], entry["hook"], entry["method"], entry.get("provenance", {}))
    return out
