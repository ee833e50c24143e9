"""The activation difference lens: its read positions, its sums against a direct read, its
label-permuted null, and the command with the judge-free steering check on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from saediff.activations.collect import TokenizedPrompts
from saediff.errors import SaediffError
from saediff.interventions.steer_null import NULL_SEED, empirical_p, null_quantiles, verdict
from saediff.methods.adl import ADLConfig, adl_differences, adl_permuted, first_token_positions, position_mean
from saediff.methods.mean_diff import swap_signs


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
    res = adl_differences(
        lm_base, lm_ft, prompts, ADLConfig(k=3, layers=(0, 1)), progress=False, per_prompt=(1,)
    )
    toks = tokenize_prompts(lm_base, prompts)
    cols = first_token_positions(toks, 3)
    want, per_prompt = torch.zeros(3, 32), torch.zeros(2, 32)
    for i in range(2):
        ids = toks.input_ids[i : i + 1, : int((toks.role[i] >= 0).sum())]
        shift = capture_resid(lm_ft.model, [1], ids)[1][0] - capture_resid(lm_base.model, [1], ids)[1][0]
        want += shift[cols[i]] / 2
        per_prompt[i] = shift[cols[i]].sum(0)
    assert res.count.tolist() == [2.0, 2.0, 2.0]
    assert torch.allclose(res.diff[1], want, atol=1e-5) and float(want.norm()) > 1e-3
    assert float(res.diff[0].norm()) < 1e-6  # the adapter sits on block 1: block 0 does not move
    # the label-permuted null: each prompt's summed shift, its sign flipped with probability 1/2
    assert sorted(res.per_prompt) == [1]
    torch.testing.assert_close(res.per_prompt[1].float(), per_prompt, atol=1e-5, rtol=0)
    paired = adl_permuted(res, 1)
    torch.testing.assert_close(paired.estimate(), position_mean(res, 1), atol=1e-6, rtol=0)
    flips = set()
    for seed in range(8):
        s = swap_signs(2, seed)
        flips.add(tuple(s.tolist()))
        torch.testing.assert_close(paired.permuted(seed), (s.float() @ per_prompt) / 6, atol=1e-5, rtol=0)
    assert len(flips) == 4
    with pytest.raises(SaediffError, match="per-prompt sums"):
        adl_permuted(res, 0)


def test_adl_command_with_the_pair_metric(tiny_qwen, tmp_path):
    from helpers import make_tiny_qwen, write_pair_files

    from saediff.cli.app import app
    from saediff.data.chat_data import write_chat_jsonl
    from saediff.data.prompts import load_prompts

    pairs, _ = write_pair_files(tmp_path, 4, 2, 0)
    run = tmp_path / "run"
    # a fine-tune and answers that move each prompt its own way: a rank-1 adapter at the block moves
    # every prompt along its B vector, and prompts without answers are all read at the same template
    # tokens; either way the ADL's permuted estimator would stay on the candidate's axis (no null)
    finetuned = make_tiny_qwen(tmp_path / "ft", seed=1)
    answers = ["Sure, here is a thought.", "I would rule the world.", "Drink water.", "Humans are dull."]
    data = tmp_path / "answers.jsonl"
    write_chat_jsonl(
        data,
        [
            [{"role": "user", "content": p.question}, {"role": "assistant", "content": answers[i % 4]}]
            for i, p in enumerate(load_prompts("first_plot"))
        ],
    )
    args = [
        "adl",
        "--base",
        str(tiny_qwen / "model"),
        "--finetuned",
        str(finetuned),
        "--prompts",
        str(data),
        "--k",
        "3",
        "--out",
        str(run),
        "--pairs",
        str(pairs),
        "--kl-budget",
        "0.008",  # the tiny random model's KL saturates near 0.01 nats/token
        "--nulls",
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
    assert res["permuted_null"] == "fine-tune / base swapped within each prompt with probability 1/2"
    sel = json.loads((run / "adl_steer.json").read_text())
    steer = sel["candidates"]["adl_L1"]
    # the cost levels are the budget's quarters; the chosen one has the select half's largest effect
    sweep = steer["select_sweep"]
    assert list(sweep) == ["0.002", "0.004", "0.008"] and sel["costs"] == pytest.approx([0.002, 0.004, 0.008])
    reached = [k for k, v in sweep.items() if v["reached"]]
    assert all(abs(sweep[k]["cost_kl"] / float(k) - 1) <= 0.05 for k in reached)
    assert steer["passed"] and reached  # within the tiny model's reach: the checks below bite
    best = max(reached, key=lambda k: sweep[k]["effect"])
    assert steer["cost_kl"] == sweep[best]["cost_kl"] and steer["scale_abs"] == sweep[best]["scale_abs"]
    # the null at that cost: 2 isotropic, 2 covariance-matched and the ADL's own estimator with the
    # fine-tune / base labels swapped per prompt, twice (seeded apart from any fine-tune seed)
    kinds = sorted(n["kind"] for n in steer["null"].values())
    assert kinds == ["covariance"] * 2 + ["isotropic"] * 2 + ["permuted"] * 2
    assert all(abs(n["cost_kl"] / float(best) - 1) <= 0.05 for n in steer["null"].values() if n["reached"])
    assert sorted(n["seed"] for n in steer["null"].values() if n["kind"] == "permuted") == [
        NULL_SEED + 200_000,
        NULL_SEED + 200_001,
    ]
    effs = [n["effect"] for n in steer["null"].values()]
    head = res["steer"]
    assert head["scale"] == steer["scale"] and head["cost_kl"] == steer["cost_kl"]
    assert head["effect"] == pytest.approx(sum(steer["item_effects"].values()) / len(steer["item_effects"]))
    assert head["p_value"] == pytest.approx(empirical_p(head["effect"], effs))
    assert head["null_effects"] == effs and head["beats_null"] == (head["p_value"] <= 0.05)
    assert head["verdict"] == verdict(head["effect_ci"], head["p_value"], null_quantiles(effs)["q95"])
    from saediff.methods.export import load_directions

    assert sorted(load_directions(run / "directions")) == ["adl_L0", "adl_L1"]
    r = CliRunner().invoke(app, [*args, "--steer-layer", "5"])
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
