"""Cheap checks of an SAE folder before anything loads: its files, its ``cfg.json``, and its hook and
``d_in`` against a model's config (``saediff.models.validate.ModelShape``). Kept apart from
``saediff.saes.loading``, whose code is part of the organism's recipe stamp."""

from __future__ import annotations

from pathlib import Path

from saediff.errors import MissingFileError, SaediffError
from saediff.saes.loading import SAE_FILES

__all__ = ["check_sae_folder"]


def check_sae_folder(sae: str | Path, shape=None, flag: str = "--sae") -> dict | None:
    """An SAE folder's ``cfg.json`` (``d_in``, ``hook_name``), checked against the model (``shape``, a
    ``saediff.models.validate.ModelShape``; None: not checked), without reading a weight: the folder
    holds a SAELens SAE, its hook is one of the model's blocks, its ``d_in`` is the model's width.
    None for a ``RELEASE:SAE_ID`` (a hub SAE: checked once it loads)."""
    from saediff.models.validate import check_hook, read_json_file

    path = Path(sae).expanduser()
    if not path.exists():
        if ":" in str(sae) and not str(sae).startswith((".", "/", "~")):
            return None  # a SAELens release
        raise MissingFileError(f"{flag}: SAE {path}: no such folder")
    if not path.is_dir():
        raise SaediffError(f"{flag}: {path} is a file, not an SAE folder ({' + '.join(SAE_FILES)})")
    missing = [f for f in SAE_FILES if not (path / f).exists()]
    if missing:
        raise MissingFileError(f"{flag}: {path} is not an SAE folder (it lacks {', '.join(missing)})")
    cfg = read_json_file(path / "cfg.json", "SAE config")
    d_in = cfg.get("d_in")
    hook = cfg.get("hook_name") or (cfg.get("metadata") or {}).get("hook_name")
    if not isinstance(d_in, int):
        raise SaediffError(f"{path / 'cfg.json'}: no integer d_in")
    if shape is not None:
        check_hook(hook or "", shape, f"{flag} {path}: its hook")
        if d_in != shape.d_model:
            raise SaediffError(
                f"{flag} {path}: d_in {d_in} does not match the width {shape.d_model} of {shape.source}"
            )
    return {"d_in": d_in, "hook_name": hook}
