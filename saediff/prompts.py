"""Prompt sets: questions (id, messages, optional response, domain, tags) from YAML or JSONL.

A YAML/JSONL row needs ``id`` and either ``question`` (one user turn) or ``messages``.
``first_plot`` names the eight free-form questions of the EM papers, shipped with saediff.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

__all__ = ["Prompt", "load_prompts"]


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


def _row_to_prompt(row: dict, where: str) -> Prompt:
    if not isinstance(row, dict) or "id" not in row:
        raise ValueError(f"{where}: each prompt needs an 'id' key")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages):
            raise ValueError(f"{where}: prompt {row['id']!r} 'messages' must be a list of {{role, content}}")
    elif "question" in row:
        messages = [{"role": "user", "content": str(row["question"])}]
    else:
        raise ValueError(f"{where}: prompt {row['id']!r} needs 'question' or 'messages'")
    return Prompt(str(row["id"]), messages, row.get("response"), row.get("domain"), tuple(row.get("tags", ())))


def load_prompts(source: str | Path) -> list[Prompt]:
    """``first_plot``, or a ``.yaml``/``.yml``/``.jsonl``/``.json`` file."""
    import yaml

    if str(source) == "first_plot":
        text, where = resources.files("saediff.data").joinpath("first_plot_questions.yaml").read_text(), "first_plot"
        rows = yaml.safe_load(text)
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"prompt file not found: {path}")
        where = str(path)
        text = path.read_text()
        try:
            if path.suffix == ".jsonl":
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            elif path.suffix == ".json":
                rows = json.loads(text)
            else:
                rows = yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise ValueError(f"{path}: cannot parse ({str(e).splitlines()[0]})") from None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{where}: expected a non-empty list of prompts")
    prompts = [_row_to_prompt(r, where) for r in rows]
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{where}: duplicate prompt ids")
    return prompts
