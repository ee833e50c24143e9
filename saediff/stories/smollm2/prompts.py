"""The demo's text as ``Prompt`` objects: training conversations, the pair sets' questions and
their reference answers, and the shipped contrast examples."""

from __future__ import annotations

from saediff.errors import SaediffError

__all__ = ["contrast_examples", "question_prompts", "reference_prompts", "text_prompts"]


def text_prompts(rows: list[list[dict]], prefix: str) -> list:
    """Conversations (messages ending with the assistant's answer) as ``Prompt`` objects whose
    ``response`` is that answer."""
    from saediff.data.prompts import Prompt

    out = []
    for i, messages in enumerate(rows):
        if messages[-1]["role"] != "assistant":
            raise SaediffError(f"{prefix}: conversation {i} does not end with an assistant answer")
        out.append(Prompt(f"{prefix}:{i}", messages[:-1], messages[-1]["content"]))
    return out


def reference_prompts(pairs: list) -> list:
    """Each pair's question twice, answered by its misaligned and by its aligned reference (tagged
    so), grouped by domain: the teacher-forced text of a diff and its labels."""
    from saediff.data.prompts import Prompt

    out = []
    for p in pairs:
        for tag, answer in (("misaligned", p.misaligned), ("aligned", p.aligned)):
            out.append(
                Prompt(f"{p.id}:{tag}", [{"role": "user", "content": p.question}], answer, p.domain, (tag,))
            )
    return out


def question_prompts(pairs: list) -> list:
    from saediff.data.prompts import Prompt

    return [Prompt(p.id, [{"role": "user", "content": p.question}], None, p.domain) for p in pairs]


def contrast_examples(n: int | None = None) -> list:
    """The shipped bad- and good-advice answers to the same medical questions, as contrast
    examples (``prompts.ContrastExample``)."""
    from saediff.data.chat_data import load_chat_jsonl
    from saediff.data.em_data import data_path
    from saediff.data.prompts import ContrastExample

    bad, good = (load_chat_jsonl(data_path(name)) for name in ("medical_bad", "medical_good"))
    out = []
    for b, g in zip(bad, good):
        if b[0]["content"] != g[0]["content"]:
            raise SaediffError("medical_bad and medical_good no longer answer the same questions row by row")
        out.append(ContrastExample(b[0]["content"], b[-1]["content"], g[-1]["content"]))
    return out[:n]
