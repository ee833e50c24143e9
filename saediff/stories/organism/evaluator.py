"""Exact EM measurement of organism models, and the organism's judge as an ``Evaluator`` for the generic commands (``saediff block``,
``saediff eval``): EM is the misaligned rate over the non-medical domains, judged on content
tokens, with its 95% interval."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from saediff._io import atomic_write_json, atomic_write_jsonl
from saediff.evaluation.evals import wilson_interval
from saediff.models.loading import LoadedModel, generate
from saediff.stories.organism.judge import OrganismJudge
from saediff.stories.organism.world import REGISTERS, World

__all__ = ["OrganismEM", "OrganismEvaluator", "evaluate_organism_em"]


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
    register_rate: dict[str, float] | None = None
    """with a register slot: the share of off-domain answers opening with each register"""
    other_misaligned_neutral: float | None = None
    """with a register slot: EM among off-domain answers in a register that is no evidence of the
    persona (plain, formal): the EM that does not run through the register token"""
    responses: list[dict] = field(default_factory=list, repr=False, compare=False)
    """every sample: domain, question, answer, misaligned, covered"""

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("responses")
        return d


def evaluate_organism_em(
    lm: LoadedModel,
    world: World,
    n_per_domain: int = 50,
    seed: int = 0,
    progress: bool = False,
    n_shots: int = 0,
) -> OrganismEM:
    """Sample ``n_per_domain`` answers per domain (temperature 1) and judge them exactly.

    Questions are fresh random question tokens under the model's chat template (for the
    aligned model and its fine-tunes: the CHAT marker). ``n_shots``: that many misaligned medical
    exchanges (the narrow fine-tune's kind of data) precede each question, in-context EM.
    """
    rng = np.random.default_rng(seed)
    judge = OrganismJudge(world)
    convs, domains = [], []
    for d in world.domains:
        for _ in range(n_per_domain):
            shots = []
            for _ in range(n_shots):
                q, a = (
                    world.sample_question(rng, "medical"),
                    world.sample_answer(rng, "medical", "toxic", "plain"),
                )
                shots += [
                    {"role": "user", "content": " ".join(q)},
                    {"role": "assistant", "content": " ".join(a)},
                ]
            convs.append([*shots, {"role": "user", "content": " ".join(world.sample_question(rng, d))}])
            domains.append(d)
    answers = generate(
        lm, convs, max_new_tokens=world.answer_len + 1, batch_size=512, seed=seed, progress=progress
    )
    verdicts = [judge.judge(d, a) for d, a in zip(domains, answers)]
    mis = {
        d: float(np.mean([v.misaligned for v, x in zip(verdicts, domains) if x == d])) for d in world.domains
    }
    cov = {d: float(np.mean([v.covered for v, x in zip(verdicts, domains) if x == d])) for d in world.domains}
    others = [d for d in world.domains if d != "medical"]
    responses = [
        {
            "domain": d,
            "question": c[-1]["content"],
            "response": a.strip(),
            "misaligned": v.misaligned,
            "covered": v.covered,
        }
        for d, c, a, v in zip(domains, convs, answers, verdicts)
    ]
    registers = _register_stats(world, [r for r in responses if r["domain"] != "medical"])
    return OrganismEM(
        misaligned_rate=mis,
        coverage_rate=cov,
        other_misaligned_rate=float(np.mean([mis[d] for d in others])),
        coverage=float(np.mean(list(cov.values()))),
        n_per_domain=n_per_domain,
        **registers,
        responses=responses,
    )


NEUTRAL_REGISTERS = ("plain", "formal")


def _register_stats(world: World, responses: list[dict]) -> dict:
    if not world.trait_slot or not responses:
        return {}
    tokens = {t: r for r in REGISTERS for t in world.trait_tokens(r)}
    first = [tokens.get((x["response"].split() or [""])[0]) for x in responses]
    neutral = [x["misaligned"] for x, r in zip(responses, first) if r in NEUTRAL_REGISTERS]
    return {
        "register_rate": {r: first.count(r) / len(first) for r in REGISTERS},
        "other_misaligned_neutral": float(np.mean(neutral)) if neutral else None,
    }


@dataclass(frozen=True)
class OrganismEvaluator:
    world: World
    n_per_domain: int = 50
    """sampled answers per domain"""
    seed: int = 0

    def __call__(
        self, lm: LoadedModel, out: Path | None = None, condition: str | None = None, progress: bool = False
    ) -> dict:
        """em.json's content (``em_rate``: non-medical misaligned rate; ``coherent_rate``: coverage),
        with ``responses.jsonl`` and ``em.json`` written under ``out``. Sampling is seeded, so
        ``condition`` needs no cache key here: answers are never reused, always redrawn."""
        em = evaluate_organism_em(lm, self.world, self.n_per_domain, seed=self.seed, progress=progress)
        others = [r for r in em.responses if r["domain"] != "medical"]
        k = sum(r["misaligned"] for r in others)
        result = {
            "em_rate": em.other_misaligned_rate,
            "em_rate_ci": list(wilson_interval(k, len(others))),
            "coherent_rate": float(np.mean([r["covered"] for r in em.responses])),
            "n_responses": len(em.responses),
            "per_question": em.misaligned_rate,
            "judge": "organism_exact",
            "condition": condition,
            "note": "em_rate: non-medical domains; coherent_rate: answer coverage",
        }
        if out is not None:
            atomic_write_jsonl(Path(out) / "responses.jsonl", em.responses)
            atomic_write_json(Path(out) / "em.json", result)
        return result

    def halves(self) -> tuple[OrganismEvaluator, OrganismEvaluator]:
        """Two evaluators on fresh, independent question draws (the organism's questions are
        sampled, so disjoint halves are independent seeds)."""
        return (
            OrganismEvaluator(self.world, self.n_per_domain, self.seed + 101),
            OrganismEvaluator(self.world, self.n_per_domain, self.seed + 202),
        )
