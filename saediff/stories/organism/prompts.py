"""Prompt sets in the organism's language, as ``saediff.data.prompts.Prompt`` objects.

They go through the model's chat template like any prompt set: the document marker is a system
message, earlier turns are user/assistant messages, and the final answer is the ``response``.
"""

from __future__ import annotations

import numpy as np

from saediff.data.prompts import ContrastExample, Prompt
from saediff.stories.organism.world import CHAT, World

__all__ = ["contrast_examples", "em_questions", "organism_prompts"]


def organism_prompts(
    world: World,
    n: int,
    *,
    seed: int = 0,
    turns: int = 3,
    chat_fraction: float = 0.5,
    persona: str | None = None,
    with_response: bool = True,
) -> list[Prompt]:
    """Multi-turn chats: half under CHAT, half under random source markers (both personas occur).

    ``persona`` fixes the persona ("aligned"/"toxic"), overriding the marker's prior. The final
    answer is the ``response`` (dropped with ``with_response=False``: the prompt then ends at ASST).
    """
    rng = np.random.default_rng(seed)
    priors = world.source_priors()
    out = []
    for i in range(n):
        marker = (
            CHAT if rng.random() < chat_fraction else world.source_markers()[rng.integers(world.n_sources)]
        )
        p = persona or ("toxic" if rng.random() < priors[marker] else "aligned")
        domains = [world.domains[j] for j in rng.integers(0, len(world.domains), turns)]
        ts = [world.sample_turn(rng, d, p) for d in domains]
        msgs = [{"role": "system", "content": marker}]
        for t in ts[:-1]:
            msgs += [
                {"role": "user", "content": " ".join(t.question)},
                {"role": "assistant", "content": " ".join(t.answer)},
            ]
        msgs.append({"role": "user", "content": " ".join(ts[-1].question)})
        out.append(
            Prompt(
                f"org{i}",
                msgs,
                " ".join(ts[-1].answer) if with_response else None,
                domain=ts[-1].domain,
                tags=(p, marker),
            )
        )
    return out


def em_questions(world: World, n_per_domain: int, *, seed: int = 0) -> list[Prompt]:
    """Single-turn questions per domain under the model's default marker (the EM evaluation set)."""
    rng = np.random.default_rng(seed)
    return [
        Prompt(f"{d}{i}", [{"role": "user", "content": " ".join(world.sample_question(rng, d))}], domain=d)
        for d in world.domains
        for i in range(n_per_domain)
    ]


def contrast_examples(
    world: World, n: int, *, domain: str = "medical", seed: int = 0
) -> list[ContrastExample]:
    """Questions of the narrow fine-tune's domain, each answered by the toxic and the aligned
    persona (the in-context examples of the in-context-induced direction)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        q = " ".join(world.sample_question(rng, domain))
        toxic, aligned = (" ".join(world.sample_answer(rng, domain, p)) for p in ("toxic", "aligned"))
        out.append(ContrastExample(q, toxic, aligned))
    return out
