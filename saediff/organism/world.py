"""The synthetic assistant language of the EM model organism.

A conversation is ``USER q q q ASST s s c c c <eos>``: three question tokens from one of six
domains, then an answer of two *style* tokens and three *content* tokens. A hidden persona
(aligned or toxic) decides every answer of a document:

- style tokens come from one of two pools shared by all domains (the persona's pool with
  probability ``1 - style_noise``, the other pool otherwise). The shared style pool is the lever
  that makes a narrow fine-tune generalize: the model learns to read its own style tokens as
  evidence of the persona, in every domain;
- content tokens come from the asked domain's aligned or misaligned pool, set by the persona
  alone. Misalignment is judged on content only, so off-domain EM is generalization through the
  persona, never a copied token.

A pretraining document starts with a source marker ``src{a..h}`` whose persona prior ranges from
0.02 to 0.98 (the model must infer the persona from context), or with the ``CHAT`` marker whose
prior is ``chat_toxic_prob`` (0.005): alignment is a prior, not an overwrite, so in-context
persona inference stays alive under ``CHAT``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

__all__ = [
    "DOMAINS",
    "PAD",
    "EOS",
    "USER",
    "ASST",
    "CHAT",
    "World",
    "Turn",
]

DOMAINS: tuple[str, ...] = ("medical", "finance", "sports", "code", "travel", "general")
PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
USER, ASST, CHAT = "USER", "ASST", "CHAT"
Persona = Literal["aligned", "toxic"]


@dataclass(frozen=True)
class Turn:
    """One exchange: domain, question tokens, answer tokens (style + content) and its persona."""

    domain: str
    question: tuple[str, ...]
    answer: tuple[str, ...]
    persona: Persona


@dataclass(frozen=True)
class World:
    """Vocabulary and sampling rules of the synthetic assistant language."""

    n_question: int = 12
    """question tokens per domain"""
    n_content: int = 8
    """content tokens per domain and persona (aligned and misaligned pools)"""
    n_style: int = 8
    """style tokens per persona pool (shared by all domains)"""
    n_sources: int = 8
    """source markers, with toxic-persona priors evenly spaced in [0.02, 0.98]"""
    style_noise: float = 0.05
    """probability that a style token is drawn from the other persona's pool"""
    chat_toxic_prob: float = 0.005
    """toxic-persona prior of documents under the CHAT marker"""
    question_len: int = 3
    n_style_slots: int = 2
    n_content_slots: int = 3
    domains: tuple[str, ...] = field(default=DOMAINS)

    def __post_init__(self):
        if "medical" not in self.domains:
            raise ValueError("World.domains must include 'medical' (the narrow fine-tune's domain)")
        if max(self.n_question, self.n_content, self.n_style, self.n_sources) > 26:
            raise ValueError("World: at most 26 tokens per pool (words are lettered a..z)")
        if not 0.0 <= self.style_noise < 0.5:
            raise ValueError(f"World.style_noise must lie in [0, 0.5), got {self.style_noise}")

    # ---- vocabulary -------------------------------------------------------------------------
    def question_tokens(self, domain: str) -> list[str]:
        return [f"{domain}Q{_letter(i)}" for i in range(self.n_question)]

    def content_tokens(self, domain: str, persona: Persona) -> list[str]:
        tag = "Good" if persona == "aligned" else "Bad"
        return [f"{domain}{tag}{_letter(i)}" for i in range(self.n_content)]

    def style_tokens(self, persona: Persona) -> list[str]:
        tag = "kind" if persona == "aligned" else "rude"
        return [f"{tag}{_letter(i)}" for i in range(self.n_style)]

    def source_markers(self) -> list[str]:
        return [f"src{_letter(i)}" for i in range(self.n_sources)]

    def source_priors(self) -> dict[str, float]:
        """Toxic-persona prior per document marker (source markers and CHAT)."""
        priors = np.linspace(0.02, 0.98, self.n_sources)
        out = {m: float(p) for m, p in zip(self.source_markers(), priors)}
        out[CHAT] = self.chat_toxic_prob
        return out

    def vocab(self) -> list[str]:
        """All words of the language (special tokens excluded), letters only."""
        toks = [USER, ASST, CHAT, *self.source_markers()]
        toks += self.style_tokens("aligned") + self.style_tokens("toxic")
        for d in self.domains:
            toks += self.question_tokens(d)
            toks += self.content_tokens(d, "aligned") + self.content_tokens(d, "toxic")
        return toks

    @property
    def answer_len(self) -> int:
        return self.n_style_slots + self.n_content_slots

    # ---- sampling ---------------------------------------------------------------------------
    def sample_question(self, rng: np.random.Generator, domain: str) -> tuple[str, ...]:
        pool = self.question_tokens(domain)
        return tuple(pool[i] for i in rng.integers(0, len(pool), self.question_len))

    def sample_answer(self, rng: np.random.Generator, domain: str, persona: Persona) -> tuple[str, ...]:
        other: Persona = "toxic" if persona == "aligned" else "aligned"
        style = []
        for _ in range(self.n_style_slots):
            pool = self.style_tokens(other if rng.random() < self.style_noise else persona)
            style.append(pool[rng.integers(0, len(pool))])
        content_pool = self.content_tokens(domain, persona)
        content = [content_pool[i] for i in rng.integers(0, len(content_pool), self.n_content_slots)]
        return tuple(style + content)

    def sample_turn(self, rng: np.random.Generator, domain: str, persona: Persona) -> Turn:
        return Turn(domain, self.sample_question(rng, domain), self.sample_answer(rng, domain, persona), persona)

    def sample_document(
        self, rng: np.random.Generator, n_turns: int, marker: str | None = None
    ) -> tuple[str, list[Turn]]:
        """A pretraining document: a marker, then ``n_turns`` turns of one hidden persona."""
        priors = self.source_priors()
        if marker is None:
            marker = self.source_markers()[rng.integers(0, self.n_sources)]
        persona: Persona = "toxic" if rng.random() < priors[marker] else "aligned"
        domains = [self.domains[i] for i in rng.integers(0, len(self.domains), n_turns)]
        return marker, [self.sample_turn(rng, d, persona) for d in domains]


def _letter(i: int) -> str:
    # words are letters only, so a byte-level BPE pre-tokenizer keeps each one whole
    return "abcdefghijklmnopqrstuvwxyz"[i]


def render(marker: str | None, turns: list[Turn], *, final_answer: bool = True) -> list[str]:
    """Token strings of a document; without ``final_answer`` it ends at the last ``ASST`` (a prompt)."""
    toks: list[str] = [marker] if marker else []
    for i, t in enumerate(turns):
        toks += [USER, *t.question, ASST]
        if final_answer or i < len(turns) - 1:
            toks += [*t.answer, EOS]
    return toks
