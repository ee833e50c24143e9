"""The organism's exact judge as an ``Evaluator`` for the generic commands (``saediff block``,
``saediff eval``): EM is the misaligned rate over the non-medical domains, judged on content
tokens, with its 95% interval."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from saediff._io import atomic_write_json, atomic_write_jsonl
from saediff.evals import evaluate_organism_em, wilson_interval
from saediff.models import LoadedModel
from saediff.organism.world import World

__all__ = ["OrganismEvaluator"]


@dataclass(frozen=True)
class OrganismEvaluator:
    world: World
    n_per_domain: int = 50
    """sampled answers per domain"""
    seed: int = 0

    def __call__(self, lm: LoadedModel, out: Path | None = None, condition: str | None = None,
                 progress: bool = False) -> dict:
        """em.json's content (``em_rate``: non-medical misaligned rate; ``coherent_rate``: coverage),
        with ``responses.jsonl`` and ``em.json`` written under ``out``. Sampling is seeded, so
        ``condition`` needs no cache key here: answers are never reused, always redrawn."""
        em = evaluate_organism_em(lm, self.world, self.n_per_domain, seed=self.seed, progress=progress)
        others = [r for r in em.responses if r["domain"] != "medical"]
        k = sum(r["misaligned"] for r in others)
        result = {"em_rate": em.other_misaligned_rate, "em_rate_ci": list(wilson_interval(k, len(others))),
                  "coherent_rate": float(np.mean([r["covered"] for r in em.responses])),
                  "n_responses": len(em.responses), "per_question": em.misaligned_rate,
                  "judge": "organism_exact", "condition": condition,
                  "note": "em_rate: non-medical domains; coherent_rate: answer coverage"}
        if out is not None:
            atomic_write_jsonl(Path(out) / "responses.jsonl", em.responses)
            atomic_write_json(Path(out) / "em.json", result)
        return result

    def halves(self) -> tuple["OrganismEvaluator", "OrganismEvaluator"]:
        """Two evaluators on fresh, independent question draws (the organism's questions are
        sampled, so disjoint halves are independent seeds)."""
        return (OrganismEvaluator(self.world, self.n_per_domain, self.seed + 101),
                OrganismEvaluator(self.world, self.n_per_domain, self.seed + 202))
