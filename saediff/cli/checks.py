"""The cheap checks every command runs on what it was given, before it loads a model or trains
(issue 35): choices and dtypes, a model's config against hooks and blocks, an adapter against its
base, a diff run's base, an export folder's directions, a neutral-text file. Each failure is one
``SaediffError`` line naming the option, file, row, hook or shape at fault; the library's checks
live in ``saediff.models.validate`` and ``saediff.saes.checks``.
"""

from __future__ import annotations

from pathlib import Path

from saediff.cli.common import _run_base
from saediff.errors import MissingFileError, SaediffError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_dtype(dtype: str, flag: str = "--dtype", choices: tuple[str, ...] = DTYPES) -> None:
    if dtype not in choices:
        raise SaediffError(f"{flag} must be {', '.join(choices[:-1])} or {choices[-1]}, got {dtype!r}")


def check_inputs(model: str | None = None, adapter: str | None = None, hooks=(), layers=(), flag="--layers"):
    """The cheap checks of a model-side command, before anything loads (``saediff.models.validate``):
    the model's config (or GGUF header) exists and parses, the adapter fits it, every hook and
    block index is one of its blocks. Returns the model's shape (None: a hub model not cached)."""
    from saediff.models.validate import check_adapter, check_hook, check_layers, check_model

    shape = check_model(model)
    if adapter is not None:
        check_adapter(adapter, shape)
    for hook in hooks:
        check_hook(hook, shape)
    check_layers(layers, shape, flag)
    return shape


def run_shape(run_dir: Path, layers=(), flag: str = "--layers"):
    """The shape of a diff run's base model (from its ``run.json``, the config alone), with the
    block indices ``layers`` checked against it."""
    from saediff.models.validate import check_layers, check_model

    shape = check_model(_run_base(run_dir)["base"])
    check_layers(layers, shape, flag)
    return shape


def check_choice(value: str, choices: tuple[str, ...], flag: str) -> None:
    if value not in choices:
        raise SaediffError(f"{flag} must be {' or '.join(choices)}, got {value!r}")


def check_direction(source: str, shape=None, flag: str = "--direction", folder: Path | None = None):
    """A direction ``FOLDER:NAME`` (or ``NAME`` in ``folder``) that exists in its export folder, with
    the model's width (``shape``), read from the export's manifest and safetensors header alone."""
    from saediff.models.validate import read_json_file

    if folder is None:
        text, _, name = str(source).rpartition(":")
        if not text:
            raise SaediffError(
                f"{flag} is FOLDER:NAME (an export folder and a direction in it), got {source!r}"
            )
        folder = Path(text)
    else:
        name = source
    check_export_folder(folder, flag)
    manifest = read_json_file(folder / "manifest.json", "export manifest")
    entries = {e.get("name"): e for e in manifest.get("directions", []) if isinstance(e, dict)}
    if name not in entries:
        raise SaediffError(
            f"{flag}: {folder} has no direction {name!r} (it has {', '.join(sorted(entries))})"
        )
    if shape is not None:
        from safetensors import safe_open

        with safe_open(str(folder / "directions.safetensors"), "pt") as st:
            width = st.get_slice(name).get_shape()[-1] if name in st.keys() else None
        if width is not None and width != shape.d_model:
            raise SaediffError(
                f"{flag} {folder}:{name} has width {width}, {shape.source} has width {shape.d_model}"
            )
    return name


def check_export_folder(folder: Path, flag: str) -> None:
    """An export folder (``manifest.json`` + ``directions.safetensors``) exists."""
    for f in ("manifest.json", "directions.safetensors"):
        if not (Path(folder) / f).is_file():
            raise MissingFileError(f"{flag}: {folder} is not a direction export folder ({f} missing)")


def check_neutral(path) -> None:
    """A ``--neutral`` file's rows, before any model loads (``neutral_rows``: the rows that
    ``saediff.evaluation.neutral.neutral_from_file`` tokenizes later)."""
    if path is None:
        return
    from saediff.evaluation.neutral import neutral_rows

    neutral_rows(path)
