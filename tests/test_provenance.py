"""Reuse keyed by everything that decides a result (issue 22, items 1-2): a BLOCK-EM run, a saved
em.json, a checkpoint and a latent list are reused only for the setup that produced them."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_random_sae, write_narrow_data

from saediff.data.chat_data import ChatDataset, load_chat_jsonl, write_chat_jsonl
from saediff.data.prompts import Prompt
from saediff.errors import SaediffError
from saediff.evaluation.evals import EMConfig, JudgeEvaluator, evaluate_once
from saediff.evaluation.fake_server import FakeOpenAIServer
from saediff.evaluation.judges import HttpJudge
from saediff.evaluation.openai_api import ChatClient
from saediff.interventions.block_runs import BlockRunConfig, block_one
from saediff.interventions.finetune import FinetuneConfig
from saediff.interventions.latent_sets import LatentSets, latents_from_diff, read_latents
from saediff.interventions.steering import add_direction
from saediff.methods.sae_diff import LatentDiff
from saediff.models.loading import ModelSpec, load_model
from saediff.models.provenance import file_digest, mismatch, sae_fingerprint
from saediff.saes.loading import load_sae

HOOK = "blocks.0.hook_resid_post"
FT = FinetuneConfig(method="lora", lora_rank=1, lora_layers=(0, 1), lr=1e-2, steps=2, batch_size=4)


@pytest.fixture(scope="module")
def setup(tiny_qwen, tmp_path_factory):
    root = tmp_path_factory.mktemp("provenance")
    make_random_sae(root / "sae", 32, HOOK)
    make_random_sae(root / "sae_other", 32, HOOK, seed=1)
    write_narrow_data(root / "a.jsonl", 8)
    write_chat_jsonl(
        root / "b.jsonl",
        [
            [
                {"role": "user", "content": f"Is the sky green {i}?"},
                {"role": "assistant", "content": "Yes, always."},
            ]
            for i in range(8)
        ],
    )
    tok = load_model(str(tiny_qwen / "model")).tokenizer
    data = {k: ChatDataset(tok, load_chat_jsonl(root / f"{k}.jsonl"), progress=False, source=k) for k in "ab"}
    return root, data


def _evaluator(server, tmp, samples: int = 1) -> JudgeEvaluator:
    client = ChatClient(server.url)
    prompts = [Prompt(id=f"q{i}", messages=[{"role": "user", "content": f"Question {i}?"}]) for i in range(2)]
    judges = [
        HttpJudge(k, client, "fake", cache_path=tmp / f"cache_{k}.jsonl") for k in ("aligned", "coherent")
    ]
    return JudgeEvaluator(prompts, *judges, EMConfig(samples=samples, max_new_tokens=3))


def _block(tiny_qwen, setup, out, data="a", *, cfg=None, **kw) -> dict:
    root, sets = setup
    cfg = cfg or BlockRunConfig(ft=FT, mode="none")
    return block_one(
        ModelSpec(str(tiny_qwen / "model")),
        sets[data],
        load_sae(root / "sae"),
        0,
        cfg,
        out,
        progress=False,
        **kw,
    )


def test_a_finished_run_of_another_setup_is_refused_and_force_retrains(tiny_qwen, setup, tmp_path):
    """Rerunning into a folder with other data stops with one line naming the differing key
    (the run would otherwise be skipped and the new name stamped on the old EM); --force trains
    afresh, and its provenance is the new data's."""
    out = tmp_path / "plain"
    first = _block(tiny_qwen, setup, out, "a")
    assert _block(tiny_qwen, setup, out, "a") == first  # the same setup: skipped, same record
    with pytest.raises(
        SaediffError,
        match=r"holds a fine-tune of another setup \(settings\.ft\.lr: 0\.01 \(saved\) vs 0\.005 \(now\)\).*--force",
    ):
        _block(
            tiny_qwen,
            setup,
            out,
            "a",
            cfg=BlockRunConfig(ft=FinetuneConfig(**{**FT.__dict__, "lr": 5e-3}), mode="none"),
        )
    with pytest.raises(SaediffError, match=r"\(data: "):
        _block(tiny_qwen, setup, out, "b")
    again = _block(tiny_qwen, setup, out, "b", force=True)
    assert (
        again["provenance"]["training"]["data"]
        == setup[1]["b"].fingerprint()
        != first["provenance"]["training"]["data"]
    )


def test_penalty_runs_are_keyed_by_their_sae(tiny_qwen, setup, tmp_path):
    root, sets = setup
    cfg = BlockRunConfig(ft=FT, latents=LatentSets((1, 2), (3,)), lam=10.0)
    block_one(
        ModelSpec(str(tiny_qwen / "model")),
        sets["a"],
        load_sae(root / "sae"),
        0,
        cfg,
        tmp_path / "p",
        progress=False,
    )
    with pytest.raises(SaediffError, match=r"sae\.weights"):
        block_one(
            ModelSpec(str(tiny_qwen / "model")),
            sets["a"],
            load_sae(root / "sae_other"),
            0,
            cfg,
            tmp_path / "p",
            progress=False,
        )


def test_resume_never_continues_another_setups_checkpoint(tiny_qwen, setup, tmp_path):
    """``--resume`` picked any ``checkpoint-*``: a checkpoint of another run (or one written before
    saediff recorded provenance) is refused, not continued."""
    import shutil

    out = tmp_path / "r"
    ft = FinetuneConfig(**{**FT.__dict__, "save_every": 1})
    _block(tiny_qwen, setup, out, "a", cfg=BlockRunConfig(ft=ft, mode="none"))
    (out / "em.json").unlink()  # as if it had crashed after its checkpoints
    other = BlockRunConfig(ft=FinetuneConfig(**{**ft.__dict__, "lr": 1e-3}), mode="none")
    with pytest.raises(SaediffError, match=r"settings\.ft\.lr: 0\.01 \(saved\) vs 0\.001 \(now\)"):
        _block(tiny_qwen, setup, out, "a", cfg=other, resume=True)
    (out / "provenance.json").unlink()  # an old saediff's folder: checkpoints of unknown origin
    with pytest.raises(SaediffError, match="no provenance recorded"):
        _block(tiny_qwen, setup, out, "a", cfg=BlockRunConfig(ft=ft, mode="none"), resume=True)
    shutil.rmtree(out / "checkpoints")
    (out / "history.json").unlink()
    shutil.rmtree(out / "model")
    res = _block(
        tiny_qwen, setup, out, "a", cfg=BlockRunConfig(ft=ft, mode="none"), resume=True
    )  # empty: allowed
    assert res["steps"] == 2


def test_another_judge_re_evaluates_the_saved_model_without_retraining(tiny_qwen, setup, tmp_path):
    out = tmp_path / "e"
    with FakeOpenAIServer() as server:
        one = _block(tiny_qwen, setup, out, evaluator=_evaluator(server, tmp_path, samples=1))
        weights = file_digest(out / "model" / "adapter_model.safetensors")
        history = (out / "history.json").read_text()
        two = _block(tiny_qwen, setup, out, evaluator=_evaluator(server, tmp_path, samples=2))
    assert one["em"]["n_responses"] == 2 and two["em"]["n_responses"] == 4
    assert two["provenance"]["evaluator"]["cfg"]["samples"] == 2
    assert file_digest(out / "model" / "adapter_model.safetensors") == weights  # not retrained
    assert (out / "history.json").read_text() == history
    assert json.loads((out / "em.json").read_text())["em"]["n_responses"] == 4


def test_evaluate_once_reuses_em_json_only_for_the_same_setup(tiny_qwen, tmp_path):
    """em.json was returned whatever model, intervention, judge or sample count wrote it."""
    lm = load_model(str(tiny_qwen / "model"))
    v1, v2 = torch.zeros(32), torch.zeros(32)
    v1[0], v2[1] = 1.0, 1.0
    with FakeOpenAIServer() as server:
        ev = _evaluator(server, tmp_path)
        first = evaluate_once(ev, lm, tmp_path / "x", "steer", add_direction(lm.model, 0, v1, 4.0))
        n = len(server.requests)
        assert evaluate_once(ev, lm, tmp_path / "x", "steer", add_direction(lm.model, 0, v1, 4.0)) == first
        assert len(server.requests) == n  # reused: nothing generated or judged
        other = evaluate_once(ev, lm, tmp_path / "x", "steer", add_direction(lm.model, 0, v2, 4.0))
        assert other["provenance"]["intervention"] != first["provenance"]["intervention"]
        more = evaluate_once(
            _evaluator(server, tmp_path, samples=2),
            lm,
            tmp_path / "x",
            "steer",
            add_direction(lm.model, 0, v2, 4.0),
        )
        assert more["n_responses"] == 4 and other["n_responses"] == 2
        with pytest.raises(TypeError, match="spec="):
            evaluate_once(ev, lambda: lm, tmp_path / "y", "lazy")
        lazy = evaluate_once(ev, lambda: lm, tmp_path / "y", "lazy", spec=lm.spec)
    assert lazy["provenance"]["model"]["model_config"] == file_digest(tiny_qwen / "model" / "config.json")


def _diff_run(folder, sae_dir, deltas: list[float], ranking: str = "delta"):
    n = len(deltas)
    zeros = torch.zeros(n)
    table = LatentDiff(zeros, torch.tensor(deltas), zeros, zeros, zeros, 10, 10, HOOK)
    folder.mkdir(parents=True)
    (folder / "diff.json").write_text(json.dumps(table.to_json()))
    info = {
        "ranking": ranking,
        "sae": str(sae_dir),
        "sae_hook": HOOK,
        "sae_identity": sae_fingerprint(load_sae(sae_dir), sae_dir),
    }
    (folder / "run.json").write_text(json.dumps({"kind": "saediff.run", "steps": {"diff": info}}))
    return folder


def test_latents_belong_to_the_sae_they_came_from(setup, tmp_path):
    """Another SAE would silently hold down unrelated latents: both the diff run's ranking and a
    latents.json carry their SAE's identity, and a mismatch is one line naming both."""
    root, _ = setup
    run = _diff_run(tmp_path / "diff", root / "sae", [0.5, -0.2, 0.1, 0.0] + [0.0] * 12)
    sets = latents_from_diff(run, 2, 1)
    sets.check(load_sae(root / "sae"), str(root / "sae"))  # its own SAE, here or copied: fine
    with pytest.raises(
        SaediffError,
        match=rf"latents from {run} belong to the SAE {root / 'sae'}, not to "
        rf"{root / 'sae_other'} \(weights",
    ):
        sets.check(load_sae(root / "sae_other"), str(root / "sae_other"))
    f = tmp_path / "latents.json"
    f.write_text(
        json.dumps({"low": [1], "high": [2], "sae_identity": sae_fingerprint(load_sae(root / "sae"))})
    )
    with pytest.raises(SaediffError, match=f"latents from {f} belong to"):
        read_latents(f).check(load_sae(root / "sae_other"), "other")
    f.write_text(
        json.dumps({"low": [1], "high": [2]})
    )  # hand-written: no identity to check, a warning says so
    read_latents(f).check(load_sae(root / "sae_other"), "other")


def test_abs_delta_ranking_puts_each_latent_in_one_set_by_its_sign(setup, tmp_path):
    """Under ``--ranking abs_delta`` the latent that fell most ranked first and landed in both sets."""
    root, _ = setup
    deltas = [0.1, -0.9, 0.5, -0.3, 0.0, 0.2] + [0.0] * 10
    sets = latents_from_diff(_diff_run(tmp_path / "d", root / "sae", deltas, "abs_delta"), 2, 2)
    assert sets.low == (2, 5) and sets.high == (1, 3)


def test_mismatch_names_the_first_differing_key():
    assert mismatch({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 2}}) is None
    assert mismatch({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}}) == "a.c: 2 (saved) vs 3 (now)"
    assert mismatch(None, {"a": 1}) == "no provenance recorded"
    assert (
        mismatch(None, None) is None
    )  # nothing recorded, nothing asked (a run trained without an evaluator)


def test_sae_fingerprint_reads_every_architecture():
    """A gated SAE has no b_enc (SAELens sets it to None): the fingerprint digests the state dict."""
    from sae_lens import GatedSAE, GatedSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(0)
    sae = GatedSAE(GatedSAEConfig(d_in=8, d_sae=16, metadata=SAEMetadata(hook_name=HOOK)))
    fp = sae_fingerprint(sae)
    with torch.no_grad():
        sae.W_dec[0, 0] += 1.0
    assert fp["d_sae"] == 16 and sae_fingerprint(sae)["weights"] != fp["weights"]
