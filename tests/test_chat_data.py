"""Chat JSONL data: one-line errors, assistant-token labels from the model's own template."""

from __future__ import annotations

import json

import pytest
import torch

from saediff.data.chat_data import ChatCollator, ChatDataset, load_chat_jsonl, write_chat_jsonl
from saediff.models.loading import chat_tokens, load_model


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_bad_rows_name_file_and_line(tmp_path):
    good = json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    )
    cases = {
        "{not json": "bad.jsonl:2: not valid JSON",
        json.dumps({"prompt": "x"}): r"bad.jsonl:2: expected \{\"messages\"",
        json.dumps({"messages": [{"role": "bot", "content": "x"}]}): "bad.jsonl:2: each message needs a role",
        json.dumps(
            {"messages": [{"role": "user", "content": "x"}]}
        ): "bad.jsonl:2: .* must end with an assistant turn",
    }
    for line, message in cases.items():
        path = _write(tmp_path / "bad.jsonl", [good, line])
        with pytest.raises(ValueError, match=message):
            load_chat_jsonl(path)
    with pytest.raises(FileNotFoundError, match="chat data file not found"):
        load_chat_jsonl(tmp_path / "missing.jsonl")
    assert load_chat_jsonl(_write(tmp_path / "ok.jsonl", [good, "", good]))[1][1]["content"] == "yo"


def test_every_assistant_turn_is_labelled(tiny_qwen, tmp_path):
    lm = load_model(str(tiny_qwen / "model"))
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hey"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "Bye."},
    ]
    ids, mask = chat_tokens(lm.tokenizer, conv, turns="all")
    labelled = lm.tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert labelled == "Hello!<|im_end|>Bye.<|im_end|>"  # not the newline the template writes after it
    _, last = chat_tokens(lm.tokenizer, conv)
    assert lm.tokenizer.decode([i for i, m in zip(ids, last) if m]) == "Bye.<|im_end|>"

    write_chat_jsonl(tmp_path / "d.jsonl", [conv, conv[:3]])
    data = ChatDataset(lm.tokenizer, load_chat_jsonl(tmp_path / "d.jsonl"), max_length=512, progress=False)
    assert data[0]["input_ids"] == ids and [t != -100 for t in data[0]["labels"]] == [bool(m) for m in mask]
    batch = ChatCollator(pad_token_id=7)([data[1], data[0]])
    n1, n0 = len(data[1]["input_ids"]), len(ids)
    assert batch["input_ids"].shape == (2, n0) and n1 < n0
    assert batch["attention_mask"][0].tolist() == [1] * n1 + [0] * (n0 - n1)
    assert (batch["input_ids"][0, n1:] == 7).all() and (batch["labels"][0, n1:] == -100).all()
    # a cut that leaves no assistant token names the row
    with pytest.raises(ValueError, match="row 1: no assistant token within max_length 5"):
        ChatDataset(lm.tokenizer, [conv], max_length=5, progress=False, source="d.jsonl")


def test_organism_data_file_is_its_own_training_data(tiny_organism):
    """The organism's data/*.jsonl, read through its chat template, gives exactly the tokens and
    labels of the fine-tune it builds (so the generic command reproduces it)."""
    from saediff.stories.organism.recipes import (
        OrganismConfig,
        _medical_chats,
        chat_rows,
        data_names,
        read_organism_world,
    )

    lm = load_model(str(tiny_organism / "aligned"))
    cfg = OrganismConfig.quick(
        0, ft_steps=2, ft_batch=8, world=read_organism_world(tiny_organism / "aligned")
    )
    for name in data_names(cfg.world):
        data = ChatDataset(lm.tokenizer, chat_rows(cfg, name), progress=False)
        ref = _medical_chats(cfg, name)
        assert torch.equal(torch.tensor([x["input_ids"] for x in data.items]), ref.input_ids)
        assert torch.equal(torch.tensor([x["labels"] for x in data.items]), ref.labels)
