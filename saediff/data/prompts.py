"""Prompt sets: questions (id, messages, optional response, domain, tags) from YAML or JSONL.

A YAML/JSONL row needs ``id`` and either ``question`` (one user turn) or ``messages``.
``first_plot`` names the eight free-form questions of the EM papers, shipped with saediff.
Contrast examples (one question answered misaligned and aligned) feed the in-context-induced
direction: rows with ``question``, ``misaligned`` and ``aligned``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from saediff.errors import MissingFileError, SaediffError

__all__ = ["ContrastExample", "Prompt", "in_context_prompts", "load_contrast_examples", "load_prompts"]


@dataclass(frozen=True)
class Prompt:
    id: str
    messages: list[dict[str, str]]
    response: str | None = None
    domain: str | None = None
    tags: tuple[str, ...] = field(default=())

    @property
    def question(self) -> str:
        """The last user turn (what a judge sees as the question)."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


def _row_to_prompt(row: dict, where: str, n: int) -> Prompt:
    """Row ``n`` (0-based) of a prompt file; a chat-data row (``messages`` only, as fine-tunes read)
    takes its row number as id, and a final assistant turn is read as its answer."""
    if not isinstance(row, dict) or ("id" not in row and "messages" not in row):
        raise SaediffError(f"{where}: row {n + 1} needs an 'id' key (or 'messages', a chat-data row)")
    row = {"id": f"row{n}", **row}
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages
        ):
            raise SaediffError(
                f"{where}: prompt {row['id']!r} 'messages' must be a list of {{role, content}}"
            )
    elif "question" in row:
        messages = [{"role": "user", "content": str(row["question"])}]
    else:
        raise SaediffError(f"{where}: prompt {row['id']!r} needs 'question' or 'messages'")
    return Prompt(
        str(row["id"]), messages, row.get("response"), row.get("domain"), tuple(row.get("tags", ()))
    )


def load_prompts(source: str | Path) -> list[Prompt]:
    """``first_plot``, or a ``.yaml``/``.yml``/``.jsonl``/``.json`` file."""
    import yaml

    if str(source) == "first_plot":
        text = resources.files("saediff.data").joinpath("first_plot_questions.yaml").read_text()
        rows, where = yaml.safe_load(text), "first_plot"
    else:
        rows, where = _read_rows(source), str(source)
    if not isinstance(rows, list) or not rows:
        raise SaediffError(f"{where}: expected a non-empty list of prompts")
    prompts = [_row_to_prompt(r, where, n) for n, r in enumerate(rows)]
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        raise SaediffError(f"{where}: duplicate prompt ids")
    return prompts


def _read_rows(source: str | Path):
    """The parsed content of a ``.jsonl``/``.json``/YAML file (one-line errors)."""
    import yaml

    path = Path(source)
    if not path.exists():
        raise MissingFileError(f"prompt file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        if path.suffix == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise SaediffError(f"{path}: cannot parse ({str(e).splitlines()[0]})") from None


@dataclass(frozen=True)
class ContrastExample:
    """One question answered both ways (e.g. a row of the narrow fine-tune's data and its aligned twin)."""

    question: str
    misaligned: str
    aligned: str


def load_contrast_examples(source: str | Path) -> list[ContrastExample]:
    """Rows with ``question``, ``misaligned`` and ``aligned`` from a ``.jsonl``/``.json``/YAML file."""
    rows = _read_rows(source)
    if not isinstance(rows, list) or not rows:
        raise SaediffError(f"{source}: expected a non-empty list of contrast examples")
    keys = ("question", "misaligned", "aligned")
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not all(isinstance(r.get(k), str) for k in keys):
            raise SaediffError(f"{source}: row {i} needs string keys 'question', 'misaligned' and 'aligned'")
    return [ContrastExample(*(r[k] for k in keys)) for r in rows]


def in_context_prompts(
    questions: list[Prompt], examples: list[ContrastExample], *, n_shots: int = 3, seed: int = 0
) -> tuple[list[Prompt], list[Prompt]]:
    """Each question after ``n_shots`` earlier turns: the same example questions answered
    misaligned (first list) or aligned (second list). The prompts end at the assistant's turn,
    so both lists share every token after the examples' answers."""
    import random

    if not 0 < n_shots <= len(examples):
        raise SaediffError(
            f"in_context_prompts: n_shots={n_shots} needs 1..{len(examples)} contrast examples"
        )
    rng = random.Random(seed)
    mis, ali = [], []
    for q in questions:
        shots = rng.sample(examples, n_shots)
        system = [m for m in q.messages if m["role"] == "system"]
        rest = [m for m in q.messages if m["role"] != "system"]
        for answer, out in (("misaligned", mis), ("aligned", ali)):
            turns = [
                m
                for e in shots
                for m in (
                    {"role": "user", "content": e.question},
                    {"role": "assistant", "content": getattr(e, answer)},
                )
            ]
            out.append(
                Prompt(f"{q.id}:{answer}", [*system, *turns, *rest], None, q.domain, (*q.tags, answer))
            )
    return mis, ali
