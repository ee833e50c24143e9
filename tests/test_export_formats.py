"""Directions where they are used at inference: llama.cpp control vectors (GGUF, read back with
gguf's reader) and steering-vectors ``SteeringVector`` objects (applied by that library to a tiny
Qwen2 and checked against saediff's own steering at the same block)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from saediff.cli.app import app
from saediff.methods.directions import Direction


def _dirs() -> list[Direction]:
    g = torch.Generator().manual_seed(0)
    return [
        Direction("a_L1", 3 * torch.randn(32, generator=g), "blocks.1.hook_resid_post", "mean_diff_models"),
        Direction("b_L2", torch.randn(32, generator=g), "blocks.2.hook_resid_post", "sae_latent"),
        Direction("c_L0", torch.randn(32, generator=g), "blocks.0.hook_resid_post", "in_context"),
    ]


def test_gguf_control_vectors_read_back_with_gguf(tmp_path):
    """Each direction becomes direction.L (its own block) as the unit vector, model hint and the
    validated scale in the metadata; block 0 (never steered by llama.cpp) is skipped."""
    import gguf

    from saediff.methods.export import export_gguf, read_gguf_control_vector

    dirs = _dirs()
    files = export_gguf(dirs, tmp_path, "qwen2", scales={"a_L1": 4.0})
    assert set(files) == {"a_L1", "b_L2"}
    for d in dirs[:2]:
        hint, vecs = read_gguf_control_vector(files[d.name])
        L = int(d.hook.split(".")[1])
        assert hint == "qwen2" and list(vecs) == [L]
        np.testing.assert_allclose(vecs[L], d.unit().numpy(), atol=1e-7)
    reader = gguf.GGUFReader(str(files["a_L1"]))
    assert reader.get_field("general.architecture").contents() == "controlvector"
    assert reader.get_field("controlvector.layer_count").contents() == 1
    assert reader.get_field("saediff.validated_scale").contents() == pytest.approx(4.0)
    assert reader.get_field("saediff.hook").contents() == "blocks.1.hook_resid_post"
    assert not list(tmp_path.glob(".*.tmp"))  # temp files renamed or removed
    with pytest.raises(ValueError, match="block 0"):
        export_gguf(dirs[2:], tmp_path / "none", "qwen2")
    (tmp_path / "x.gguf").write_bytes(b"")
    with pytest.raises(Exception):
        read_gguf_control_vector(tmp_path / "x.gguf")


def test_steering_vector_applies_at_the_same_block(tiny_qwen, tmp_path):
    """steering-vectors applies the exported vector at decoder block L exactly where
    saediff.interventions.steering.add_direction does (blocks.L.hook_resid_post): same logits."""
    pytest.importorskip("steering_vectors")  # pip install --no-deps steering-vectors (.ci/run does)
    from steering_vectors import SteeringVector

    from saediff.interventions.steering import add_direction
    from saediff.methods.export import export_steering_vectors, load_steering_vector
    from saediff.models.loading import load_model

    lm = load_model(str(tiny_qwen / "model"))
    d = _dirs()[0]
    path = export_steering_vectors([d], tmp_path)["a_L1"]
    sv = load_steering_vector(path, multiplier=1.0)
    assert (
        isinstance(sv, SteeringVector)
        and sv.layer_type == "decoder_block"
        and list(sv.layer_activations) == [1]
    )
    torch.testing.assert_close(sv.layer_activations[1], d.unit())
    ids = lm.tokenizer("Hello, how can I help you today?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = lm.model(ids).logits
        with sv.apply(lm.model, multiplier=2.5):
            theirs = lm.model(ids).logits
        with add_direction(lm.model, 1, d.unit(), 2.5):
            ours = lm.model(ids).logits
    assert (theirs - plain).abs().max() > 1e-3  # it does something
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(bad))
    with pytest.raises(ValueError, match="not a saediff steering-vector file"):
        load_steering_vector(bad)


def test_export_cli_writes_every_format(tiny_qwen, tmp_path):
    from helpers import make_random_sae

    from saediff.methods.diff_run import run_diff

    make_random_sae(tmp_path / "sae", 32, "blocks.1.hook_resid_post")
    run_diff(
        str(tiny_qwen / "model"),
        None,
        str(tmp_path / "sae"),
        tmp_path / "run",
        adapter=str(tiny_qwen / "lora"),
        prompts="first_plot",
        max_new_tokens=3,
    )
    r = CliRunner().invoke(
        app,
        [
            "export",
            str(tmp_path / "run"),
            "--out",
            str(tmp_path / "exp"),
            "--top",
            "2",
            "--format",
            "saediff,gguf,steering-vectors",
        ],
    )
    assert r.exit_code == 0, r.output
    files = json.loads(r.output.strip().splitlines()[-1])["files"]
    assert len(files["gguf"]) >= 3 and all(
        p.endswith(".gguf") for p in files["gguf"]
    )  # sae_* and the L1 directions
    assert len(files["steering-vectors"]) >= len(files["gguf"])  # block 0 too
    manifest = json.loads((tmp_path / "exp" / "manifest.json").read_text())
    assert manifest["files"] == files
    from saediff.methods.export import read_gguf_control_vector

    assert read_gguf_control_vector(files["gguf"][0])[0] == "qwen2"
    r = CliRunner().invoke(
        app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "e2"), "--format", "onnx"]
    )
    assert r.exit_code == 1 and "--format takes saediff, gguf, steering-vectors, got onnx" in r.output


# ---------------------------------------------------------------- dashboards and the explorer


def test_logit_effects_and_unembedding_exact(tiny_qwen):
    """Logit effects are direction @ W_U on hand-set weights; the model's W_U folds in the final
    RMSNorm weight (lm_head.T scaled per residual dimension)."""
    from saediff.models.loading import load_model
    from saediff.models.logit_lens import logit_effects, unembedding

    class Tok:
        def decode(self, ids):
            return "abcd"[ids[0]]

    W_U = torch.tensor([[1.0, 0.0, -1.0, 2.0], [0.0, 3.0, 0.0, -2.0]])  # (d=2, vocab=4)
    eff = logit_effects(torch.tensor([1.0, 1.0]), W_U, Tok(), k=2)  # logits [1, 3, -1, 0]
    assert eff["promoted"] == [("b", 3.0), ("a", 1.0)] and eff["suppressed"] == [("c", -1.0), ("d", 0.0)]
    lm = load_model(str(tiny_qwen / "model"))
    with torch.no_grad():
        lm.model.model.norm.weight.copy_(torch.linspace(0.5, 2.0, 32))
    expected = lm.model.lm_head.weight.T * torch.linspace(0.5, 2.0, 32)[:, None]
    torch.testing.assert_close(unembedding(lm.model), expected)


def test_dashboard_and_explorer_on_a_tiny_real_model(tiny_qwen, tmp_path):
    """saediff dashboard RUN: one page, a section per carded latent with both models' top
    activations, a histogram, logit effects, neighbours; the explorer steers the base model (the
    answers change with the latent added) and its widget's button fills the answers."""
    from helpers import make_random_sae

    from saediff.methods.diff_run import run_diff
    from saediff.reports.explorer import LatentExplorer

    make_random_sae(tmp_path / "sae", 32, "blocks.1.hook_resid_post")
    run_diff(
        str(tiny_qwen / "model"),
        None,
        str(tmp_path / "sae"),
        tmp_path / "run",
        adapter=str(tiny_qwen / "lora"),
        prompts="first_plot",
        max_new_tokens=4,
        top_n=4,
    )
    r = CliRunner().invoke(app, ["dashboard", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    page = (tmp_path / "run" / "dashboard.html").read_text()
    cards = json.loads((tmp_path / "run" / "cards.json").read_text())["cards"]
    assert len(cards) == 7  # top 4 and bottom 3
    for c in cards:
        assert f"id='latent-{c['latent']}'" in page
    assert page.count("top activations, fine-tuned model") == 7 and page.count("logit effects") == 7
    assert "<script src=" not in page and page.count("Plotly.newPlot") == 7  # self-contained

    ex = LatentExplorer(
        tmp_path / "run",
        n_questions=3,
        max_new_tokens=4,
        labeller=lambda ps: [len(p.response) % 2 == 0 for p in ps],
    )
    assert [row["latent"] for row in ex.table(4)] == json.loads((tmp_path / "run" / "run.json").read_text())[
        "steps"
    ]["diff"]["top_latents"][:4]
    latent = ex.table(1)[0]["latent"]
    res = ex.steer(latent, scale=5.0)
    assert len(res["answers"]) == 3 and res["added_norm"] == pytest.approx(5.0 * ex.resid_norm)
    assert any(a["before"] != a["after"] for a in res["answers"])  # a 5x-norm push changes the answers
    assert res["misaligned_before"] is not None and 0 <= res["misaligned_after"] <= 1
    assert f"id='latent-{latent}'" in ex.card_html(latent)
    pytest.importorskip("ipywidgets")
    ex.widget(n_latents=4)
    ex._widgets["scale"].value = 5.0
    ex._widgets["button"].click()
    assert "steered" in ex._widgets["answers"].value
    with pytest.raises(ValueError, match="out of range"):
        ex.steer(10_000, 1.0)
