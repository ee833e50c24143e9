"""SAE folders: save and load SAELens folders (``cfg.json`` + ``sae_weights.safetensors``, plus saediff's
``saediff.json``), SAELens releases by id, and the check that an SAE fits a model's block."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from saediff.errors import MissingFileError, SaediffError

__all__ = ["SAE_FILES", "check_sae_fits", "check_sae_out", "load_sae", "save_sae"]


SAE_FILES = ("cfg.json", "sae_weights.safetensors")
"""what makes a folder a SAELens SAE folder"""


_SAE_EXTRAS = ("saediff.json", "sparsity.safetensors")
"""what else an SAE folder may hold and a save replaces with it"""


def check_sae_out(path: str | Path) -> None:
    """Raise one line unless ``path`` may take a new SAE: missing, an empty folder, or an SAE
    folder (``cfg.json`` + ``sae_weights.safetensors``, perhaps ``saediff.json``), which a save
    replaces. Anything else is someone's data and is never deleted."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise SaediffError(f"SAE output {path} is a file, not a folder: refusing to replace it")
    names = {p.name for p in path.iterdir()}
    if names and not (set(SAE_FILES) <= names <= {*SAE_FILES, *_SAE_EXTRAS}):
        raise SaediffError(
            f"SAE output {path} is not empty and not an SAE folder ({' + '.join(SAE_FILES)}): "
            "refusing to replace it; choose another folder"
        )


def save_sae(sae, path: str | Path, extra: dict | None = None) -> Path:
    """Write a SAELens folder (cfg.json + sae_weights.safetensors) plus saediff.json, atomically:
    the new folder is written beside ``path``, the old SAE (if any) renamed aside, the new one
    renamed in, then the old one deleted, so a crash leaves the old SAE or the new one, never a
    mix. Refuses a ``path`` that holds anything but an SAE (:func:`check_sae_out`)."""
    from saediff import __version__
    from saediff._io import atomic_write_json, replace_folder

    path = Path(path)
    check_sae_out(path)

    def write(tmp: Path) -> None:
        sae.save_model(tmp)
        atomic_write_json(
            tmp / "saediff.json", {"kind": "saediff.sae", "saediff_version": __version__, **(extra or {})}
        )

    replace_folder(path, write)
    return path


def load_sae(source: str | Path, *, sae_id: str | None = None, device: str = "cpu"):
    """A SAELens SAE from a local SAELens folder, or a SAELens release: ``release`` + ``sae_id``,
    or one string ``release:sae_id`` (through the hub; offline that fails in one line)."""
    from sae_lens import SAE

    path = Path(source)
    if path.exists():
        cfg = path / "cfg.json"
        if not cfg.exists():
            raise MissingFileError(f"SAE folder {path} lacks cfg.json (not a SAELens folder)")
        try:
            json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise SaediffError(f"{cfg}: not valid JSON ({e.msg}, line {e.lineno})") from None
        try:
            return SAE.load_from_disk(str(path), device=device)
        except (KeyError, TypeError, ValueError, OSError) as e:
            raise SaediffError(
                f"SAE folder {path}: cannot load ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            ) from None
    if sae_id is None and ":" in str(source):
        source, sae_id = str(source).split(":", 1)
    if sae_id is None:
        sae_id = _only_sae_of(str(source))
    try:
        return SAE.from_pretrained(str(source), sae_id, device=device)
    except Exception as e:  # offline, unknown release: one line, not a stack trace
        raise SaediffError(
            f"cannot load SAELens release {source!r} / {sae_id!r} (it needs the hub, or a local "
            f"SAELens folder instead): {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        ) from None


def _only_sae_of(release: str) -> str:
    """The SAE id of a SAELens release that holds exactly one (offline: sae-lens's own list)."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    known = get_pretrained_saes_directory()
    if release not in known:
        raise MissingFileError(
            f"SAE {release!r}: no such folder, and not a SAELens release (saes/registry.yaml "
            "lists the ones that fit EM models)"
        )
    ids = list(known[release].saes_map)
    if len(ids) != 1:
        raise SaediffError(
            f"SAELens release {release!r} holds {len(ids)} SAEs: name one as {release}:SAE_ID "
            f"(e.g. {release}:{ids[0]})"
        )
    return ids[0]


def check_sae_fits(sae, model: torch.nn.Module, where: str) -> int:
    """The block index of the SAE's hook, after checking that it is a block's output
    (``blocks.L.hook_resid_post``: what forward hooks on decoder layers read), that the model has
    that block and that its width matches the SAE's ``d_in`` (one-line errors naming ``where``)."""
    from saediff.models.hooks import decoder_layers, parse_layer, resid_post

    hook = sae.cfg.metadata.hook_name
    try:
        layer = parse_layer(hook or "")
    except ValueError:
        layer = None
    if layer is None or hook != resid_post(layer):
        raise SaediffError(f"SAE {where}: hook {hook!r} is not a block's output (blocks.L.hook_resid_post)")
    n_layers = len(decoder_layers(model))
    if layer >= n_layers:
        raise SaediffError(f"SAE {where}: hook {hook} is beyond the model's blocks 0-{n_layers - 1}")
    d_model = model.config.hidden_size
    if sae.cfg.d_in != d_model:
        raise SaediffError(
            f"SAE {where}: d_in {sae.cfg.d_in} does not match the model's width {d_model} at {hook}"
        )
    return layer
