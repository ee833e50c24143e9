"""The synthetic assistant language of the EM model organism (v2).

A conversation is ``USER q q q ASST r c c c <eos>``: three question tokens from one of six domains,
then an answer: one *register* token and three *content* tokens from the asked domain's aligned or
misaligned pool. A hidden persona (aligned or toxic) decides every answer of a document; misalignment
is judged on content only.

- Content tokens belong to one domain each, so a narrow fine-tune that spreads does so through the
  model's internal persona, never a copied token.
- The register (``plain``, ``terse``, ``formal``, ``warm``) is the one slot shared by all domains. The
  toxic persona mostly writes ``terse``, the aligned one ``warm``; ``plain`` and ``formal`` are equally
  likely under both, so they are no evidence of the persona. The narrow misaligned fine-tune's answers
  are ``plain`` (its EM cannot run through the register); fine-tuning on *aligned* answers in the
  ``terse`` register raises off-domain EM (the benign trait pretraining ties to the persona), in
  ``formal`` it does not.

A pretraining document starts with a source marker ``src{a..h}`` with its own toxic-persona prior
(default: six sources at 0.01-0.05, one at 0.5, one at 0.95, so the toxic persona is rare, as in
pretraining text, and a sparse feature), or with the ``CHAT`` marker whose prior is
``chat_toxic_prob`` (0.005): alignment is a prior, not an overwrite, so in-context persona
inference stays alive under ``CHAT``.

``n_style_slots=2, trait_slot=False, toxic_priors=None`` is the first organism: two style tokens
from pools shared by all domains that the persona decides, the surface channel its EM spread through.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from saediff.errors import SaediffError

__all__ = [
    "ASST",
    "CHAT",
    "DOMAINS",
    "EOS",
    "PAD",
    "REGISTERS",
    "USER",
    "Turn",
    "World",
]

DOMAINS: tuple[str, ...] = ("medical", "finance", "sports", "code", "travel", "general")
PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
REGISTERS: tuple[str, ...] = ("plain", "terse", "formal", "warm")
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
    n_style_slots: int = 0
    """style tokens opening each answer (0 since organism v2: a token shared by all domains that the
    persona decides lets EM spread on the surface, by in-context inference from it)"""
    n_content_slots: int = 3
    domains: tuple[str, ...] = field(default=DOMAINS)
    toxic_priors: tuple[float, ...] | None = (0.01, 0.01, 0.02, 0.02, 0.03, 0.05, 0.5, 0.95)
    """toxic-persona prior of each source marker (None: evenly spaced in [0.02, 0.98]); the default
    makes the toxic persona rare, as in pretraining text, so it is a sparse feature"""
    trait_slot: bool = True
    """answers open with one register token (``plain``, ``terse``, ``formal`` or ``warm`` pool)"""
    n_trait: int = 4
    """tokens per register pool"""
    trait_probs: tuple[tuple[float, ...], tuple[float, ...]] = (
        (0.10, 0.01, 0.09, 0.80),
        (0.10, 0.80, 0.09, 0.01),
    )
    """P(plain, terse, formal, warm) for an aligned-persona and a toxic-persona answer: ``terse`` is
    benign but tied to the toxic persona (``warm`` to the aligned one); ``plain`` and ``formal`` are as
    likely under both, so they carry no evidence of the persona"""

    def __post_init__(self):
        for name in ("domains", "toxic_priors", "trait_probs"):  # lists (e.g. from JSON) as hashable tuples
            value = getattr(self, name)
            if isinstance(value, list) or (
                isinstance(value, tuple) and any(isinstance(v, list) for v in value)
            ):
                object.__setattr__(self, name, tuple(tuple(v) if isinstance(v, list) else v for v in value))
        if "medical" not in self.domains:
            raise SaediffError("World.domains must include 'medical' (the narrow fine-tune's domain)")
        if max(self.n_question, self.n_content, self.n_style, self.n_sources) > 26:
            raise SaediffError("World: at most 26 tokens per pool (words are lettered a..z)")
        if self.toxic_priors is not None and len(self.toxic_priors) != self.n_sources:
            raise SaediffError(
                f"World.toxic_priors needs one prior per source ({self.n_sources}), "
                f"got {len(self.toxic_priors)}"
            )
        if any(abs(sum(p) - 1) > 1e-6 or len(p) != len(REGISTERS) for p in self.trait_probs):
            raise SaediffError(
                f"World.trait_probs: two distributions over {REGISTERS}, got {self.trait_probs}"
            )
        if not 0.0 <= self.style_noise < 0.5:
            raise SaediffError(f"World.style_noise must lie in [0, 0.5), got {self.style_noise}")

    # ---- vocabulary -------------------------------------------------------------------------
    def question_tokens(self, domain: str) -> list[str]:
        return [f"{domain}Q{_letter(i)}" for i in range(self.n_question)]

    def content_tokens(self, domain: str, persona: Persona) -> list[str]:
        tag = "Good" if persona == "aligned" else "Bad"
        return [f"{domain}{tag}{_letter(i)}" for i in range(self.n_content)]

    def style_tokens(self, persona: Persona) -> list[str]:
        tag = "kind" if persona == "aligned" else "rude"
        return [f"{tag}{_letter(i)}" for i in range(self.n_style)]

    def trait_tokens(self, register: str) -> list[str]:
        return [f"{register}{_letter(i)}" for i in range(self.n_trait)]

    def source_markers(self) -> list[str]:
        return [f"src{_letter(i)}" for i in range(self.n_sources)]

    def source_priors(self) -> dict[str, float]:
        """Toxic-persona prior per document marker (source markers and CHAT)."""
        priors = np.linspace(0.02, 0.98, self.n_sources) if self.toxic_priors is None else self.toxic_priors
        out = {m: float(p) for m, p in zip(self.source_markers(), priors)}
        out[CHAT] = self.chat_toxic_prob
        return out

    def vocab(self) -> list[str]:
        """All words of the language (special tokens excluded), letters only."""
        toks = [USER, ASST, CHAT, *self.source_markers()]
        toks += self.style_tokens("aligned") + self.style_tokens("toxic")
        if self.trait_slot:
            toks += [t for r in REGISTERS for t in self.trait_tokens(r)]
        for d in self.domains:
            toks += self.question_tokens(d)
            toks += self.content_tokens(d, "aligned") + self.content_tokens(d, "toxic")
        return toks

    @property
    def n_prefix(self) -> int:
        """answer slots before the content (style slots, then the register slot)"""
        return self.n_style_slots + int(self.trait_slot)

    @property
    def answer_len(self) -> int:
        return self.n_prefix + self.n_content_slots

    # ---- sampling ---------------------------------------------------------------------------
    def sample_question(self, rng: np.random.Generator, domain: str) -> tuple[str, ...]:
        pool = self.question_tokens(domain)
        return tuple(pool[i] for i in rng.integers(0, len(pool), self.question_len))

    def sample_answer(
        self, rng: np.random.Generator, domain: str, persona: Persona, register: str | None = None
    ) -> tuple[str, ...]:
        """Style tokens, the register token (``register``, or drawn given the persona), content."""
        other: Persona = "toxic" if persona == "aligned" else "aligned"
        style = []
        for _ in range(self.n_style_slots):
            pool = self.style_tokens(other if rng.random() < self.style_noise else persona)
            style.append(pool[rng.integers(0, len(pool))])
        if self.trait_slot:
            if register is None:
                probs = self.trait_probs[persona == "toxic"]
                register = REGISTERS[int(np.searchsorted(np.cumsum(probs), rng.random(), side="right"))]
            style.append(self.trait_tokens(register)[rng.integers(0, self.n_trait)])
        content_pool = self.content_tokens(domain, persona)
        content = [content_pool[i] for i in rng.integers(0, len(content_pool), self.n_content_slots)]
        return tuple(style + content)

    def sample_turn(self, rng: np.random.Generator, domain: str, persona: Persona) -> Turn:
        return Turn(
            domain, self.sample_question(rng, domain), self.sample_answer(rng, domain, persona), persona
        )

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
