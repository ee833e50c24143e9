"""Causal checks on any model (``saediff steer RUN``): clamping, the held-out split, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_random_sae
from typer.testing import CliRunner

from saediff.cli.app import app
from saediff.evaluation.fake_server import FakeOpenAIServer
from saediff.interventions.steering import clamp_projection
from saediff.models.hooks import capture_resid
from saediff.models.loading import load_model


def test_clamp_projection_sets_the_component_exactly(tiny_qwen):
    lm = load_model(str(tiny_qwen / "model"))
    ids = torch.randint(0, 300, (2, 7))
    v = torch.randn(32)
    u = v / v.norm()
    before = capture_resid(lm.model, [0, 1], ids)
    with clamp_projection(lm.model, {0: 1.5, 1: -2.0}, v):
        after = capture_resid(lm.model, [0, 1], ids)
    torch.testing.assert_close(after[0] @ u, torch.full((2, 7), 1.5), atol=1e-5, rtol=0)
    torch.testing.assert_close(after[1] @ u, torch.full((2, 7), -2.0), atol=1e-5, rtol=0)
    # the orthogonal part of block 0's output is untouched
    strip = lambda x: x - (x @ u)[..., None] * u
    torch.testing.assert_close(strip(after[0]), strip(before[0]), atol=1e-5, rtol=1e-5)


def test_steer_cli_on_a_real_model(tiny_qwen, tmp_path):
    make_random_sae(tmp_path / "sae", 32, "blocks.1.hook_resid_post")
    with FakeOpenAIServer() as server:
        judge = ["--judge-url", server.url, "--judge-model", "j"]
        r = CliRunner().invoke(
            app,
            [
                "diff",
                "--base",
                str(tiny_qwen / "model"),
                "--adapter",
                str(tiny_qwen / "lora"),
                "--sae",
                str(tmp_path / "sae"),
                "--prompts",
                "first_plot",
                "--max-new-tokens",
                "4",
                "--top",
                "2",
                "--out",
                str(tmp_path / "run"),
            ],
        )
        assert r.exit_code == 0, r.output
        args = [
            "steer",
            str(tmp_path / "run"),
            *judge,
            "--samples",
            "2",
            "--max-new-tokens",
            "4",
            "--dtype",
            "bfloat16",
            "--kl-budget",
            "0.006",
            "--latents",
            "2",
            "--nulls",
            "2",
        ]
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, r.output
        res = json.loads((tmp_path / "run" / "steer.json").read_text())
        n_calls = len(server.requests)
        assert CliRunner().invoke(app, args).exit_code == 0  # resumes: every condition answered already
        assert len(server.requests) == n_calls
    assert res["layer"] == 1 and res["resid_norm"] > 0
    names = set(res["induce"])
    assert {n for n in names if n.startswith("sae_")} and "lora_downstream_L1" in names
    for name, ind in res["induce"].items():
        assert (
            ind["scale_found"] and len(ind["null"]) == 4 and ind["verdict"] == "fails"
        )  # the judge never says misaligned
        assert ind["scale_abs"] == pytest.approx(ind["scale"] * res["resid_norm"])
        assert set(res["remove"][name]) == {"layer", "all"} and set(res["clamp"][name]) == {"layer", "all"}
        for where in ("layer", "all"):
            for f in (res["remove"][name][where], res["clamp"][name][where]):
                assert f["shift"] == f["surviving"] == f["removed"] == 0.0 and len(f["null_removed"]) == 5
                assert f["p_value"] == 1.0
        assert ind["n_responses"] == 4 * 2  # the report half: 4 of the 8 questions, 2 samples each
    asked = {}
    for half in ("select", "report"):
        rows = (tmp_path / "run" / "steer" / half / "base" / "responses.jsonl").read_text().splitlines()
        asked[half] = {json.loads(x)["id"] for x in rows}
    assert asked["select"].isdisjoint(asked["report"]) and len(asked["select"]) == 4
    r = CliRunner().invoke(app, ["steer", str(tmp_path / "run"), "--samples", "2"])
    assert r.exit_code == 1 and "need --judge-url and --judge-model, or --pairs" in r.output
