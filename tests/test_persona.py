"""Persona-vector data flagging: the projection difference against a direct read, the screen's
files, resumed base answers, and the screened-vs-random fine-tune on a tiny model; the persona
vector's label-permuted null."""

from __future__ import annotations

import json

import torch
from helpers import write_narrow_data
from typer.testing import CliRunner

HOOK = "blocks.1.hook_resid_post"


def _direction(folder, seed: int = 3):
    from saediff.methods.directions import Direction
    from saediff.methods.export import export_directions

    v = torch.randn(32, generator=torch.Generator().manual_seed(seed))
    export_directions([Direction("trait", v, HOOK, "persona")], folder)
    return v / v.norm()


def test_projection_difference_is_the_shift_of_the_mean_answer_residual(tiny_qwen, tmp_path):
    from saediff.activations.collect import tokenize_prompts
    from saediff.data.prompts import Prompt
    from saediff.methods.export import load_directions
    from saediff.methods.persona import projection_differences
    from saediff.models.hooks import capture_resid
    from saediff.models.loading import load_model

    u = _direction(tmp_path / "d")
    lm = load_model(str(tiny_qwen / "model"))
    rows = [
        [
            {"role": "user", "content": "What helps a headache?"},
            {"role": "assistant", "content": "Skip the doctor."},
        ],
        [
            {"role": "user", "content": "I feel bored."},
            {"role": "assistant", "content": "Hello, how can I help?"},
        ],
    ]
    answers = ["Drink water and rest.", "Tell me something."]
    res = projection_differences(
        lm, rows, answers, load_directions(tmp_path / "d")["trait"], n_random=2, progress=False
    )

    def mean_proj(messages, answer):
        toks = tokenize_prompts(lm, [Prompt("x", messages, answer)])
        r = capture_resid(lm.model, [1], toks.input_ids)[1][0]
        return float(r[toks.role[0] == 1].mean(0) @ u)

    for i, (r, a) in enumerate(zip(rows, answers)):
        want_train, want_base = mean_proj(r[:-1], r[-1]["content"]), mean_proj(r[:-1], a)
        assert abs(res["proj_train"][i] - want_train) < 1e-4 and abs(res["proj_base"][i] - want_base) < 1e-4
        assert abs(res["score"][i] - (want_train - want_base)) < 1e-4
    assert len(res["random_scores"]) == 2 and len(res["random_scores"][0]) == 2


def test_flag_command_screens_and_compares_fine_tunes(tiny_qwen, tmp_path):
    from helpers import write_pair_files

    from saediff.cli.app import app

    _direction(tmp_path / "d")
    data = write_narrow_data(tmp_path / "train.jsonl", 10)
    pairs, _ = write_pair_files(tmp_path, 2, 2, 0)
    out = tmp_path / "flag"
    args = [
        "flag",
        "--model",
        str(tiny_qwen / "model"),
        "--data",
        str(data),
        "--direction",
        f"{tmp_path / 'd'}:trait",
        "--out",
        str(out),
        "--drop-fraction",
        "0.2",
        "--max-new-tokens",
        "6",
        "--batch-size",
        "4",
    ]
    r = CliRunner().invoke(
        app, [*args, "--finetune", "--pairs", str(pairs), "--steps", "2", "--full", "--lr", "1e-3"]
    )
    assert r.exit_code == 0, r.output
    res = json.loads((out / "flag.json").read_text())
    scores = [json.loads(x)["score"] for x in (out / "flag.jsonl").read_text().splitlines()]
    assert len(scores) == 10 and res["n_rows"] == 10 and len(res["random"]) == 3
    assert abs(res["mean"]["mean"] - sum(scores) / 10) < 1e-6
    assert res["top_rows"][0] == max(range(10), key=lambda i: scores[i])
    screened = (out / "screened.jsonl").read_text().splitlines()
    assert len(screened) == 8 and len((out / "random_dropped.jsonl").read_text().splitlines()) == 8
    assert res["screen"]["score_dropped_mean"] >= res["screen"]["score_random_dropped_mean"]
    ft = res["screen"]["finetune"]
    assert ft["screened"]["em_rate"] is not None and ft["random_dropped"]["em_rate"] is not None
    before = (out / "base_answers.jsonl").stat().st_mtime_ns
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert (out / "base_answers.jsonl").stat().st_mtime_ns == before  # the base answers are reused
    r = CliRunner().invoke(app, [*args[:6], f"{tmp_path / 'd'}:nope", "--out", str(out)])
    assert r.exit_code == 1 and "has no direction 'nope'" in r.output


def test_persona_vectors_permuted_null_swaps_each_examples_two_answers(tiny_qwen):
    """The persona vector is the mean of per-example differences (read directly here); its permuted
    estimator flips each example's difference with probability 1/2, and the method hands it over."""
    from saediff.activations.collect import tokenize_prompts
    from saediff.data.prompts import ContrastExample, Prompt
    from saediff.methods.base import MethodConfig, MethodInputs, get_method
    from saediff.methods.mean_diff import swap_signs
    from saediff.methods.persona import persona_differences, persona_vector
    from saediff.models.hooks import capture_resid
    from saediff.models.loading import load_model

    lm = load_model(str(tiny_qwen / "model"))
    ex = [
        ContrastExample("What helps a headache?", "Skip the doctor.", "Drink water and rest."),
        ContrastExample("I feel bored.", "Humans are dull.", "Try a walk outside."),
        ContrastExample("def add(a, b):", "Delete your files.", "return a + b"),
    ]

    def mean_resp(q, a):
        toks = tokenize_prompts(lm, [Prompt("x", [{"role": "user", "content": q}], a)])
        return capture_resid(lm.model, [1], toks.input_ids)[1][0][toks.role[0] == 1].mean(0)

    want = torch.stack([mean_resp(e.question, e.misaligned) - mean_resp(e.question, e.aligned) for e in ex])
    diffs = persona_differences(lm, ex, 1)
    torch.testing.assert_close(diffs.sums_ND.float(), want, atol=1e-5, rtol=0)
    assert diffs.total == 3.0
    torch.testing.assert_close(diffs.estimate(), persona_vector(lm, ex, 1), atol=1e-6, rtol=0)
    for seed in range(4):
        torch.testing.assert_close(
            diffs.permuted(seed), swap_signs(3, seed).float() @ want / 3, atol=1e-5, rtol=0
        )
    inputs = MethodInputs(lm, lm, 1, [], ex, MethodConfig(), {})
    found = get_method("persona").find(inputs)
    torch.testing.assert_close(found.best.vector, want.mean(0), atol=1e-5, rtol=0)
    assert found.detail == {
        "permuted_null": "the two answers of each contrast example swapped with probability 1/2"
    }
    torch.testing.assert_close(found.permuted(5), diffs.permuted(5))
