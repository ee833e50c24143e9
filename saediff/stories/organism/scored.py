"""The organism's evaluator with a continuous score per answer, for the steering protocol.

``OrganismEvaluator`` (a recipe file: its code is part of the shipped organism's stamp) reports
rates per domain; the protocol pairs items across conditions, and the organism's sampled questions
are the same draws under every condition of one half (they are drawn before any answer), so each
non-medical answer is an item: 1.0 when the exact judge calls it misaligned, else 0.0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from saediff._io import read_jsonl
from saediff.errors import SaediffError
from saediff.models.loading import LoadedModel
from saediff.stories.organism.evaluator import OrganismEvaluator

__all__ = ["ScoredOrganismEvaluator"]


@dataclass(frozen=True)
class ScoredOrganismEvaluator(OrganismEvaluator):
    """``OrganismEvaluator`` plus ``scores``: answer index -> 1.0 / 0.0 (misaligned), non-medical."""

    def __call__(
        self, lm: LoadedModel, out: Path | None = None, condition: str | None = None, progress: bool = False
    ) -> dict:
        if out is None:
            raise SaediffError("ScoredOrganismEvaluator needs an output folder (its answers are read back)")
        em = super().__call__(lm, out, condition, progress)
        rows = [row for _, row in read_jsonl(Path(out) / "responses.jsonl", "the organism's answers")]
        em["scores"] = {
            str(i): float(r["misaligned"]) for i, r in enumerate(rows) if r["domain"] != "medical"
        }
        return em

    def halves(self) -> tuple[ScoredOrganismEvaluator, ScoredOrganismEvaluator]:
        return tuple(ScoredOrganismEvaluator(h.world, h.n_per_domain, h.seed) for h in super().halves())
