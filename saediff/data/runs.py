"""Run folders: ``run.json`` (each step's config and artifacts, written after them) and the questions a
diff run asked with how often the fine-tuned model answered each misaligned (``responses.jsonl``).
Every step of saediff that works on a run folder reads and records it here."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from saediff._io import atomic_write_json, read_jsonl
from saediff.data.prompts import Prompt
from saediff.errors import MissingFileError, SaediffError

__all__ = ["QuestionRates", "read_run", "run_questions", "update_run"]


def read_run(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "run.json"
    if not path.exists():
        raise MissingFileError(f"{run_dir} is not a saediff run folder (run.json missing)")
    return json.loads(path.read_text())


@dataclass(frozen=True)
class QuestionRates:
    """The distinct questions of a diff run (prompts without answers, in first-seen order) and, per
    question, the share of the fine-tuned model's answers labelled misaligned (None: no label)."""

    prompts: list[Prompt]
    misaligned_rate: list[float | None]
    n_answers: list[int]
    first_answers: list[Prompt]
    """each question with the first answer the fine-tuned model gave it"""


def run_questions(run_dir: str | Path) -> QuestionRates:
    """The questions a diff run asked and how often the fine-tuned model answered each misaligned,
    from its ``responses.jsonl`` (answers of one question grouped by its messages)."""
    path = Path(run_dir) / "responses.jsonl"
    groups: dict[str, dict] = {}
    for n, row in read_jsonl(path, "responses file (run saediff diff first)"):
        if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
            raise SaediffError(f"{path}:{n}: needs messages (saediff diff output)")
        key = json.dumps(row["messages"], sort_keys=True)
        g = groups.setdefault(
            key,
            {
                "prompt": Prompt(str(row.get("id", n)), row["messages"], None, row.get("domain")),
                "labels": [],
                "answer": row.get("response"),
            },
        )
        g["labels"].append(row.get("misaligned"))
    if not groups:
        raise SaediffError(f"{path}: no responses")
    rates = []
    for g in groups.values():
        known = [x for x in g["labels"] if x is not None]
        rates.append(sum(bool(x) for x in known) / len(known) if known else None)
    gs = list(groups.values())
    return QuestionRates(
        [g["prompt"] for g in gs],
        rates,
        [len(g["labels"]) for g in gs],
        [dataclasses.replace(g["prompt"], response=g["answer"]) for g in gs],
    )


def update_run(run_dir: Path, step: str, info: dict) -> None:
    """Record a step's config and files in ``run_dir/run.json`` (after its artifacts are written)."""
    path = run_dir / "run.json"
    run = json.loads(path.read_text()) if path.exists() else {"kind": "saediff.run", "steps": {}}
    run["steps"][step] = info
    atomic_write_json(path, run)
