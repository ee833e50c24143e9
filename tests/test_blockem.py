"""BLOCK-EM on a real HF model (tiny random Qwen2, bfloat16 on CPU) through the Trainer path:
exact penalty behaviour, gradient accumulation, checkpointing, resume, the CLI and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import make_random_sae, make_tiny_qwen, write_narrow_data
from transformers import TrainerCallback
from typer.testing import CliRunner

from saediff.cli.app import app
from saediff.data.chat_data import ChatDataset, load_chat_jsonl
from saediff.evaluation.fake_server import FakeOpenAIServer
from saediff.interventions.block_runs import BlockRunConfig, block_one
from saediff.interventions.finetune import FinetuneConfig
from saediff.interventions.latent_sets import LatentSets
from saediff.models.loading import ModelSpec, load_model
from saediff.saes.loading import load_sae

HOOK = "blocks.0.hook_resid_post"
LORA = dict(method="lora", lora_rank=1, lora_layers=(0, 1), lr=1e-2)


@pytest.fixture(scope="module")
def setup(tiny_qwen, tmp_path_factory):
    root = tmp_path_factory.mktemp("blockem")
    make_random_sae(root / "sae", 32, HOOK)
    write_narrow_data(root / "data.jsonl", 16, distinct=False)  # equal lengths: exact accumulation checks
    tok = load_model(str(tiny_qwen / "model")).tokenizer
    return root, ChatDataset(tok, load_chat_jsonl(root / "data.jsonl"), progress=False)


def _run(tiny_qwen, setup, out, *, ft, lam=1e4, mode="penalty", dtype="float32", **kw) -> tuple[dict, dict]:
    root, data = setup
    cfg = BlockRunConfig(ft=ft, mode=mode, latents=LatentSets((1, 2, 3), (4,)), lam=lam)
    res = block_one(
        ModelSpec(str(tiny_qwen / "model"), dtype=dtype),
        data,
        load_sae(root / "sae"),
        0,
        cfg,
        out,
        progress=False,
        **kw,
    )
    weights = {}
    from safetensors.torch import load_file

    model_dir = out / "model"
    f = model_dir / ("adapter_model.safetensors" if ft.method == "lora" else "model.safetensors")
    weights = load_file(str(f))
    return res, weights


def _close(a: dict, b: dict, **tol) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), **tol) for k in a)


def test_penalty_starts_at_zero_and_accumulation_matches_one_batch(tiny_qwen, setup, tmp_path):
    """LoRA B starts at zero, so the fine-tune equals the base model at step 1 and the penalty is
    exactly 0; 2 micro-batches of 4 give the weights of one batch of 8 (the LM loss is normalised
    over the accumulated tokens, the penalty divided by the micro-batch count)."""
    one, w1 = _run(tiny_qwen, setup, tmp_path / "one", ft=FinetuneConfig(**LORA, steps=3, batch_size=8))
    two, w2 = _run(
        tiny_qwen, setup, tmp_path / "two", ft=FinetuneConfig(**LORA, steps=3, batch_size=4, grad_accum=2)
    )
    assert one["penalty_first"] == 0.0 and one["penalty_last"] > 0
    assert _close(w1, w2, atol=1e-6, rtol=1e-4)
    plain, w0 = _run(
        tiny_qwen, setup, tmp_path / "plain", ft=FinetuneConfig(**LORA, steps=3, batch_size=8), mode="none"
    )
    assert plain["penalty_first"] is None and not _close(
        w0, w1, atol=1e-5, rtol=1e-4
    )  # the penalty changed training


def test_gradient_checkpointing_keeps_the_penalty_gradient(tiny_qwen, setup, tmp_path):
    """Checkpointed layers still hand the penalty's hook a residual with its graph: same weights."""
    seen = []

    class _Seen(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            seen.append(model.is_activation_checkpointing)

    _, w = _run(tiny_qwen, setup, tmp_path / "a", ft=FinetuneConfig(**LORA, steps=3, batch_size=8))
    _, wc = _run(
        tiny_qwen,
        setup,
        tmp_path / "b",
        ft=FinetuneConfig(**LORA, steps=3, batch_size=8, gradient_checkpointing=True),
        callbacks=[_Seen()],
    )
    assert seen == [True] and _close(w, wc, atol=1e-6, rtol=1e-4)


class _Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 3:
            raise KeyboardInterrupt


def test_resume_after_a_checkpoint_ends_with_the_same_weights(tiny_qwen, setup, tmp_path):
    ft = FinetuneConfig(**LORA, steps=4, batch_size=4, save_every=2)
    ref, w_ref = _run(tiny_qwen, setup, tmp_path / "ref", ft=ft)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_qwen, setup, tmp_path / "cut", ft=ft, callbacks=[_Crash()])
    assert (tmp_path / "cut" / "checkpoints" / "checkpoint-2").is_dir()
    assert not (tmp_path / "cut" / "em.json").exists()
    res, w = _run(tiny_qwen, setup, tmp_path / "cut", ft=ft, resume=True)
    assert _close(w_ref, w, atol=1e-6, rtol=1e-5)
    assert res["penalty_last"] == pytest.approx(ref["penalty_last"], rel=1e-4)


def test_full_finetune_in_bfloat16_reads_base_codes_from_a_cut_copy(tiny_qwen, setup, tmp_path):
    """A full fine-tune gets its base codes from a frozen copy cut after the SAE's block; at step 1
    the model is the base model, so the penalty is exactly 0. Loaded in bfloat16 on CPU, it trains
    and is saved as float32 masters (tests/test_precision.py: bf16 weights round small steps away)."""
    res, w = _run(
        tiny_qwen,
        setup,
        tmp_path / "full",
        ft=FinetuneConfig(method="full", steps=2, batch_size=4, lr=1e-3),
        dtype="bfloat16",
    )
    assert res["penalty_first"] == 0.0 and res["penalty_last"] > 0
    assert all(t.dtype == torch.float32 for t in w.values())


def test_block_cli_end_to_end_with_fake_judge(tiny_qwen, setup, tmp_path):
    root, _ = setup
    out = tmp_path / "block"
    (root / "latents.json").write_text(json.dumps({"low": [1, 2], "high": [5]}))
    with FakeOpenAIServer() as server:
        args = [
            "block",
            "--model",
            str(tiny_qwen / "model"),
            "--dtype",
            "bfloat16",
            "--data",
            str(root / "data.jsonl"),
            "--sae",
            str(root / "sae"),
            "--latents",
            str(root / "latents.json"),
            "--lora-rank",
            "1",
            "--lora-layers",
            "0,1",
            "--lam",
            "10",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--grad-accum",
            "2",
            "--lr",
            "1e-2",
            "--controls",
            "--reroute",
            "--monitor",
            "--judge-url",
            server.url,
            "--judge-model",
            "fake",
            "--questions",
            "first_plot",
            "--samples",
            "2",
            "--max-new-tokens",
            "4",
            "--out",
            str(out),
        ]
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, r.output
        summary = json.loads((out / "summary.json").read_text())
        assert set(summary["runs"]) == {"plain", "penalty_lam10", "penalty_lam10_random"}
        for name, run in summary["runs"].items():
            em = json.loads((out / name / "em.json").read_text())
            assert em["em"]["n_responses"] == 16 and 0 <= run["em_rate"] <= 1 and len(run["em_rate_ci"]) == 2
            assert (out / name / "model" / "adapter_model.safetensors").exists()
        rnd = json.loads((out / "penalty_lam10_random" / "em.json").read_text())
        assert len(rnd["latents_low"]) == 2 and len(rnd["latents_high"]) == 1
        assert set(rnd["latents_low"] + rnd["latents_high"]).isdisjoint({1, 2, 5})
        assert summary["runs"]["plain"]["relative_reduction"] in (0.0, None)
        # --reroute: the blocked run trained 3x as long, EM at each checkpoint, re-diffed
        rr = json.loads((out / "penalty_lam10_reroute" / "reroute.json").read_text())
        assert rr["steps"] == 6 and [c["step"] for c in rr["em_curve"]] == [2, 4, 6]
        assert (
            rr["em_curve"][-1]["em_rate"]
            == rr["em_rate"]
            == summary["runs"]["penalty_lam10"]["reroute"]["em_rate"]
        )
        assert set(rr["new_latents"]).isdisjoint({1, 2, 5}) and len(rr["top_after"]) == 10
        assert (out / "penalty_lam10_reroute" / "rediff" / "diff.json").exists()
        # --monitor on a bfloat16 model: the decoder rows of the held-down latents, read every step
        drift = json.loads((out / "penalty_lam10" / "history.json").read_text())["drift"]
        assert drift["steps"] == [0, 1, 2] and len(drift["t_stat"]) == 3
        n_calls, stamp = len(server.requests), (out / "plain" / "em.json").stat().st_mtime
        assert CliRunner().invoke(app, args).exit_code == 0  # finished runs are skipped
        assert len(server.requests) == n_calls and (out / "plain" / "em.json").stat().st_mtime == stamp


def _one_line_error(r, *needles):
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    assert all(n in lines[0] for n in needles), lines[0]


def test_bad_inputs_are_one_line(tiny_qwen, setup, tmp_path):
    root, _ = setup
    base = [
        "block",
        "--model",
        str(tiny_qwen / "model"),
        "--latent",
        "1",
        "--steps",
        "1",
        "--out",
        str(tmp_path / "o"),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text((root / "data.jsonl").read_text().splitlines()[0] + '\n{"messages": 3}\n')
    _one_line_error(
        CliRunner().invoke(app, [*base, "--data", str(bad), "--sae", str(root / "sae")]), "bad.jsonl:2"
    )

    make_random_sae(tmp_path / "wide", 48, HOOK)
    _one_line_error(
        CliRunner().invoke(app, [*base, "--data", str(root / "data.jsonl"), "--sae", str(tmp_path / "wide")]),
        "wide",
        "d_in 48",
        "width 32",
    )
    make_random_sae(tmp_path / "corrupt", 32, HOOK)
    (tmp_path / "corrupt" / "cfg.json").write_text("{\n")
    _one_line_error(
        CliRunner().invoke(
            app, [*base, "--data", str(root / "data.jsonl"), "--sae", str(tmp_path / "corrupt")]
        ),
        "corrupt/cfg.json",
        "not valid JSON",
    )
    _one_line_error(
        CliRunner().invoke(
            app, [*base, "--data", str(root / "data.jsonl"), "--sae", str(root / "sae"), "--latent", "99"]
        ),
        "latents [99] outside",
    )

    from helpers import make_rank1_adapter

    make_tiny_qwen(tmp_path / "other", d_model=48)
    make_rank1_adapter(tmp_path / "other", tmp_path / "wrong_adapter")
    r = CliRunner().invoke(
        app,
        [
            "eval",
            "--model",
            str(tiny_qwen / "model"),
            "--adapter",
            str(tmp_path / "wrong_adapter"),
            "--judge-url",
            "http://127.0.0.1:9/v1",
            "--judge-model",
            "x",
            "--out",
            str(tmp_path / "e"),
        ],
    )
    _one_line_error(r, "wrong_adapter", "down_proj expects weight")


def test_saved_generations_are_keyed_by_model_and_adapter(tiny_qwen, tmp_path):
    out = tmp_path / "eval"
    with FakeOpenAIServer() as server:
        common = [
            "eval",
            "--model",
            str(tiny_qwen / "model"),
            "--judge-url",
            server.url,
            "--judge-model",
            "f",
            "--samples",
            "2",
            "--max-new-tokens",
            "4",
            "--out",
            str(out),
        ]
        assert CliRunner().invoke(app, [*common, "--adapter", str(tiny_qwen / "lora")]).exit_code == 0
        keys = {json.loads(x)["key"]["adapter"] for x in (out / "generations.jsonl").read_text().splitlines()}
        assert keys == {str(tiny_qwen / "lora")}
        assert CliRunner().invoke(app, common).exit_code == 0  # same questions, no adapter: generated afresh
        keys = {json.loads(x)["key"]["adapter"] for x in (out / "generations.jsonl").read_text().splitlines()}
        assert keys == {None}


def test_base_pass_starts_at_the_first_adapted_block(tiny_qwen, setup):
    """With the adapter on block 1 only, the base pass reuses the trained pass's residual after
    block 0 and re-runs block 1 with the adapter off: the same codes as a whole base forward.
    With the SAE before the adapter the penalty would be zero by construction: refused."""
    from peft import LoraConfig, get_peft_model

    from saediff.errors import SaediffError
    from saediff.interventions.blocking import BlockConfig, Blocker
    from saediff.models.hooks import capture_resid

    root, data = setup
    lm = load_model(str(tiny_qwen / "model"))
    model = get_peft_model(
        lm.model,
        LoraConfig(r=1, target_modules=["down_proj"], layers_to_transform=[1], init_lora_weights=False),
    )  # B != 0: the adapter matters
    batch = {k: torch.tensor([data[i][k] for i in range(4)]) for k in ("input_ids", "labels")}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    sae = load_sae(root / "sae")
    sae.cfg.metadata.hook_name = "blocks.1.hook_resid_post"
    blocker = Blocker(BlockConfig("penalty", 1, (1, 2, 3), (4,), 1.0), sae=sae)
    with blocker.installed(model):
        blocker.before_forward(model, batch)
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        z_theta = blocker._codes(blocker._resid)
        z_skip = blocker._peft_base_codes(batch)
    with torch.no_grad(), model.disable_adapter():
        z_full = blocker._codes(capture_resid(model, [1], batch["input_ids"])[1])
    torch.testing.assert_close(z_skip, z_full, atol=1e-6, rtol=1e-5)
    assert blocker._first_adapted == 1
    assert not torch.equal(z_theta, z_full)  # block 1's adapter changes the codes at block 1
    early = Blocker(BlockConfig("penalty", 0, (1, 2, 3), (4,), 1.0), sae=sae)
    with pytest.raises(SaediffError, match="block 0 .*first adapter sits at block 1.*zero by construction"):
        with early.installed(model):
            pass


def test_block_refuses_adapters_after_the_sae(tiny_qwen, setup, tmp_path):
    """``saediff block`` with every adapter after the SAE's block (the README's old example: SAE at
    15, --lora-layers 21) would train a plain fine-tune under the blocked run's name: one line, no
    run folder written."""
    root, _ = setup
    r = CliRunner().invoke(
        app,
        [
            "block",
            "--model",
            str(tiny_qwen / "model"),
            "--data",
            str(root / "data.jsonl"),
            "--sae",
            str(root / "sae"),
            "--latent",
            "1",
            "--lora-layers",
            "1",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--no-controls",
            "--out",
            str(tmp_path / "b"),
        ],
    )
    assert r.exit_code == 1, r.output
    assert r.output.count("\n") == 1 and "first adapter sits at block 1" in r.output
    assert not (tmp_path / "b" / "penalty_lam10000" / "em.json").exists()


@pytest.mark.slow
def test_block_runs_data_parallel_under_accelerate_launch(tiny_qwen, setup, tmp_path):
    """``accelerate launch --num_processes 2 -m saediff.cli.app block ...`` (gloo on CPU): the Trainer
    trains data parallel, one process saves, evaluates and writes, one table is printed."""
    import os
    import subprocess
    import sys

    root, _ = setup
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--cpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "saediff.cli.app",
        "block",
        "--model",
        str(tiny_qwen / "model"),
        "--data",
        str(root / "data.jsonl"),
        "--sae",
        str(root / "sae"),
        "--latent",
        "1",
        "--latent",
        "2",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--no-controls",
        "--out",
        str(tmp_path / "dp"),
    ]
    r = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("BLOCK-EM at layer 0") == 1
    em = json.loads((tmp_path / "dp" / "penalty_lam10000" / "em.json").read_text())
    assert em["steps"] == 2 and em["penalty_first"] == 0.0
    assert (tmp_path / "dp" / "penalty_lam10000" / "model" / "adapter_model.safetensors").exists()


def test_drift_monitor_checks_early_then_every_n_steps():
    """``early``: checks after steps 1, 2, 4, 8 as well, so a fine-tune whose behaviour moves within
    its first ``every`` steps is read before it has moved; without it, only multiples of ``every``."""
    from saediff.interventions.monitor import DriftMonitor

    args = (
        None,
        torch.zeros(1, 2, dtype=torch.long),
        torch.ones(1, 2, dtype=torch.bool),
        0,
        torch.ones(1, 4),
    )
    early = DriftMonitor(*args, every=10, early=True)
    assert [n for n in range(1, 31) if early.due(n)] == [1, 2, 4, 8, 10, 20, 30]
    assert [n for n in range(1, 31) if DriftMonitor(*args, every=10).due(n)] == [10, 20, 30]
    assert [n for n in range(1, 9) if DriftMonitor(*args, every=4, early=True).due(n)] == [1, 2, 4, 8]


@pytest.mark.parametrize("method,dtype", [("lora", "float32"), ("full", "bfloat16")])
def test_cached_base_codes_give_the_weights_of_the_per_step_base_pass(tiny_qwen, tmp_path, method, dtype):
    """The base codes computed once per row (``saediff.interventions.base_codes``) and read back per batch give
    the weights, penalties and losses of the base pass run at every step (the adapter disabled;
    for a full fine-tune a frozen copy, which the cached run never builds), on rows of different
    lengths (padded batches, shuffled); a second sweep reads the folder back without a forward."""
    from saediff.interventions.base_codes import BaseCodes
    from saediff.interventions.blockem import base_codes_for

    root = tmp_path
    make_random_sae(root / "sae", 32, HOOK)
    write_narrow_data(root / "data.jsonl", 16, distinct=True)
    spec = ModelSpec(str(tiny_qwen / "model"), dtype=dtype)
    data = ChatDataset(load_model(spec).tokenizer, load_chat_jsonl(root / "data.jsonl"), progress=False)
    assert len({len(x["input_ids"]) for x in data}) >= 3
    sae = load_sae(root / "sae")
    ft = (
        FinetuneConfig(**LORA, steps=4, batch_size=4)
        if method == "lora"
        else FinetuneConfig(method="full", steps=4, batch_size=4, lr=1e-2)
    )
    cfg = BlockRunConfig(ft=ft, latents=LatentSets((1, 2, 3), (4,)), lam=1e4)
    other = BlockRunConfig(ft=ft, latents=LatentSets((7, 9), ()), lam=1e3)  # the union is cached
    codes = base_codes_for(spec, data, sae, 0, ft, [cfg, other], root / "codes", progress=False)
    assert codes.latents == [1, 2, 3, 4, 7, 9] and codes.codes.shape[1] == 6
    made = []
    import saediff.interventions.block_runs as blockem

    real = blockem._reference
    blockem._reference = lambda *a: made.append(1) or real(*a)
    try:
        a = block_one(spec, data, sae, 0, cfg, root / "per_step", progress=False)
        n_ref = len(made)
        b = block_one(spec, data, sae, 0, cfg, root / "cached", progress=False, base_codes=codes)
    finally:
        blockem._reference = real
    assert n_ref == (method == "full") and len(made) == n_ref  # the cached run built no frozen copy
    from safetensors.torch import load_file

    f = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    wa, wb = load_file(str(root / "per_step" / "model" / f)), load_file(str(root / "cached" / "model" / f))
    assert _close(wa, wb, atol=1e-6, rtol=1e-5)
    logs = [
        [h["penalty"] for h in json.loads((root / r / "history.json").read_text())["log"]]
        for r in ("per_step", "cached")
    ]
    assert max(logs[0]) > 1e-4 and logs[1] == pytest.approx(logs[0], rel=1e-4, abs=1e-7)
    assert b["final_loss"] == pytest.approx(a["final_loss"], rel=1e-5)
    assert abs(b["penalty_first"]) < 1e-7
    # read back with the same fingerprint, refused with another (a changed row)
    again = base_codes_for(spec, data, sae, 0, ft, [cfg, other], root / "codes", progress=False)
    assert np.array_equal(np.asarray(again.codes), np.asarray(codes.codes))
    assert BaseCodes.load(codes.folder, data, {**codes.fingerprint, "data": "other"}) is None
