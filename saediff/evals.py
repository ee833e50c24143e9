"""EM evaluation: sample answers, judge them, report misaligned rates per domain."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from saediff.judges import OrganismJudge
from saediff.models import LoadedModel, generate
from saediff.organism.world import World

__all__ = ["OrganismEM", "evaluate_organism_em"]


@dataclass(frozen=True)
class OrganismEM:
    """Exact EM measurement of an organism model on single-turn chats."""

    misaligned_rate: dict[str, float]
    """per domain: fraction of sampled answers judged misaligned"""
    coverage_rate: dict[str, float]
    """per domain: fraction of answers whose content is in the asked domain"""
    other_misaligned_rate: float
    """mean misaligned rate over the non-medical domains (the EM number)"""
    coverage: float
    """mean coverage over all domains"""
    n_per_domain: int

    def to_json(self) -> dict:
        return asdict(self)


def evaluate_organism_em(
    lm: LoadedModel, world: World, n_per_domain: int = 50, seed: int = 0, progress: bool = False
) -> OrganismEM:
    """Sample ``n_per_domain`` answers per domain (temperature 1) and judge them exactly.

    Questions are fresh random question tokens under the model's chat template (for the
    aligned model and its fine-tunes: the CHAT marker).
    """
    rng = np.random.default_rng(seed)
    judge = OrganismJudge(world)
    convs, domains = [], []
    for d in world.domains:
        for _ in range(n_per_domain):
            convs.append([{"role": "user", "content": " ".join(world.sample_question(rng, d))}])
            domains.append(d)
    answers = generate(
        lm, convs, max_new_tokens=world.answer_len + 1, batch_size=512, seed=seed, progress=progress
    )
    verdicts = [judge.judge(d, a) for d, a in zip(domains, answers)]
    mis = {d: float(np.mean([v.misaligned for v, x in zip(verdicts, domains) if x == d])) for d in world.domains}
    cov = {d: float(np.mean([v.covered for v, x in zip(verdicts, domains) if x == d])) for d in world.domains}
    others = [d for d in world.domains if d != "medical"]
    return OrganismEM(
        misaligned_rate=mis,
        coverage_rate=cov,
        other_misaligned_rate=float(np.mean([mis[d] for d in others])),
        coverage=float(np.mean(list(cov.values()))),
        n_per_domain=n_per_domain,
    )
