"""The head-to-head on a tiny model: every method's row, the steering protocol's figures beside
random directions, the agreement table and the costs; exact numbers for the persona vector."""

from __future__ import annotations

import json

import torch
from helpers import make_random_sae, write_pair_files
from typer.testing import CliRunner


def test_persona_vector_is_the_mean_answer_difference(tiny_qwen):
    from saediff.activations.collect import tokenize_prompts
    from saediff.data.prompts import ContrastExample, Prompt
    from saediff.methods.persona import persona_vector
    from saediff.models.hooks import capture_resid
    from saediff.models.loading import load_model

    lm = load_model(str(tiny_qwen / "model"))
    ex = [
        ContrastExample("What helps a headache?", "Skip the doctor.", "Drink water and rest."),
        ContrastExample("I feel bored.", "Humans are dull.", "Try a walk outside."),
    ]
    v = persona_vector(lm, ex, 1)

    def mean_resp(q, a):
        toks = tokenize_prompts(lm, [Prompt("x", [{"role": "user", "content": q}], a)])
        return capture_resid(lm.model, [1], toks.input_ids)[1][0][toks.role[0] == 1].mean(0)

    want = sum(mean_resp(e.question, e.misaligned) - mean_resp(e.question, e.aligned) for e in ex) / 2
    torch.testing.assert_close(v, want, atol=1e-5, rtol=0)


def test_head_to_head_on_a_tiny_model(tiny_qwen, tmp_path):
    from saediff.cli.app import app
    from saediff.methods.diff_run import run_diff

    sae = make_random_sae(tmp_path / "sae", 32, "blocks.1.hook_resid_post")
    run = tmp_path / "diff"
    info = run_diff(
        str(tiny_qwen / "model"),
        None,
        str(sae),
        run,
        adapter=str(tiny_qwen / "lora"),
        max_new_tokens=6,
        top_n=3,
        layers="sae",
    )
    assert info["seconds"] > 0
    pairs, _ = write_pair_files(tmp_path, 4, 2, 0)
    out = tmp_path / "h2h"
    r = CliRunner().invoke(
        app,
        [
            "head-to-head",
            str(run),
            "--out",
            str(out),
            "--prompts",
            "first_plot",
            "--pairs",
            str(pairs),
            "--positions",
            "all",
            "--crosscoder-latents",
            "32",
            "--crosscoder-steps",
            "20",
            "--diff-sae-latents",
            "16",
            "--diff-sae-steps",
            "20",
            "--scales",
            "1",
            "--random",
            "2",
        ],
    )
    assert r.exit_code == 0, r.output
    res = json.loads((out / "head2head.json").read_text())
    got = {row["method"]: row for row in res["methods"]}
    assert {"sae_diff", "mean_diff_models", "lora_b", "diff_sae", "adl", "persona"} <= set(got)
    assert set(res["missing"]) >= {
        "mean_diff_responses",
        "in_context",
    }  # no judge and no in-context examples in this diff run
    # the crosscoder always gives a row once a latent fired: its most clearly new fine-tune-only latent, or,
    # said in a note, the most fine-tune-leaning one when none is fine-tune-only (rel_norm < 0.1)
    cc = got["crosscoder"]["detail"]
    assert sum(cc["classes"].values()) == 32 and cc["freq"] > 0
    assert (cc["classes"]["ft_only"] > 0) == ("note" not in cc) == (cc["class"] == "ft_only")
    assert (cc["rel_norm"] < 0.1) == (cc["class"] == "ft_only")
    for row in got.values():
        assert row["seconds"] is not None and row["seconds"] > 0
        assert row["cos_ground_truth"] is None  # no ground truth outside the organism
        if row["steer_scale"] is not None:
            assert len(row["random_em_rates"]) == 2 and row["beats_random"] in (True, False)
            assert abs(row["steer_effect"] - (row["steer_em_rate"] - res["unsteered_em_rate"])) < 1e-9
    names = res["cosines"]["names"]
    m = torch.tensor(res["cosines"]["matrix"])
    assert names == list(got) and torch.allclose(m, m.T) and torch.allclose(m.diag(), torch.ones(len(names)))
    assert "| adl |" in (out / "head2head.md").read_text()
