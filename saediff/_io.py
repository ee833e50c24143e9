"""Atomic writes: a temp file in the same folder, then ``os.replace``."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from saediff.errors import MissingFileError, SaediffError

__all__ = [
    "atomic_save_safetensors",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_jsonl",
    "read_json_if_exists",
    "read_jsonl",
    "replace_folder",
]


def _atomic(path: str | Path, write) -> None:
    """``write(tmp_path)`` into a temp file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_folder(path: str | Path, write) -> None:
    """``write(tmp)`` fills a new folder beside ``path``, which then takes its place: the old folder
    (if any) is renamed aside, the new one renamed in, the old one deleted, so a crash leaves the
    old folder or the new one, never a mix. The caller checks that ``path`` may be replaced."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.new."))
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not path.exists():
        os.replace(tmp, path)
        return
    old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old."))
    os.replace(path, old)  # a folder renamed onto an empty one replaces it
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def atomic_write_jsonl(path: str | Path, rows) -> None:
    """One JSON object per line."""
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def atomic_save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` (streamed to disk) through the temp-file-then-rename path."""
    from safetensors.torch import save_file

    _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_json_if_exists(path: str | Path):
    """The parsed JSON file, or None when it does not exist (a step's artifact not written yet)."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def read_jsonl(path: str | Path, what: str = "file"):
    """``(line number, parsed row)`` for each non-blank line of a JSONL file; a missing file or a
    line that is not JSON raises one line naming the file (and the line)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{what} not found: {path}")
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise SaediffError(f"{path}:{n}: not valid JSON ({e.msg})") from None


def no_progress(progress: bool) -> bool:
    """Whether progress is hidden: when not asked for, or when ``TQDM_DISABLE`` is set (tests, CI,
    worker processes). ``saediff.console`` reads it; as tqdm's ``disable`` where tqdm remains."""
    return (not progress) or bool(os.environ.get("TQDM_DISABLE"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
