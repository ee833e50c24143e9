"""Neutral text: what a steering vector should *not* change, on which its cost is measured.

The steering protocol prices an intervention by the mean per-token KL divergence between the
unsteered and the steered model's next-token distributions on neutral text (``interventions.
steer_cost``). Three sources, each a ``NeutralText`` (token rows and the positions whose prediction
counts):

- ``neutral_answers``: the model's own greedy answers to benign questions outside every EM domain
  (the shipped ``data/neutral_questions.jsonl``: astronomy, grammar, music, weather ...), generated
  once and cached under ``$SAEDIFF_CACHE/neutral/`` with the fingerprint of the model, the questions,
  the answer length and the precision; the answer tokens are scored.
- ``neutral_from_file``: a user's own JSONL, rows ``{"messages": [..., assistant]}`` (the last
  assistant turn is scored) or ``{"text": ...}`` (every token after the first is scored).
- ``neutral_user_turns``: user turns alone, every token after the first scored (the organism's
  questions, which do not depend on the persona that its answers carry).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from saediff._io import atomic_write_json, read_jsonl
from saediff.errors import SaediffError
from saediff.models.loading import LoadedModel, Messages, chat_tokens, generate

__all__ = [
    "NeutralText",
    "neutral_answers",
    "neutral_from_file",
    "neutral_questions",
    "neutral_rows",
    "neutral_user_turns",
]

log = logging.getLogger(__name__)

NEUTRAL_VERSION = "neutral-v1"
"""What decides a cached neutral set besides its inputs; change it when generation changes."""


@dataclass(frozen=True)
class NeutralText:
    """Token rows and, per row, the token positions whose prediction the cost reads (position ``j``
    is predicted by the logits at ``j - 1``, so every scored position is >= 1)."""

    ids: tuple[tuple[int, ...], ...]
    scored: tuple[tuple[int, ...], ...]
    source: str
    """where it came from, for the record"""
    key: dict
    """what decides its tokens (model, questions or file content, answer length, precision)"""

    def __post_init__(self):
        if not self.ids or len(self.ids) != len(self.scored):
            raise SaediffError(f"neutral text {self.source}: no rows, or rows and scored positions differ")
        for r, (ids, pos) in enumerate(zip(self.ids, self.scored)):
            if not pos or min(pos) < 1 or max(pos) >= len(ids):
                raise SaediffError(f"neutral text {self.source}: row {r} has no scorable position")

    @property
    def n_tokens(self) -> int:
        return sum(len(p) for p in self.scored)

    def fingerprint(self) -> dict:
        from saediff.models.provenance import digest

        return {
            "neutral": digest([list(r) for r in self.ids]),
            "scored": digest([list(p) for p in self.scored]),
        }


def neutral_questions() -> list[dict]:
    """The shipped benign questions (``id``, ``domain``, ``question``), outside every EM domain."""
    path = Path(str(resources.files("saediff.data").joinpath("neutral_questions.jsonl")))
    return [row for _, row in read_jsonl(path, "the neutral questions")]


def _cache_dir() -> Path:
    """``$SAEDIFF_NEUTRAL_CACHE``, else ``$SAEDIFF_CACHE/neutral`` (default ``~/.cache/saediff/neutral``)."""
    if os.environ.get("SAEDIFF_NEUTRAL_CACHE"):
        return Path(os.environ["SAEDIFF_NEUTRAL_CACHE"]).expanduser()
    return Path(os.environ.get("SAEDIFF_CACHE") or "~/.cache/saediff").expanduser() / "neutral"


def neutral_answers(
    lm: LoadedModel,
    questions: list[str] | None = None,
    *,
    max_new_tokens: int = 32,
    cache_dir: Path | None = None,
    progress: bool = False,
) -> NeutralText:
    """The model's own greedy answers (at most ``max_new_tokens``) to ``questions`` (default: the
    shipped neutral questions), answer tokens scored. Cached by the fingerprint of the model, the
    questions, the length and the model's dtype; a cache of another setup is regenerated."""
    from saediff.models.provenance import digest, model_fingerprint

    questions = questions or [q["question"] for q in neutral_questions()]
    key = {
        "version": NEUTRAL_VERSION,
        "model": model_fingerprint(lm.spec),
        "dtype": str(next(lm.model.parameters()).dtype),
        "questions": digest(questions),
        "max_new_tokens": max_new_tokens,
    }
    path = (cache_dir or _cache_dir()) / f"{digest(key)[:16]}.json"
    answers = None
    if path.exists():
        try:
            prev = json.loads(path.read_text())
            answers = prev["answers"] if prev.get("key") == key else None
        except (json.JSONDecodeError, KeyError):
            answers = None
    if answers is None:
        convs = [[{"role": "user", "content": q}] for q in questions]
        answers = generate(lm, convs, max_new_tokens=max_new_tokens, temperature=0.0, progress=progress)
        atomic_write_json(
            path, {"kind": "saediff.neutral", "key": key, "questions": questions, "answers": answers}
        )
    convs = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": a.strip() or "."}]
        for q, a in zip(questions, answers)
    ]
    return _from_conversations(lm, convs, f"greedy answers of {lm.spec.model}", key)


def _from_conversations(lm: LoadedModel, convs: list[Messages], source: str, key: dict) -> NeutralText:
    ids, scored = [], []
    for c in convs:
        toks, mask = chat_tokens(lm.tokenizer, c)
        ids.append(tuple(toks))
        scored.append(tuple(j for j, m in enumerate(mask) if m and j >= 1))
    return NeutralText(tuple(ids), tuple(scored), source, key)


def neutral_rows(path: str | Path) -> list[tuple[int, dict]]:
    """A ``--neutral`` file's rows checked, without a model: each ``(row number, row)`` holds
    ``"messages"`` ending with an assistant turn or a non-empty ``"text"``; one line names the row at
    fault, or the file when it has none."""
    rows = []
    for n, row in read_jsonl(Path(path), "neutral text"):
        msgs = row.get("messages") if isinstance(row, dict) else None
        if isinstance(msgs, list):
            if not msgs or not isinstance(msgs[-1], dict) or msgs[-1].get("role") != "assistant":
                raise SaediffError(f"{path}: row {n}: 'messages' must end with an assistant turn")
        elif not (isinstance(row, dict) and isinstance(row.get("text"), str) and row["text"].strip()):
            raise SaediffError(f"{path}: row {n}: needs 'messages' (ending with an assistant turn) or 'text'")
        rows.append((n, row))
    if not rows:
        raise SaediffError(f"{path}: no rows")
    return rows


def neutral_from_file(lm: LoadedModel, path: str | Path) -> NeutralText:
    """A user's neutral text: JSONL rows ``{"messages": [...]}`` ending with an assistant turn (its
    tokens scored) or ``{"text": "..."}`` (every token after the first scored)."""
    from saediff.models.provenance import file_digest

    path = Path(path)
    ids, scored = [], []
    for n, row in neutral_rows(path):
        if isinstance(row.get("messages"), list):
            toks, mask = chat_tokens(lm.tokenizer, row["messages"])
            pos = tuple(j for j, m in enumerate(mask) if m and j >= 1)
        else:
            toks = lm.tokenizer(row["text"], add_special_tokens=True)["input_ids"]
            pos = tuple(range(1, len(toks)))
        if not pos:
            raise SaediffError(f"{path}: row {n}: no token to score")
        ids.append(tuple(toks))
        scored.append(pos)
    return NeutralText(tuple(ids), tuple(scored), str(path), {"file": file_digest(path)})


def neutral_user_turns(lm: LoadedModel, questions: list[str], source: str) -> NeutralText:
    """Each question as a user turn alone (the chat template, no generation prompt), every token
    after the first scored."""
    from saediff.models.provenance import digest

    ids, scored = [], []
    for q in questions:
        text = lm.format_chat([{"role": "user", "content": q}], add_generation_prompt=False)
        toks = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.append(tuple(toks))
        scored.append(tuple(range(1, len(toks))))
    return NeutralText(tuple(ids), tuple(scored), source, {"user_turns": digest(questions)})
