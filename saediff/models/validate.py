"""Cheap checks of what a command was given, before it loads a model or trains: a model's block count
and width from its ``config.json`` (or a GGUF file's header), hooks and layers against them, a PEFT
adapter's tensor shapes against the base's safetensors header, two
models of a pair against each other. Nothing here reads weights; every failure is one
``SaediffError`` line naming the file, hook, layer or shape at fault.

    shape = model_shape("runs/organism/aligned")      # ModelShape(n_layers=4, d_model=64, ...)
    check_hook("blocks.9.hook_resid_post", shape)      # UnknownKeyError: ... has 4 blocks (0-3)

A hub name that is not in the local cache gives ``None`` (the check is skipped; the load that
follows names what is wrong), so nothing here touches the network.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from saediff.errors import MissingFileError, SaediffError, UnknownKeyError

__all__ = [
    "ModelShape",
    "check_adapter",
    "check_gguf_file",
    "check_hook",
    "check_layers",
    "check_model",
    "check_pair",
    "model_shape",
    "read_json_file",
]

_GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelShape:
    """What a model's config says about its residual stream."""

    n_layers: int
    """decoder blocks (``num_hidden_layers``; ``{arch}.block_count`` in a GGUF header)"""
    d_model: int
    """residual width (``hidden_size``; ``{arch}.embedding_length``)"""
    source: str
    """the model as the user named it (for messages)"""
    folder: Path | None = None
    """the local HF folder, when there is one (its safetensors headers give tensor shapes)"""

    def blocks(self) -> str:
        return f"{self.n_layers} blocks (0-{self.n_layers - 1})"


def read_json_file(path: Path, what: str) -> dict:
    """A JSON object from ``path``, or one line naming the file (missing, not JSON, not an object)."""
    if not path.is_file():
        raise MissingFileError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SaediffError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    except UnicodeDecodeError:
        raise SaediffError(f"{path}: not a text file") from None
    if not isinstance(data, dict):
        raise SaediffError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def check_gguf_file(path: str | Path) -> Path:
    """``path`` if it is a GGUF file (its first four bytes ``GGUF``), else one line naming it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise SaediffError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    return path


def _gguf_shape(path: Path, source: str) -> ModelShape:
    from saediff.models.gguf import header_fields

    _, field = header_fields(path)
    arch = field("general.architecture")
    n_layers, d_model = field(f"{arch}.block_count"), field(f"{arch}.embedding_length")
    if not isinstance(n_layers, int) or not isinstance(d_model, int):
        raise SaediffError(f"{path}: GGUF header lacks {arch}.block_count / {arch}.embedding_length")
    return ModelShape(n_layers, d_model, source)


def _config_shape(cfg: dict, where: Path, source: str, folder: Path | None) -> ModelShape:
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    n_layers = text.get("num_hidden_layers", text.get("n_layer"))
    d_model = text.get("hidden_size", text.get("n_embd"))
    if not isinstance(n_layers, int) or not isinstance(d_model, int):
        raise SaediffError(f"{where}: no num_hidden_layers / hidden_size (not a causal LM config)")
    return ModelShape(n_layers, d_model, source, folder)


def model_shape(model: str) -> ModelShape | None:
    """The block count and width of ``model`` (an HF folder, a ``.gguf`` file, a packaged GGUF's short
    name, or a hub name in the local cache), read from its config alone; None when it cannot be
    known without the network (a hub name not cached) or a package that is not installed."""
    from saediff.models.gguf import SHORT_NAMES, gguf_source

    path = Path(model).expanduser()
    if model.lower().endswith(".gguf"):
        return _gguf_shape(check_gguf_file(path), model)
    if model in SHORT_NAMES and not path.exists():
        try:
            return _gguf_shape(check_gguf_file(gguf_source(model)), model)
        except SaediffError:
            return None  # the package is missing: the load says how to install it
    if path.exists() or model.startswith((".", "/", "~")):
        if not path.is_dir():
            raise MissingFileError(f"model folder not found: {path}")
        cfg_path = path / "config.json"
        if not cfg_path.exists():
            raise MissingFileError(f"model folder {path} lacks config.json (not a Hugging Face model folder)")
        return _config_shape(read_json_file(cfg_path, "model config"), cfg_path, model, path)
    return _hub_shape(model)


def _hub_shape(model: str) -> ModelShape | None:
    """A hub model's shape from its cached ``config.json`` (no download), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    try:
        cached = try_to_load_from_cache(model, "config.json")
    except Exception:  # a malformed repo id: the load names it
        return None
    if not isinstance(cached, str):
        return None
    cfg_path = Path(cached)
    return _config_shape(read_json_file(cfg_path, "model config"), cfg_path, model, None)


def check_model(model: str | None) -> ModelShape | None:
    """``model_shape`` for an option that may be absent."""
    return None if model is None else model_shape(model)


_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def check_hook(hook: str, shape: ModelShape | None, flag: str = "--hook") -> int | None:
    """The block of a TransformerLens hook name (``blocks.L.hook_resid_post``, ``blocks.L.mlp.hook_post``),
    after checking the model has that block; None for a hook outside the blocks (``hook_embed``,
    ``ln_final.hook_normalized``: whether the model has it is the reader's check)."""
    m = _BLOCK.match(hook or "")
    if m is None:
        return None
    layer = int(m.group(1))
    if shape is not None and layer >= shape.n_layers:
        raise UnknownKeyError(f"{flag} {hook}: {shape.source} has {shape.blocks()}")
    return layer


def check_layers(layers, shape: ModelShape | None, flag: str) -> None:
    """Every block index in ``layers`` exists in the model."""
    if shape is None:
        return
    bad = [int(x) for x in layers if not 0 <= int(x) < shape.n_layers]
    if bad:
        raise UnknownKeyError(
            f"{flag}: layers {bad} outside the model's blocks 0..{shape.n_layers - 1} ({shape.source})"
        )


def _header_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    shapes = {}
    for f in files:
        try:
            with safe_open(str(f), "pt") as st:
                for name in st.keys():
                    shapes[name] = tuple(st.get_slice(name).get_shape())
        except Exception as e:  # safetensors raises its own error types for a corrupt header
            raise SaediffError(
                f"{f}: not a readable safetensors file ({str(e).splitlines()[0][:200]})"
            ) from None
    return shapes


def check_adapter(adapter: str | Path, shape: ModelShape | None = None, flag: str = "--adapter") -> None:
    """A PEFT LoRA folder that fits the base: its config and weights exist and parse, and every adapted
    module's ``(d_out, d_in)`` equals the base's weight of that name (read from the base folder's
    safetensors headers; a GGUF or hub base is checked when it loads)."""
    path = Path(adapter).expanduser()
    if not path.is_dir():
        raise MissingFileError(f"{flag}: adapter folder not found: {path}")
    cfg = read_json_file(path / "adapter_config.json", "adapter config")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise SaediffError(f"{path / 'adapter_config.json'}: peft_type {cfg.get('peft_type')!r} is not LORA")
    weights = path / "adapter_model.safetensors"
    if not weights.exists():
        raise MissingFileError(f"{flag}: adapter file missing: {weights}")
    if shape is None or shape.folder is None:
        return
    base_files = sorted(shape.folder.glob("*.safetensors"))
    if not base_files:
        return  # a .bin checkpoint: checked when it loads
    base = _header_shapes(base_files)
    parts: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, s in _header_shapes([weights]).items():
        m = re.match(
            r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$", key
        )
        if m:
            parts.setdefault(m.group("module"), {})[m.group("ab")] = s
    for module, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"} or len(ab["A"]) != 2 or len(ab["B"]) != 2:
            continue  # read_adapter names a half-saved module
        want = base.get(f"{module}.weight")
        if want is None:
            continue  # saved under another prefix, perhaps: the load matches modules by name
        got = (ab["B"][0], ab["A"][1])
        if tuple(want) != got:
            raise SaediffError(
                f"{flag} {path}: {module} expects weight (d_out, d_in) = {got}, {shape.source} has "
                f"{tuple(want)} (an adapter for another model?)"
            )


def check_pair(
    base: str, finetuned: str | None = None, adapter: str | None = None, hook: str | None = None
) -> ModelShape | None:
    """A base model and its fine-tune (a model, or an adapter on the base), checked before either
    loads: both configs exist, their block counts and widths agree, the adapter fits the base, and
    ``hook`` (when given) is one of their blocks. Returns the base's shape."""
    if finetuned is None and adapter is None:
        raise SaediffError("give --finetuned or --adapter")
    shape = model_shape(base)
    if finetuned is not None:
        ft = model_shape(finetuned)
        if (
            shape is not None
            and ft is not None
            and (shape.n_layers, shape.d_model) != (ft.n_layers, ft.d_model)
        ):
            raise SaediffError(
                f"--finetuned {finetuned} has {ft.n_layers} blocks of width {ft.d_model}, --base {base} "
                f"{shape.n_layers} of width {shape.d_model}: not a fine-tune of it"
            )
    if adapter is not None:
        check_adapter(adapter, model_shape(finetuned) if finetuned is not None else shape)
    if hook is not None:
        check_hook(hook, shape)
    return shape
