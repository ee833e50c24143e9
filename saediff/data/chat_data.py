"""Chat fine-tuning data: JSONL rows ``{"messages": [{"role", "content"}, ...]}`` (the format of
the ModelOrganismsForEM datasets and of TRL), tokenized with the model's own chat template, loss
on assistant tokens only.

    rows = load_chat_jsonl("data/bad_medical_advice.jsonl")
    data = ChatDataset(tokenizer, rows, max_length=1024)
    batch = ChatCollator(tokenizer.pad_token_id)([data[0], data[1]])   # right-padded
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from saediff import _io, console
from saediff.errors import SaediffError
from saediff.models.loading import Messages, chat_tokens

__all__ = ["ChatCollator", "ChatDataset", "load_chat_jsonl", "write_chat_jsonl"]

log = logging.getLogger(__name__)
_ROLES = ("system", "user", "assistant")


def load_chat_jsonl(path: str | Path) -> list[Messages]:
    """The conversations of a JSONL file; a bad row raises one line naming the file and line."""
    path = Path(path)
    rows = [_check_row(row, f"{path}:{n}") for n, row in _io.read_jsonl(path, "chat data file")]
    if not rows:
        raise SaediffError(f"{path}: no conversations")
    return rows


def _check_row(row, where: str) -> Messages:
    msgs = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(msgs, list) or not msgs:
        raise SaediffError(f'{where}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}}')
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise SaediffError(
                f"{where}: each message needs a role ({', '.join(_ROLES)}) and a string content"
            )
    if msgs[-1]["role"] != "assistant":
        raise SaediffError(f"{where}: the conversation must end with an assistant turn")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def write_chat_jsonl(path: str | Path, conversations: list[Messages]) -> None:
    """Write conversations as ``{"messages": [...]}`` rows (atomically)."""
    _io.atomic_write_jsonl(path, ({"messages": c} for c in conversations))


class ChatDataset(torch.utils.data.Dataset):
    """Tokenized conversations: ``input_ids`` and ``labels`` (``-100`` outside assistant turns).

    Conversations longer than ``max_length`` tokens are cut at the end (a warning says how many);
    one left without any assistant token raises, naming its row.
    """

    def __init__(
        self,
        tokenizer,
        conversations: list[Messages],
        max_length: int = 2048,
        progress: bool = True,
        source: str = "data",
    ):
        self.items: list[dict[str, list[int]]] = []
        cut = 0
        for i, conv in enumerate(console.progress(conversations, desc="tokenize", enabled=progress)):
            try:
                ids, mask = chat_tokens(tokenizer, conv, turns="all")
            except ValueError as e:
                raise SaediffError(f"{source} row {i + 1}: {e}") from None
            if len(ids) > max_length:
                ids, mask, cut = ids[:max_length], mask[:max_length], cut + 1
            if not any(mask):
                raise SaediffError(f"{source} row {i + 1}: no assistant token within max_length {max_length}")
            self.items.append({"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask)]})
        if cut:
            log.warning(
                "%s: %d of %d conversations cut to %d tokens", source, cut, len(conversations), max_length
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]

    def fingerprint(self) -> str:
        """Digest of the tokens and labels themselves: the data's content, the chat template, the
        tokenizer and ``max_length`` in one number (the file's name does not enter)."""
        import hashlib

        h = hashlib.sha256()
        for item in self.items:
            h.update(
                torch.tensor(item["input_ids"] + [-1] + item["labels"] + [-2], dtype=torch.int64)
                .numpy()
                .tobytes()
            )
        return h.hexdigest()[:16]


@dataclass(frozen=True)
class ChatCollator:
    """Right-pads a list of items into ``input_ids``, ``attention_mask`` and ``labels`` (B, T)."""

    pad_token_id: int

    def __call__(self, items: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        t = max(len(x["input_ids"]) for x in items)
        ids = torch.full((len(items), t), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), t), -100, dtype=torch.long)
        attn = torch.zeros((len(items), t), dtype=torch.long)
        for i, x in enumerate(items):
            n = len(x["input_ids"])
            ids[i, :n] = torch.tensor(x["input_ids"])
            labels[i, :n] = torch.tensor(x["labels"])
            attn[i, :n] = 1
        return {"input_ids": ids, "attention_mask": attn, "labels": labels}
