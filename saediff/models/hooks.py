"""Where activations live: TransformerLens hook names, decoder layers, forward hooks.

Layer indexing follows TransformerLens: ``blocks.{L}.hook_resid_post`` is the output of decoder
layer ``L`` (HF ``hidden_states[L + 1]``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from saediff.errors import SaediffError, UnknownKeyError

__all__ = [
    "add_resid_hook",
    "bridge",
    "capture_resid",
    "decoder_layers",
    "first_adapted_block",
    "parse_layer",
    "read_blocks",
    "resid_post",
    "run_with_cache",
    "skip_blocks",
]

_RESID = re.compile(r"^blocks\.(\d+)\.hook_resid_(post|pre|mid)$")


def resid_post(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def parse_layer(hook: str) -> int:
    """The block index of a ``blocks.{L}.hook_resid_*`` name."""
    m = _RESID.match(hook)
    if not m:
        raise SaediffError(f"not a residual hook name: {hook!r} (expected blocks.L.hook_resid_post)")
    return int(m.group(1))


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of an HF causal LM, through a peft wrapper if there is one."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(inner, "model", None), "layers", None)
    if layers is None:
        raise SaediffError(f"cannot find decoder layers (model.model.layers) on {type(inner).__name__}")
    return layers


@contextmanager
def add_resid_hook(
    model: torch.nn.Module, layer: int, fn: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """Replace the output residual of decoder layer ``layer`` by ``fn(resid_BTD)`` while inside."""
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise SaediffError(f"layer {layer} out of range: the model has {len(layers)} layers")

    def hook(_mod, _inp, out):
        if isinstance(out, tuple):
            return (fn(out[0]), *out[1:])
        return fn(out)

    handle = layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class _Stop(Exception):
    pass


def capture_resid(
    model: torch.nn.Module,
    layers: list[int],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> dict[int, torch.Tensor]:
    """Outputs (B, T, D) of the given decoder layers; the forward stops after the deepest one.
    Pass ``attention_mask`` whenever the batch is padded."""
    out: dict[int, torch.Tensor] = {}
    read_blocks(model, layers, input_ids, attention_mask, out.__setitem__)
    return out


def read_blocks(
    model: torch.nn.Module,
    blocks: list[int],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    read: Callable[[int, torch.Tensor], None],
    **forward_kw,
) -> None:
    """Run ``model`` on a batch, calling ``read(block, output)`` (B, T, D) once as each of ``blocks``
    finishes, through forward hooks on those blocks alone; the forward stops after the deepest.
    Nothing is kept unless ``read`` keeps it (a streamed diff sums each block as it passes).
    ``forward_kw`` go to the forward (a KV cache, ``use_cache``)."""
    decoder, last = decoder_layers(model), max(blocks)

    def make(block: int):
        def hook(_mod, _inp, o):
            read(block, o[0] if isinstance(o, tuple) else o)
            if block == last:
                raise _Stop

        return hook

    handles = [decoder[b].register_forward_hook(make(b)) for b in dict.fromkeys(blocks)]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, **forward_kw)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()


def first_adapted_block(model: torch.nn.Module) -> int:
    """The first decoder block holding LoRA weights (0 if any sit outside the blocks, e.g. on the
    embeddings; the number of blocks if none do). Up to it the model and its base agree."""
    layers = decoder_layers(model)
    in_blocks = {id(p) for blk in layers for p in blk.parameters()}
    if any("lora_" in n and id(p) not in in_blocks for n, p in model.named_parameters()):
        return 0
    return next(
        (i for i, blk in enumerate(layers) if any("lora_" in n for n, _ in blk.named_parameters())),
        len(layers),
    )


@contextmanager
def skip_blocks(model: torch.nn.Module, last: int, output) -> Iterator[None]:
    """Run blocks ``0..last`` as stubs while inside: block ``last`` returns ``output`` (a saved
    output of that block, tensor or tuple as the block returns it), the earlier ones pass their
    input through. For re-running only the later blocks on a cached residual."""
    layers = decoder_layers(model)
    as_tuple = isinstance(output, tuple)

    def passthrough(hidden_states, *args, **kwargs):
        return (hidden_states,) if as_tuple else hidden_states

    stubs = {i: passthrough for i in range(last)}
    stubs[last] = lambda *args, **kwargs: output
    try:
        for i, fn in stubs.items():
            layers[i].forward = fn
        yield
    finally:
        for i in stubs:
            del layers[i].forward


def bridge(model: torch.nn.Module, tokenizer) -> object:
    """The TransformerLens ``TransformerBridge`` view of an HF model (peft adapters merged first)."""
    from transformer_lens.model_bridge import TransformerBridge

    if hasattr(model, "merge_and_unload"):
        raise TypeError(
            "bridge: merge the peft adapter first (ModelSpec(merge=True)); the bridge "
            "renames parameters and breaks adapter saving"
        )
    name = getattr(model.config, "_name_or_path", "") or "local"
    return TransformerBridge.boot_transformers(
        name, hf_model=model, tokenizer=tokenizer, device=str(next(model.parameters()).device)
    )


def run_with_cache(
    tl_model, tokens: torch.Tensor, hooks: list[str], attention_mask=None
) -> dict[str, torch.Tensor]:
    """Activations at ``hooks`` only, stopping after the deepest hooked block."""
    known = set(tl_model.hook_dict)
    bad = [h for h in hooks if h not in known]
    if bad:
        raise UnknownKeyError(f"hook(s) not in the model: {', '.join(bad)}")
    layers = [int(m.group(1)) for h in hooks if (m := re.match(r"^blocks\.(\d+)\.", h))]
    stop = max(layers) + 1 if layers and len(layers) == len(hooks) else None
    kw = {"attention_mask": attention_mask} if attention_mask is not None else {}
    _, cache = tl_model.run_with_cache(tokens, names_filter=lambda n: n in hooks, stop_at_layer=stop, **kw)
    return {h: cache[h] for h in hooks}
