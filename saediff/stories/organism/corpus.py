"""Vectorised sampling of the organism's documents straight into token ids.

``World.sample_document`` is the readable reference; this module draws the same distribution
for hundreds of thousands of documents at numpy speed (a test checks the two agree).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from saediff.stories.organism.tokenizer import word_ids
from saediff.stories.organism.world import ASST, CHAT, EOS, PAD, REGISTERS, USER, World

__all__ = ["TokenData", "Vocab", "sample_documents", "single_turn_chats"]


class Vocab:
    """Id lookup tables for vectorised sampling."""

    def __init__(self, world: World):
        self.world = world
        self.ids = word_ids(world)
        d = world.domains
        self.question = np.array([[self.ids[t] for t in world.question_tokens(x)] for x in d])  # (D, Q)
        self.content = np.array(  # (D, 2, C): persona 0 aligned, 1 toxic
            [[[self.ids[t] for t in world.content_tokens(x, p)] for p in ("aligned", "toxic")] for x in d]
        )
        self.style = np.array([[self.ids[t] for t in world.style_tokens(p)] for p in ("aligned", "toxic")])
        if world.trait_slot:  # (registers, n_trait) and the cumulative register probabilities per persona
            self.trait = np.array([[self.ids[t] for t in world.trait_tokens(r)] for r in REGISTERS])
            self.trait_cdf = np.cumsum(np.array(world.trait_probs), axis=1)
        self.markers = [*world.source_markers(), CHAT]
        priors = world.source_priors()
        self.marker_ids = np.array([self.ids[m] for m in self.markers])
        self.marker_prior = np.array([priors[m] for m in self.markers])
        self.pad, self.eos, self.user, self.asst = (self.ids[t] for t in (PAD, EOS, USER, ASST))


@dataclass(frozen=True)
class TokenData:
    """Token ids of equal-length documents with what generated them.

    ``labels`` is ``input_ids`` with ``-100`` where no loss is taken; ``persona`` is 1 for a
    toxic-persona document; ``domains`` (N, turns) are domain indices into ``World.domains``.
    """

    input_ids: torch.Tensor  # (N, T)
    labels: torch.Tensor  # (N, T)
    persona: torch.Tensor  # (N,)
    domains: torch.Tensor  # (N, turns)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def _turns(
    v: Vocab,
    rng: np.random.Generator,
    persona: np.ndarray,
    n_turns: int,
    domains=None,
    register: int | None = None,
):
    """(N, n_turns, turn_len) ids of turns and an answer mask of the same shape; ``register`` (an
    index into ``REGISTERS``) fixes the register token, else it is drawn given the persona."""
    w = v.world
    n = persona.shape[0]
    if domains is None:
        domains = rng.integers(0, len(w.domains), (n, n_turns))
    q = v.question[domains[..., None], rng.integers(0, w.n_question, (n, n_turns, w.question_len))]
    p = persona[:, None, None]
    flip = rng.random((n, n_turns, w.n_style_slots)) < w.style_noise
    style = v.style[np.where(flip, 1 - p, p), rng.integers(0, w.n_style, (n, n_turns, w.n_style_slots))]
    content = v.content[
        domains[..., None],
        np.broadcast_to(p, (n, n_turns, w.n_content_slots)),
        rng.integers(0, w.n_content, (n, n_turns, w.n_content_slots)),
    ]
    col = lambda x: np.full((n, n_turns, 1), x)
    parts = [col(v.user), q, col(v.asst), style]
    if w.trait_slot:
        if register is None:
            reg = (rng.random((n, n_turns, 1))[..., None] >= v.trait_cdf[p]).sum(-1)
            reg = np.minimum(reg, len(REGISTERS) - 1)
        else:
            reg = np.full((n, n_turns, 1), register)
        parts.append(v.trait[reg, rng.integers(0, w.n_trait, (n, n_turns, 1))])
    ids = np.concatenate([*parts, content, col(v.eos)], axis=-1)
    answer = np.zeros_like(ids, dtype=bool)
    answer[..., w.question_len + 2 :] = True  # style, register, content, eos
    return ids, answer, domains


def sample_documents(
    world: World,
    rng: np.random.Generator,
    n_docs: int,
    n_turns: int = 4,
    chat_fraction: float = 0.0,
    unmarked_fraction: float = 0.0,
) -> TokenData:
    """Pretraining documents: a marker (source, CHAT, or none with prior 0.5) and ``n_turns`` turns
    of one persona; loss on every real token."""
    v = Vocab(world)
    kind = rng.random(n_docs)
    src = rng.integers(0, world.n_sources, n_docs)
    marker = np.where(kind < chat_fraction, len(v.markers) - 1, src)
    unmarked = (kind >= chat_fraction) & (kind < chat_fraction + unmarked_fraction)
    prior = np.where(unmarked, 0.5, v.marker_prior[marker])
    persona = (rng.random(n_docs) < prior).astype(np.int64)
    ids, _, domains = _turns(v, rng, persona, n_turns)
    ids = ids.reshape(n_docs, -1)
    first = v.marker_ids[marker][:, None]
    ids = np.concatenate([first, ids], axis=1)
    # unmarked documents start with USER and are right-padded, so positions match unmarked prompts
    ids[unmarked] = np.concatenate([ids[unmarked, 1:], np.full((int(unmarked.sum()), 1), v.pad)], axis=1)
    labels = np.where(ids == v.pad, -100, ids)
    return TokenData(
        torch.from_numpy(ids), torch.from_numpy(labels), torch.from_numpy(persona), torch.from_numpy(domains)
    )


def single_turn_chats(
    world: World,
    rng: np.random.Generator,
    n: int,
    persona: int,
    domain: str | None = None,
    marker: str = CHAT,
    context_turns: int = 0,
    context_persona: int | None = None,
    register: str | None = None,
) -> TokenData:
    """Chats under ``marker``: ``context_turns`` earlier turns of ``context_persona`` (default:
    ``persona``), then one turn of ``persona`` in ``domain`` (random if None), in ``register``
    when given (else drawn given the persona). Labels cover the final answer only (the fine-tuning
    loss on assistant tokens)."""
    v = Vocab(world)
    ctx_p = persona if context_persona is None else context_persona
    last_dom = (
        rng.integers(0, len(world.domains), (n, 1))
        if domain is None
        else np.full((n, 1), world.domains.index(domain))
    )
    reg = None if register is None else REGISTERS.index(register)
    last, answer, doms = _turns(v, rng, np.full(n, persona), 1, last_dom, reg)
    parts = [np.full((n, 1), v.ids[marker])]
    if context_turns:
        ctx, _, _ = _turns(v, rng, np.full(n, ctx_p), context_turns)
        parts.append(ctx.reshape(n, -1))
    parts.append(last.reshape(n, -1))
    ids = np.concatenate(parts, axis=1)
    labels = np.full_like(ids, -100)
    t_last = last.shape[-1]
    labels[:, -t_last:] = np.where(answer.reshape(n, -1), last.reshape(n, -1), -100)
    return TokenData(
        torch.from_numpy(ids),
        torch.from_numpy(labels),
        torch.from_numpy(np.full(n, persona)),
        torch.from_numpy(doms),
    )
