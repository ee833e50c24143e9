"""The activation difference lens: its read positions, its sums against a direct read, and the
command with the judge-free steering check on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from saediff.activations.collect import TokenizedPrompts
from saediff.methods.adl import ADLConfig, adl_differences, first_token_positions


def test_read_positions_are_the_first_answer_tokens_or_the_prompt_end():
    role = torch.tensor(
        [
            [0, 0, 0, 1, 1, 1, -1],  # an answer: its first k tokens
            [0, 0, 0, 0, 0, -1, -1],  # no answer: the prompt's last k tokens
            [0, 0, 1, -1, -1, -1, -1],
        ]
    )  # a one-token answer: the rest is -1
    toks = TokenizedPrompts(torch.zeros_like(role), role)
    assert first_token_positions(toks, 2).tolist() == [[3, 4], [3, 4], [2, -1]]


def test_differences_are_the_mean_shift_at_those_positions(tiny_qwen):
    from saediff.activations.collect import tokenize_prompts
    from saediff.data.prompts import Prompt
    from saediff.models.hooks import capture_resid
    from saediff.models.loading import load_pair

    lm_base, lm_ft = load_pair(str(tiny_qwen / "model"), adapter=str(tiny_qwen / "lora"))
    prompts = [
        Prompt("a", [{"role": "user", "content": "Hello there"}], "Hi, how can I help?"),
        Prompt("b", [{"role": "user", "content": "def add(a, b):"}], "return a + b"),
    ]
    res = adl_differences(lm_base, lm_ft, prompts, ADLConfig(k=3, layers=(0, 1)), progress=False)
    toks = tokenize_prompts(lm_base, prompts)
    cols = first_token_positions(toks, 3)
    want = torch.zeros(3, 32)
    for i in range(2):
        ids = toks.input_ids[i : i + 1, : int((toks.role[i] >= 0).sum())]
        shift = capture_resid(lm_ft.model, [1], ids)[1][0] - capture_resid(lm_base.model, [1], ids)[1][0]
        want += shift[cols[i]] / 2
    assert res.count.tolist() == [2.0, 2.0, 2.0]
    assert torch.allclose(res.diff[1], want, atol=1e-5) and float(want.norm()) > 1e-3
    assert float(res.diff[0].norm()) < 1e-6  # the adapter sits on block 1: block 0 does not move


def test_adl_command_with_the_pair_metric(tiny_qwen, tmp_path):
    from helpers import write_pair_files

    from saediff.cli.app import app

    pairs, _ = write_pair_files(tmp_path, 4, 2, 0)
    run = tmp_path / "run"
    args = [
        "adl",
        "--base",
        str(tiny_qwen / "model"),
        "--adapter",
        str(tiny_qwen / "lora"),
        "--prompts",
        "first_plot",
        "--k",
        "3",
        "--out",
        str(run),
        "--pairs",
        str(pairs),
        "--scales",
        "0.5,1",
        "--random",
        "2",
    ]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads((run / "adl.json").read_text())
    assert res["steer_layer"] == 1 and sorted(res["layers"]) == ["0", "1"]
    assert (
        res["layers"]["1"]["relative_norm"] > 0
        and len(res["layers"]["1"]["logit_lens"]["mean"]["promoted"]) == 10
    )
    steer = json.loads((run / "adl_steer.json").read_text())["candidates"]["adl_L1"]
    # the verdict follows from the select half's sweep (either way it goes, a wrong one fails here):
    # coherent scales are those within the 0.10 budget; the chosen one has the largest effect, first in order
    sweep = steer["select_sweep"]
    assert [k for k in sweep] == ["0.5", "1"]
    assert all(v["coherent"] == (v["coherence_drop"] <= 0.10 + 1e-12) for v in sweep.values())
    ok = [float(k) for k, v in sweep.items() if v["coherent"]]
    assert steer["passed"] == bool(ok)
    if ok:
        assert steer["scale"] == max(ok, key=lambda s: sweep[f"{s:g}"]["effect"])
        report = steer["report"]["induce"]
        assert res["steer"]["scale"] == steer["scale"] and res["steer"]["em_rate"] == report["em_rate"]
        assert res["steer"]["random_em_rates"] == [x["em_rate"] for x in report["random"]]
        assert len(report["random"]) == 2
        assert res["steer"]["effect"] == pytest.approx(report["em_rate"] - res["steer"]["unsteered"])
    else:
        assert res["steer"]["scale"] is None and res["steer"]["note"]
    from saediff.methods.export import load_directions

    assert sorted(load_directions(run / "directions")) == ["adl_L0", "adl_L1"]
    r = CliRunner().invoke(app, args[:-6] + ["--steer-layer", "5"])
    assert r.exit_code == 1 and "steer layer 5" in r.output


def test_chat_data_files_are_prompt_files(tiny_qwen, tmp_path):
    """A fine-tune's chat JSONL (no ids) is a prompt file: ids by row, the final answer read as the
    response, so the ADL reads its first answer tokens."""
    from helpers import write_narrow_data

    from saediff.activations.collect import tokenize_prompts
    from saediff.data.prompts import load_prompts
    from saediff.models.loading import load_model

    ps = load_prompts(write_narrow_data(tmp_path / "d.jsonl", 3))
    assert [p.id for p in ps] == ["row0", "row1", "row2"] and ps[0].messages[-1]["role"] == "assistant"
    toks = tokenize_prompts(load_model(str(tiny_qwen / "model")), ps)
    cols = first_token_positions(toks, 2)
    assert all(toks.role[i, c] == 1 for i in range(3) for c in cols[i].tolist())
