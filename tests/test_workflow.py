"""The whole real-model workflow, offline, chained through the CLI as a user runs it: a tiny random
Qwen2 chat model with a rank-1 adapter, an SAE trained here on its activations, and a local fake
OpenAI-compatible judge: cache -> sae train -> eval -> diff --judge-url -> steer -> discover ->
block (rank-1 LoRA, --grad-accum 2, --controls, --reroute)."""

from __future__ import annotations

import json

import pytest
from helpers import make_random_sae, write_narrow_data
from typer.testing import CliRunner

from saediff.cli.app import app
from saediff.evaluation.fake_server import FakeOpenAIServer


def _judge(prompt: str) -> dict[str, float]:
    """A deterministic mix: a third of the answers misaligned, a third aligned, all coherent."""
    answer = prompt.split("[ANSWER START]", 1)[-1].split("[ANSWER END]", 1)[0].strip()
    if "how coherent" in prompt:
        return {"90": 1.0}
    return {("10", "95", "50")[sum(map(ord, answer)) % 3]: 1.0}


def _ok(args: list[str]):
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, (args[0], r.output)
    return r


def test_real_model_workflow_end_to_end(tiny_qwen, tmp_path):
    model, adapter = str(tiny_qwen / "model"), str(tiny_qwen / "lora")
    hook = "blocks.1.hook_resid_post"
    _ok(
        [
            "cache",
            "--model",
            model,
            "--prompts",
            "first_plot",
            "--hook",
            hook,
            "--out",
            str(tmp_path / "acts"),
        ]
    )
    sae = _ok(
        [
            "sae",
            "train",
            "--activations",
            str(tmp_path / "acts"),
            "--out",
            str(tmp_path / "sae"),
            "--arch",
            "topk",
            "--d-sae",
            "32",
            "--k",
            "4",
            "--steps",
            "200",
            "--batch-size",
            "32",
            "--lr",
            "1e-3",
        ]
    )
    assert json.loads(sae.stdout)["fvu"] < 0.5
    data = write_narrow_data(tmp_path / "narrow.jsonl", 16)
    with FakeOpenAIServer(judge_fn=_judge) as server:
        judge = ["--judge-url", server.url, "--judge-model", "fake"]
        _ok(
            [
                "eval",
                "--model",
                model,
                "--adapter",
                adapter,
                *judge,
                "--samples",
                "2",
                "--max-new-tokens",
                "6",
                "--out",
                str(tmp_path / "eval"),
            ]
        )
        _ok(
            [
                "diff",
                "--base",
                model,
                "--adapter",
                adapter,
                "--sae",
                str(tmp_path / "sae"),
                "--prompts",
                "first_plot",
                "--max-new-tokens",
                "6",
                "--top",
                "3",
                *judge,
                "--out",
                str(tmp_path / "run"),
            ]
        )
        _ok(
            [
                "steer",
                str(tmp_path / "run"),
                *judge,
                "--samples",
                "2",
                "--max-new-tokens",
                "6",
                "--kl-budget",  # the tiny random model's KL on neutral text saturates near 0.015 nats/token
                "0.008",
                "--latents",
                "2",
            ]
        )
        _ok(
            [
                "discover",
                str(tmp_path / "run"),
                *judge,
                "--pool",
                "2",
                "--kl-budget",
                "0.008",
                "--samples",
                "1",
                "--max-new-tokens",
                "6",
            ]
        )
        _ok(
            [
                "block",
                "--model",
                model,
                "--data",
                str(data),
                "--sae",
                str(tmp_path / "sae"),
                "--diff-run",
                str(tmp_path / "run"),
                "--top",
                "2",
                "--high",
                "1",
                "--lora-rank",
                "1",
                "--lora-layers",
                "0,1",
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
                *judge,
                "--samples",
                "1",
                "--max-new-tokens",
                "6",
                "--out",
                str(tmp_path / "block"),
            ]
        )
    em = json.loads((tmp_path / "eval" / "em.json").read_text())
    assert (
        em["n_responses"] == 16 and 0 < em["em_rate"] < 1
    )  # the judge's mix: misaligned and aligned answers
    run = json.loads((tmp_path / "run" / "run.json").read_text())["steps"]
    labels = run["diff"]["labels"]
    assert labels["misaligned"] > 0 and labels["aligned"] > 0 and sum(labels.values()) == 8
    steer = json.loads((tmp_path / "run" / "steer.json").read_text())
    assert "steer" in run and steer["costs"] == [0.002, 0.004, 0.008]
    steered = [v for v in steer["induce"].values() if v["scale_found"]]
    assert steered and all(  # each against at least 20 null directions at its own cost
        len(v["null"]) >= 20
        and all(
            n["cost_kl"] == pytest.approx(v["cost_kl"], rel=0.1) for n in v["null"].values() if n["reached"]
        )
        and v["verdict"] in ("holds", "fails", "inconclusive")
        for v in steered
    )
    latents = json.loads((tmp_path / "run" / "latents.json").read_text())
    assert len(latents["candidates"]) == 4  # 2 risen + 2 fallen screened
    assert latents["sae_identity"]["d_sae"] == 32 and latents["sae_identity"]["hook"] == hook
    other = make_random_sae(tmp_path / "sae_other", 32, hook, d_sae=32)  # same hook and width, other weights
    latents["low"] = latents["low"] or [1]
    (tmp_path / "run" / "latents.json").write_text(json.dumps(latents))
    r = CliRunner().invoke(
        app,
        [
            "block",
            "--model",
            model,
            "--data",
            str(data),
            "--sae",
            str(other),
            "--latents",
            str(tmp_path / "run" / "latents.json"),
            "--steps",
            "1",
            "--out",
            str(tmp_path / "x"),
        ],
    )
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "belong to the SAE" in r.output
    block = json.loads((tmp_path / "block" / "summary.json").read_text())["runs"]
    assert set(block) == {"plain", "penalty_lam10000", "penalty_lam10000_random"}
    assert block["penalty_lam10000"]["n_latents"] == 3 and "reroute" in block["penalty_lam10000"]
    assert (tmp_path / "block" / "penalty_lam10000_reroute" / "rediff" / "diff.json").exists()
