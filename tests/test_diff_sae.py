"""SAEs on activation differences (fine-tune minus base, the diffing-toolkit's diff-SAE)."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner


def test_difference_latents_on_hand_set_weights():
    from sae_lens import StandardSAE, StandardSAEConfig

    from saediff.methods.diff_sae import difference_latents

    sae = StandardSAE(StandardSAEConfig(d_in=2, d_sae=2))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.W_dec.copy_(torch.eye(2))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    rows = difference_latents(sae, torch.tensor([[1.0, 0.0], [3.0, 2.0]]))
    # codes are the rows; mean activation (2, 1); the mean difference (2, 1) has |.|^2 = 5
    assert [r["latent"] for r in rows] == [0, 1]
    assert [r["mean_act"] for r in rows] == [2.0, 1.0]
    assert [round(r["share_of_mean_diff"], 6) for r in rows] == [0.8, 0.2]
    assert [r["freq"] for r in rows] == [1.0, 0.5]


def test_paired_rows_are_the_same_tokens_in_both_models(tiny_qwen):
    from saediff.activations.streams import paired_source
    from saediff.data.prompts import load_prompts
    from saediff.models.hooks import capture_resid
    from saediff.models.loading import load_pair

    lm_base, lm_ft = load_pair(str(tiny_qwen / "model"), adapter=str(tiny_qwen / "lora"))
    prompts = load_prompts("first_plot")
    pair = paired_source(lm_base, lm_ft, prompts, "blocks.1.hook_resid_post", "last_prompt", "t")
    diff = paired_source(
        lm_base, lm_ft, prompts, "blocks.1.hook_resid_post", "last_prompt", "t", difference=True
    )
    held = prompts[-1:]  # the last tenth of 8 prompts
    ids = lm_base.tokenizer(lm_base.format_chat(held[0].messages), return_tensors="pt")["input_ids"]
    want = [capture_resid(lm.model, [1], ids)[1][0, -1] for lm in (lm_base, lm_ft)]
    assert torch.allclose(pair.held[0, 0], want[0], atol=1e-5) and torch.allclose(
        pair.held[0, 1], want[1], atol=1e-5
    )
    assert torch.allclose(diff.held[0], want[1] - want[0], atol=1e-5)
    assert float((want[1] - want[0]).norm()) > 1e-3  # the adapter moves block 1
    batch = next(diff.stream(4, 8, 0, 0, 1))
    assert batch.shape == (4, 32)


def test_sae_train_on_difference(tiny_qwen, tmp_path):
    from saediff.cli.app import app

    out = tmp_path / "dsae"
    r = CliRunner().invoke(
        app,
        [
            "sae",
            "train",
            "--on-difference",
            "--model",
            str(tiny_qwen / "model"),
            "--adapter",
            str(tiny_qwen / "lora"),
            "--prompts",
            "first_plot",
            "--hook",
            "blocks.1.hook_resid_post",
            "--out",
            str(out),
            "--d-sae",
            "32",
            "--k",
            "4",
            "--steps",
            "40",
            "--batch-size",
            "32",
        ],
    )
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "saediff.json").read_text())
    assert meta["on_difference"] and "minus" in meta["activations"]
    acts = [row["mean_act"] for row in meta["difference_latents"]]
    assert acts == sorted(acts, reverse=True) and acts[0] > 0
    assert json.loads(r.stdout)["fvu"] < 1.0
    r = CliRunner().invoke(
        app,
        [
            "sae",
            "train",
            "--on-difference",
            "--model",
            str(tiny_qwen / "model"),
            "--prompts",
            "first_plot",
            "--hook",
            "blocks.1.hook_resid_post",
            "--out",
            str(tmp_path / "x"),
        ],
    )
    assert r.exit_code == 1 and "--on-difference needs" in r.output
