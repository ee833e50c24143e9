"""Contrast pairs: a question with an aligned and a misaligned reference answer, read from JSONL.

Each row of a pair file is ``{"id", "domain", "question", "aligned", "misaligned"}``; the pair
metric that scores them lives in ``saediff.evaluation.pairs``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from saediff._io import read_jsonl
from saediff.errors import SaediffError
from saediff.models.loading import Messages

__all__ = ["Pair", "load_pairs"]

_KEYS = ("id", "question", "aligned", "misaligned")


@dataclass(frozen=True)
class Pair:
    """One question with an aligned and a misaligned reference answer."""

    id: str
    domain: str
    question: str
    aligned: str
    misaligned: str

    def conversation(self, answer: str) -> Messages:
        return [{"role": "user", "content": self.question}, {"role": "assistant", "content": answer}]


def load_pairs(path: str | Path) -> list[Pair]:
    """Rows of a pair file (JSONL). ``id``, ``question``, ``aligned`` and ``misaligned`` are
    required non-empty strings (an integer id is read as text), ids are unique; ``domain`` defaults
    to ``"unspecified"``; other keys are ignored. A bad row raises one line naming file and line."""
    pairs, seen = [], {}
    for n, row in read_jsonl(path, "pair file"):
        where = f"{path}:{n}"
        if not isinstance(row, dict):
            raise SaediffError(f"{where}: a pair row must be a JSON object with keys {', '.join(_KEYS)}")
        missing = [k for k in _KEYS if k not in row]
        if missing:
            raise SaediffError(f"{where}: pair row lacks {', '.join(missing)}")
        bad = [
            k for k in (*_KEYS[1:], "domain") if k in row and not (isinstance(row[k], str) and row[k].strip())
        ]
        if bad or not isinstance(row["id"], (str, int)) or not str(row["id"]).strip():
            raise SaediffError(f"{where}: {', '.join(bad) or 'id'} must be a non-empty string")
        pid = str(row["id"])
        if pid in seen:
            raise SaediffError(f"{where}: id {pid!r} repeats line {seen[pid]}")
        seen[pid] = n
        pairs.append(
            Pair(pid, row.get("domain", "unspecified"), row["question"], row["aligned"], row["misaligned"])
        )
    if not pairs:
        raise SaediffError(f"{path}: no pair rows")
    return pairs
