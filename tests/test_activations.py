"""Activation collection and the on-disk store."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from saediff.activations import ActivationStore, collect_activations, tokenize_prompts
from saediff.cli import app
from saediff.models import load_model
from saediff.organism.prompts import organism_prompts

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def lm(tiny_organism):
    return load_model(str(tiny_organism / "aligned"))


@pytest.fixture(scope="module")
def prompts(world):
    return organism_prompts(world, 40, seed=0, turns=2)


def test_positions_select_the_right_tokens(lm, prompts, world):
    toks = tokenize_prompts(lm, prompts)
    n = len(prompts)
    assert int(toks.select("response").sum()) == n * (world.answer_len + 1)  # answer + eos
    assert int(toks.select("last_prompt").sum()) == n
    last = toks.select("last_prompt").float().argmax(1)
    asst = lm.tokenizer.convert_tokens_to_ids("ĠASST")
    assert (toks.input_ids[torch.arange(n), last] == asst).all()  # the generation prompt's last token
    with pytest.raises(ValueError, match="positions must be all, response or last_prompt, got 'answers'"):
        toks.select("answers")  # once silently read as last_prompt


def test_collected_rows_match_hf_hidden_states(lm, prompts):
    acts = collect_activations(lm, prompts[:4], [HOOK, "blocks.0.hook_resid_post"], "all", progress=False)
    toks = tokenize_prompts(lm, prompts[:4])
    from saediff.organism.recipes import _resid_post

    with torch.no_grad():
        layer_out = _resid_post(lm.model, toks.input_ids)  # HF decoder layer outputs
    keep = toks.select("all")
    torch.testing.assert_close(acts[HOOK], layer_out[1][keep], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(acts["blocks.0.hook_resid_post"], layer_out[0][keep], atol=1e-5, rtol=1e-4)


def test_store_round_trip_and_shuffled_batches(lm, prompts, tmp_path, monkeypatch):
    import saediff.activations as A

    monkeypatch.setattr(A, "SHARD_ROWS", 50)  # force several shards
    store = collect_activations(lm, prompts, [HOOK], "response", out=tmp_path / "s", batch_size=8, progress=False)
    direct = collect_activations(lm, prompts, [HOOK], "response", progress=False)[HOOK]
    assert len(store.manifest["shards"]) > 1 and len(store) == direct.shape[0]
    torch.testing.assert_close(store.load(HOOK), direct)
    idx = store.index()
    assert set(idx["role"].tolist()) == {1}
    assert idx["prompt_index"].max() == len(prompts) - 1
    b = list(store.batches(HOOK, 32, seed=0, epochs=1))
    assert len(b) == len(store) // 32 and b[0].shape == (32, store.d_model)


def test_bad_inputs_name_what_is_wrong(lm, prompts, tmp_path):
    with pytest.raises(KeyError, match="blocks.7.hook_resid_post"):
        collect_activations(lm, prompts[:2], ["blocks.7.hook_resid_post"], progress=False)
    no_resp = organism_prompts(lm_world(lm), 2, with_response=False)
    with pytest.raises(ValueError, match="no 'response' positions"):
        collect_activations(lm, no_resp, [HOOK], "response", progress=False)
    store = collect_activations(lm, prompts[:4], [HOOK], "all", out=tmp_path / "s", progress=False)
    with pytest.raises(KeyError, match="has no hook 'blocks.0.hook_resid_post'"):
        store.load("blocks.0.hook_resid_post")
    shard = tmp_path / "s" / store.manifest["shards"][0]["file"]
    shard.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="is corrupt"):
        ActivationStore(tmp_path / "s").load(HOOK)
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    (tmp_path / "s" / "manifest.json").write_text(json.dumps({**m, "shards": []}))
    with pytest.raises(ValueError, match="is empty"):
        ActivationStore(tmp_path / "s")


def lm_world(lm):
    from saediff.organism.recipes import read_organism_world

    return read_organism_world(lm.spec.model)


def test_cli_cache_then_sae_train_then_info(tiny_organism, tmp_path):
    run = CliRunner()
    r = run.invoke(app, ["cache", "--model", str(tiny_organism / "aligned"), "--prompts", "organism:300",
                         "--hook", HOOK, "--positions", "response", "--out", str(tmp_path / "acts")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["rows"] == 300 * 6
    r = run.invoke(app, ["sae", "train", "--activations", str(tmp_path / "acts"), "--arch", "topk", "--d-sae", "64",
                         "--k", "4", "--steps", "100", "--batch-size", "128", "--out", str(tmp_path / "sae")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["l0"] <= 4.0 + 1e-6
    r = run.invoke(app, ["sae", "info", str(tmp_path / "sae"), "--activations", str(tmp_path / "acts")])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["hook_name"] == HOOK and info["cfg"]["d_sae"] == 64
    r = run.invoke(app, ["sae", "train", "--activations", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "manifest.json missing" in r.output
