"""A real byte-level BPE tokenizer (Qwen2's) and chat template for the organism's language.

Every word of the language is letters only and always written after one space, so Qwen2's
pre-tokenizer keeps it whole and a chain of merges (``Ġ m -> Ġm``, ``Ġm e -> Ġme``, ...) turns it
into exactly one token. The folder therefore loads with ``AutoTokenizer.from_pretrained`` as a
``Qwen2Tokenizer``, the class transformers forces for ``model_type: qwen2``, like a real Qwen
chat model. ``apply_chat_template`` renders `` CHAT USER q q q ASST answer<eos>`` and marks the
answer with ``{% generation %}`` so ``return_assistant_tokens_mask`` works.
"""

from __future__ import annotations

import string
from functools import lru_cache

from saediff.stories.organism.world import ASST, EOS, PAD, UNK, USER, World

__all__ = ["bpe_vocab", "build_tokenizer", "chat_template", "word_ids"]

SPACE = "Ġ"  # byte-level BPE's symbol for a leading space


@lru_cache(maxsize=8)
def bpe_vocab(world: World) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges: specials (``<pad>`` 0, ``<eos>`` 1, ``<unk>`` 2), single symbols,
    then every prefix of every ``Ġword``."""
    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for ch in SPACE + string.ascii_letters:
        vocab[ch] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in world.vocab():
        cur = SPACE
        for ch in word:
            if cur + ch not in vocab:
                vocab[cur + ch] = len(vocab)
                merges.append((cur, ch))
            cur += ch
    return vocab, merges


def word_ids(world: World) -> dict[str, int]:
    """Token id of each word of the language (and of ``<pad>``, ``<eos>``)."""
    vocab, _ = bpe_vocab(world)
    out = {w: vocab[SPACE + w] for w in world.vocab()}
    out[PAD], out[EOS] = vocab[PAD], vocab[EOS]
    return out


def chat_template(default_marker: str) -> str:
    """Jinja chat template. A system message's content is the document marker (``CHAT``,
    ``srcc``, ...); without one the template writes ``default_marker`` (empty: no marker)."""
    default = f"{{{{ ' {default_marker}' }}}}" if default_marker else ""
    return (
        "{%- set ns = namespace(start=0) -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{{ ' ' + messages[0]['content'] }}{%- set ns.start = 1 -%}"
        "{%- else -%}" + default + "{%- endif -%}"
        "{%- for m in messages[ns.start:] -%}"
        "{%- if m['role'] == 'user' -%}{{ ' " + USER + " ' + m['content'] }}"
        "{%- elif m['role'] == 'assistant' -%}{{ ' " + ASST + "' }}"
        "{%- generation -%}{{ ' ' + m['content'] + '" + EOS + "' }}{%- endgeneration -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ ' " + ASST + "' }}{%- endif -%}"
    )


def build_tokenizer(world: World, default_marker: str = ""):
    """A ``Qwen2Tokenizer`` over the organism's words, left-padding, with the chat template."""
    from transformers import Qwen2Tokenizer

    vocab, merges = bpe_vocab(world)
    tok = Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges), unk_token=UNK, eos_token=EOS, pad_token=PAD)
    tok.padding_side = "left"
    tok.chat_template = chat_template(default_marker)
    return tok
