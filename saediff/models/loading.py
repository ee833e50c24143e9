"""Load chat models (HF folder, hub name or GGUF file, optional PEFT adapter) and sample from them.

Offline-first: a local folder is loaded with ``local_files_only=True`` and never touches the
network; ``trust_remote_code`` is off unless the spec asks for it. A GGUF file (or the short name
of a packaged one, ``smollm2-135m``) is materialized once into an HF folder (``saediff.models.gguf``).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from saediff import console
from saediff.errors import MissingFileError, SaediffError
from saediff.models.precision import (
    CHOICES,
    ENV,
    Resolved,
    autocast,
    model_precision,
    pinned_fp32,
    resolve_precision,
    set_precision,
)

__all__ = ["LoadedModel", "Messages", "ModelSpec", "chat_tokens", "generate", "load_model", "load_pair"]

log = logging.getLogger(__name__)
Messages = list[dict[str, str]]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSpec:
    """What to load. The CLI's ``--model/--adapter`` flags parse into this."""

    model: str
    """a local HF causal-LM folder, a hub name (``Qwen/Qwen2.5-7B-Instruct``), a ``.gguf`` file or
    the short name of a packaged GGUF (``smollm2-135m``, see ``saediff.models.gguf.SHORT_NAMES``)"""
    adapter: str | None = None
    """a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)"""
    merge: bool = False
    """merge the adapter into the weights (``merge_and_unload``), e.g. for analysis"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """``auto``: bfloat16 on GPU, float32 on CPU"""
    device: str = "auto"
    """``auto``: cuda if available, else cpu"""
    trust_remote_code: bool = False
    """run model code from the hub; off unless you ask"""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """the arithmetic of its forwards: bf16 autocast over the loaded weights, or none; ``auto``:
    bf16 where the device multiplies bf16 natively (``saediff.models.precision``)"""

    def __post_init__(self):
        if self.merge and self.adapter is None:
            raise SaediffError("ModelSpec: merge=True needs an adapter")
        if self.precision not in CHOICES:
            raise SaediffError(f"ModelSpec.precision must be auto, fp32 or bf16, got {self.precision!r}")

    @property
    def is_local(self) -> bool:
        return Path(self.model).expanduser().exists() or self.model.startswith((".", "/", "~"))

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        return torch.bfloat16 if self.resolved_device().startswith("cuda") else torch.float32

    def resolved_precision(self) -> Resolved:
        """``fp32`` or ``bf16``: what ``precision`` means on this machine's device (``auto`` is
        fp32 for the EM model organism, whose figures are float32's)."""
        if self.precision == "auto" and not os.environ.get(ENV) and self.is_local and pinned_fp32(self.model):
            return "fp32"  # unless --precision / SAEDIFF_PRECISION asks otherwise
        return resolve_precision(self.precision, self.resolved_device())


@dataclass
class LoadedModel:
    """A loaded causal LM (possibly peft-wrapped) with its tokenizer and the spec it came from."""

    model: torch.nn.Module
    tokenizer: object
    spec: ModelSpec
    _bridge: object = None

    def bridge(self):
        """The TransformerLens bridge view (built once; adapters must be merged first).

        Building it rewires the HF model in place: plain forwards stay exact, but HF's KV cache no
        longer works, so ``generate`` then runs without a cache (slower, same answers)."""
        if self._bridge is None:
            from saediff.models.hooks import bridge

            self._bridge = bridge(self.model, self.tokenizer)
        return self._bridge

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def precision(self) -> Resolved:
        """``fp32`` or ``bf16``: what every forward of ``model`` runs at (resolved at load,
        ``saediff.models.precision.set_precision``)."""
        return model_precision(self.model) or "fp32"

    def autocast(self):
        """One autocast region at the model's precision around many forwards (a generation, a
        scoring loop): each forward is under it anyway, but inside one region the bf16 copies of
        the weights are cast once, not once per forward (generation: 1.9x slower without)."""
        return autocast(self.precision, self.device)

    def format_chat(self, messages: Messages, add_generation_prompt: bool = True) -> str:
        """The conversation rendered with the model's own chat template."""
        return apply_template(
            self.tokenizer, messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )


def chat_tokens(
    tokenizer, messages: Messages, turns: Literal["last", "all"] = "last"
) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and a 0/1 mask of its assistant tokens: the last assistant
    turn (``turns="last"``, the response an analysis reads) or every one (``"all"``, the tokens a
    chat fine-tune takes its loss on). An assistant turn's tokens are its text and the
    end-of-turn token the model generates (``<|im_end|>``, ``<|eot_id|>``), never its header.

    A template that marks assistant text with ``{% generation %}`` decides itself
    (``return_assistant_tokens_mask``, TRL's convention). Any other template works by prefixes:
    each prompt (the turns before an assistant turn, with the generation prompt) renders as a
    prefix of the conversation up to and including that turn, and what the turn adds is the
    assistant's, less the whitespace a template writes after the end-of-turn token (ChatML's
    newline after ``<|im_end|>``: the model never generates it).
    """
    if not messages or messages[-1]["role"] != "assistant":
        raise SaediffError("chat_tokens: the conversation must end with an assistant turn")
    ends = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    ends = ends if turns == "all" else ends[-1:]
    if _has_generation_block(tokenizer):
        return _generation_mask(tokenizer, messages, ends)
    return _prefix_mask(tokenizer, messages, ends)


_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _has_generation_block(tokenizer) -> bool:
    try:
        template = tokenizer.get_chat_template()
    except (ValueError, AttributeError):
        return False
    return bool(_GENERATION.search(template))


def _generation_mask(tokenizer, messages: Messages, ends: list[int]) -> tuple[list[int], list[int]]:
    """The template's own ``{% generation %}`` mask, kept from the first of ``ends`` on."""
    enc = apply_template(
        tokenizer, messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, marked = list(enc["input_ids"]), list(enc["assistant_masks"])
    start = len(_render_ids(tokenizer, messages[: ends[0]], True))
    mask = [int(bool(m) and j >= start) for j, m in enumerate(marked)]
    if not any(mask):
        raise SaediffError("chat_tokens: the chat template's {% generation %} block marks no assistant token")
    return ids, mask


def _prefix_mask(tokenizer, messages: Messages, ends: list[int]) -> tuple[list[int], list[int]]:
    ids = _render_ids(tokenizer, messages, False)
    mask = [0] * len(ids)
    special = _special_ids(tokenizer)
    for end in ends:
        p_ids = _render_ids(tokenizer, messages[:end], True)
        upto = ids if end == len(messages) - 1 else _render_ids(tokenizer, messages[: end + 1], False)
        if upto[: len(p_ids)] != p_ids or ids[: len(upto)] != upto:
            raise SaediffError(
                "chat_tokens: the chat template does not render each prompt as a token prefix "
                "of the conversation"
            )
        stop = len(upto)
        last_special = max((j for j in range(len(p_ids), stop) if ids[j] in special), default=None)
        if last_special is not None and not tokenizer.decode(ids[last_special + 1 : stop]).strip():
            stop = last_special + 1  # the turn ends at its end-of-turn token
        mask[len(p_ids) : stop] = [1] * (stop - len(p_ids))
    return ids, mask


def _special_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens, with added tokens marked special (Llama-3's
    ``<|eot_id|>`` is one without being in ``all_special_ids`` on every checkpoint)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}


def apply_template(tokenizer, messages: Messages, **kwargs):
    """``tokenizer.apply_chat_template``; a tokenizer without a chat template (a base model) is one
    line naming it rather than transformers' traceback: every prompt saediff reads is rendered with
    the model's own template."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise SaediffError(
            f"the tokenizer of {name} has no chat template: use a chat (instruct) model, or set "
            f"tokenizer.chat_template before loading prompts"
        )
    return tokenizer.apply_chat_template(messages, **kwargs)


def _render_ids(tokenizer, messages: Messages, add_generation_prompt: bool) -> list[int]:
    text = apply_template(tokenizer, messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _check_local(path: Path, what: str, required: tuple[str, ...]) -> None:
    if not path.is_dir():
        raise MissingFileError(f"{what} folder not found: {path}")
    missing = [f for f in required if not (path / f).exists()]
    if missing:
        raise MissingFileError(f"{what} folder {path} lacks {', '.join(missing)}")


def load_model(spec: ModelSpec | str) -> LoadedModel:
    """Load model, tokenizer and optional PEFT adapter, in eval mode. A GGUF model loads from
    its materialized folder (written on first use): every command resolves models here."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from saediff.models.gguf import gguf_source, materialize

    if isinstance(spec, str):
        spec = ModelSpec(spec)
    src: str = spec.model
    kwargs: dict = {"trust_remote_code": spec.trust_remote_code}
    gguf_file = gguf_source(spec.model)
    if gguf_file is not None:
        src, kwargs["local_files_only"] = str(materialize(gguf_file)), True
    elif spec.is_local:
        path = Path(spec.model).expanduser()
        _check_local(path, "model", ("config.json",))
        src, kwargs["local_files_only"] = str(path), True
    try:
        tok = AutoTokenizer.from_pretrained(src, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=spec.resolved_dtype(), **kwargs)
    except OSError as e:  # offline, unknown repo, gated model: one line, not a stack trace
        where = "folder" if spec.is_local else "hub model"
        raise SaediffError(f"cannot load {where} {spec.model!r}: {str(e).splitlines()[0][:300]}") from None
    model.to(spec.resolved_device())
    if spec.adapter is not None:
        from peft import PeftModel

        from saediff.models.lora import check_adapter_matches, read_adapter

        _check_local(Path(spec.adapter), "adapter", ("adapter_config.json",))
        check_adapter_matches(read_adapter(spec.adapter), model)  # one line, not PEFT's state-dict dump
        model = PeftModel.from_pretrained(model, spec.adapter, is_trainable=False)
        if spec.merge:
            model = model.merge_and_unload()
    model.eval()
    set_precision(model, spec.resolved_precision())
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return LoadedModel(model, tok, spec)


def load_pair(
    base: str, finetuned: str | None = None, adapter: str | None = None
) -> tuple[LoadedModel, LoadedModel]:
    """A base model and its fine-tune (``finetuned``, or ``base`` plus a PEFT ``adapter``, merged),
    both loaded, for the methods that read the same tokens in both."""
    if finetuned is None and adapter is None:
        raise SaediffError("give a fine-tuned model or an adapter")
    return load_model(base), load_model(
        ModelSpec(finetuned or base, adapter=adapter, merge=adapter is not None)
    )


@torch.no_grad()
def generate(
    lm: LoadedModel,
    conversations: list[Messages],
    *,
    max_new_tokens: int = 600,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 64,
    seed: int | None = None,
    progress: bool = True,
) -> list[str]:
    """Sample one assistant reply per conversation (left padding with an attention mask).

    Returns the decoded new text without special tokens. ``temperature=0`` is greedy.
    """
    if seed is not None:
        torch.manual_seed(seed)
    tok = lm.tokenizer
    texts = [lm.format_chat(c) for c in conversations]
    out: list[str] = []
    with lm.autocast():  # one region: the bf16 weights are cast once, not at every new token
        for i in console.progress(range(0, len(texts), batch_size), desc="generate", enabled=progress):
            enc = tok(texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(lm.device) for k, v in enc.items()}
            sample = temperature > 0
            gen = lm.model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=sample,
                temperature=temperature if sample else None,
                top_p=top_p if sample else None,
                top_k=0 if sample else None,
                pad_token_id=tok.pad_token_id,
                use_cache=lm._bridge is None,  # a bridged model gives wrong answers from the KV cache
            )
            new = gen[:, enc["input_ids"].shape[1] :]
            out += tok.batch_decode(new, skip_special_tokens=True)
    return out
