"""Model diffing statistics, cosines and exports on hand-set tensors (exact numbers)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from saediff.cli.app import app
from saediff.methods.directions import (
    Direction,
    cosine_table,
    mean_diff,
    principal_angle_cosines,
    random_cosine_baseline,
    random_like,
    sae_latent_direction,
    span_overlap,
)
from saediff.methods.export import export_directions, load_directions
from saediff.methods.sae_diff import LatentDiff, diff_latents


@pytest.fixture
def identity_sae():
    """A 2-latent ReLU SAE with identity weights: z = relu(x)."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = StandardSAE(
        StandardSAEConfig(d_in=2, d_sae=2, metadata=SAEMetadata(hook_name="blocks.0.hook_resid_post"))
    )
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.W_dec.copy_(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_diff_statistics_exact(identity_sae):
    base = torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.0, 0.0], [0.0, 2.0]])  # z = relu(x)
    ft = torch.tensor([[2.0, 0.0], [4.0, 0.0], [6.0, 1.0], [0.0, -1.0]])
    d = diff_latents(identity_sae, base, ft)
    # latent 0: base mean 1, ft mean 3, delta +2; latent 1: base 1, ft .25, delta -.75
    assert d.mean_base.tolist() == [1.0, 1.0] and d.mean_ft.tolist() == [3.0, 0.25]
    assert d.delta.tolist() == [2.0, -0.75]
    assert d.freq_base.tolist() == [0.5, 0.5] and d.freq_ft.tolist() == [0.75, 0.25]
    # Cohen's d with population variances: latent 0 var_base 1.5, var_ft 5 -> pooled sqrt(3.25)
    assert d.effect_size[0].item() == pytest.approx(2 / math.sqrt(3.25), rel=1e-5)
    assert d.top(1) == [0] and d.bottom(1) == [1] and d.top(2, by="abs_delta") == [0, 1]
    assert d.top(1, by="freq_delta") == [0]
    back = LatentDiff.from_json(json.loads(json.dumps(d.to_json())))
    torch.testing.assert_close(back.delta, d.delta)
    assert list(d.to_pandas().index) == [0, 1]


def test_diff_rejects_width_mismatch(identity_sae):
    with pytest.raises(ValueError, match=r"base activations have shape \(3, 5\), the SAE expects \(n, 2\)"):
        diff_latents(identity_sae, torch.zeros(3, 5), torch.zeros(3, 2))


def test_cosines_exact(identity_sae):
    a = sae_latent_direction(identity_sae, 0)  # (3, 4)
    b = Direction("b", torch.tensor([4.0, 3.0]), "blocks.0.hook_resid_post", "ground_truth")
    c = mean_diff(
        torch.tensor([[1.0, 0.0], [3.0, 0.0]]),
        torch.tensor([[0.0, 0.0]]),
        "blocks.0.hook_resid_post",
        "mean_diff_models",
        "c",
    )  # (2, 0)
    t = cosine_table([a, b, c])
    assert t.get("sae_0", "b") == pytest.approx(24 / 25)
    assert t.get("sae_0", "c") == pytest.approx(3 / 5)
    assert t.get("b", "c") == pytest.approx(4 / 5)
    assert a.norm == pytest.approx(5.0) and c.vector.tolist() == [2.0, 0.0]
    with pytest.raises(ValueError, match="different hooks"):
        cosine_table([a, Direction("x", torch.ones(2), "blocks.1.hook_resid_post", "random")])


def test_random_baseline_and_principal_angles():
    base = random_cosine_baseline(64)
    assert base["mean_abs"] == pytest.approx(base["expected_mean_abs"], rel=0.05)
    A = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    B = torch.tensor([[0, 1.0, 0], [0, 0, 1.0]])
    torch.testing.assert_close(principal_angle_cosines(A, B), torch.tensor([1.0, 0.0]))
    d = Direction("d", torch.tensor([3.0, 4.0]), "h", "ground_truth")
    assert random_like(d).norm == pytest.approx(5.0)


def test_span_overlap_exact():
    h = "blocks.0.hook_resid_post"
    e1, e2 = (Direction(f"sae_{i}", v, h, "sae_latent") for i, v in enumerate(torch.eye(3)[:2] * 2))
    diag = Direction("diag", torch.tensor([1.0, 1.0, 1.0]), h, "ground_truth")
    e3 = Direction("e3", torch.tensor([0.0, 0.0, 5.0]), h, "mean_diff_models")
    o = span_overlap([e1, e2], [diag, e3])
    assert o["span"] == ["sae_0", "sae_1"]
    assert o["per_direction"]["diag"] == pytest.approx(math.sqrt(2 / 3), abs=1e-6)  # |(1,1,0)| / |(1,1,1)|
    assert o["per_direction"]["e3"] == pytest.approx(0.0, abs=1e-6)
    assert o["principal_cosines"] == pytest.approx(
        [1.0, 0.0], abs=1e-6
    )  # span{diag, e3} holds (1,1,0) and e3
    assert o["random_rms"] == pytest.approx(math.sqrt(2 / 3))
    with pytest.raises(ValueError, match="different widths"):
        span_overlap([e1], [Direction("x", torch.ones(2), h, "random")])


def test_export_round_trip(tmp_path, identity_sae):
    ds = [
        sae_latent_direction(identity_sae, 0),
        Direction("gt", torch.tensor([0.0, 2.0]), "blocks.0.hook_resid_post", "ground_truth"),
    ]
    export_directions(ds, tmp_path / "exp", model="m", per_direction={"sae_0": {"validated_scale": 4.0}})
    back = load_directions(tmp_path / "exp")
    torch.testing.assert_close(back["gt"].vector, torch.tensor([0.0, 2.0]))
    manifest = json.loads((tmp_path / "exp" / "manifest.json").read_text())
    entry = next(e for e in manifest["directions"] if e["name"] == "sae_0")
    assert (
        entry["norm"] == pytest.approx(5.0)
        and entry["validated_scale"] == 4.0
        and entry["hook"] == "blocks.0.hook_resid_post"
    )
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "exp" / "directions.safetensors"))[
        "sae_0.unit"
    ].tolist() == pytest.approx([0.6, 0.8])
    with pytest.raises(ValueError, match="duplicate names"):
        export_directions([ds[0], ds[0]], tmp_path / "dup")


def test_diff_compare_export_cli_on_tiny_organism(tiny_organism, tmp_path):
    """The commands run end to end (numbers on a random model mean nothing; shapes and files do)."""
    from saediff.activations.collect import collect_activations
    from saediff.models.loading import load_model
    from saediff.saes.loading import save_sae
    from saediff.saes.training import SAETrainConfig, train_sae
    from saediff.stories.organism.prompts import organism_prompts
    from saediff.stories.organism.recipes import read_organism_world

    lm = load_model(str(tiny_organism / "aligned"))
    world = read_organism_world(tiny_organism / "aligned")
    acts = collect_activations(
        lm, organism_prompts(world, 200), ["blocks.1.hook_resid_post"], "response", progress=False
    )["blocks.1.hook_resid_post"]
    sae, _ = train_sae(
        acts,
        SAETrainConfig(d_sae=32, k=4, steps=30, batch_size=128),
        hook_name="blocks.1.hook_resid_post",
        progress=False,
    )
    save_sae(sae, tmp_path / "sae")
    run = CliRunner()
    r = run.invoke(
        app,
        [
            "diff",
            "--base",
            str(tiny_organism / "aligned"),
            "--adapter",
            str(tiny_organism / "lora"),
            "--sae",
            str(tmp_path / "sae"),
            "--prompts",
            "organism:5",
            "--top",
            "4",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert len(summary["top_latents"]) == 4 and summary["n_prompts"] == 30
    r = run.invoke(app, ["compare", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    cos = json.loads((tmp_path / "run" / "cosines.json").read_text())
    assert {"lora_b_L1", "in_context_L1"} <= set(cos["names"]) and cos["matrix"][0][0] == pytest.approx(1.0)
    span = cos["span_of_top_latents"]
    assert span["span"] == [f"sae_{i}" for i in summary["top_latents"]]
    assert not any(n.startswith("sae_") for n in span["per_direction"])
    for name, c in span["per_direction"].items():  # a span holds at least as much as its best single latent
        best = max(abs(cos["matrix"][cos["names"].index(name)][cos["names"].index(s)]) for s in span["span"])
        assert best - 1e-5 <= c <= 1 + 1e-6
    layers = json.loads((tmp_path / "run" / "layers.json").read_text())
    assert layers["layers"] == [0, 1]
    assert (tmp_path / "run" / "cosines.html").exists()
    r = run.invoke(app, ["export", str(tmp_path / "run"), "--top", "2", "--out", str(tmp_path / "exp")])
    assert r.exit_code == 0, r.output
    names = json.loads(r.stdout)["directions"]
    assert sum(n.startswith("sae_") for n in names) == 2 and "lora_b_L1" in names
    assert {"lora_downstream_L0", "lora_downstream_L1"} <= set(
        names
    )  # base + adapter: induced change per layer
    bad = run.invoke(
        app,
        [
            "diff",
            "--base",
            str(tiny_organism / "aligned"),
            "--finetuned",
            str(tiny_organism / "aligned"),
            "--sae",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "r2"),
        ],
    )
    assert bad.exit_code == 1 and "no such folder" in bad.output


def test_latent_card_exact(identity_sae):
    from saediff.methods.sae_diff import latent_card

    base = torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.0, 0.0]])
    ft = torch.tensor([[2.0, 0.0], [4.0, 0.0], [6.0, 1.0]])
    rows = [
        {"prompt": "a", "position": 0, "token": "x"},
        {"prompt": "a", "position": 1, "token": "y"},
        {"prompt": "b", "position": 0, "token": "z"},
    ]
    card = latent_card(identity_sae, 0, base, ft, rows, k=2, bins=3)
    assert [r["token"] for r in card.top_base] == ["y", "x"] and [r["value"] for r in card.top_base] == [
        3.0,
        1.0,
    ]
    assert [r["token"] for r in card.top_ft] == ["z", "y"]
    assert card.hist_edges == [0.0, 2.0, 4.0, 6.0]
    assert sum(card.hist_base) == 3 and sum(card.hist_ft) == 3  # rows where either model is active
    # decoder rows (3, 4) and (0, 1): cos = 4/5
    assert card.neighbours == [(1, pytest.approx(0.8))]


def test_streamed_diff_equals_the_in_memory_one(identity_sae):
    """``DiffAccumulator`` fed in uneven batches gives ``diff_latents``'s statistics and
    ``latent_card``'s top rows; its histogram counts the same rows on fixed log edges."""
    from saediff.methods.sae_diff import DiffAccumulator, latent_card

    g = torch.Generator().manual_seed(0)
    base, ft = torch.randn(37, 2, generator=g) * 3, torch.randn(37, 2, generator=g) * 3 + 1
    acc = DiffAccumulator(identity_sae, k=4)
    for lo, hi in ((0, 5), (5, 6), (6, 30), (30, 37)):
        acc.update(base[lo:hi], ft[lo:hi])
    ref, got = diff_latents(identity_sae, base, ft), acc.result()
    for name in ("mean_base", "mean_ft", "freq_base", "freq_ft", "effect_size"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), atol=1e-6, rtol=1e-5)
    assert got.n_base == got.n_ft == 37
    rows = [{"token": f"t{i}"} for i in range(37)]
    for latent in (0, 1):
        want = latent_card(identity_sae, latent, base, ft, rows, k=4)
        card = acc.card(latent, describe=lambda ids: [rows[i] for i in ids])
        assert [r["row"] for r in card.top_base] == [r["row"] for r in want.top_base]
        assert [r["token"] for r in card.top_ft] == [r["token"] for r in want.top_ft]
        assert sum(card.hist_base) == sum(want.hist_base) and sum(card.hist_ft) == sum(want.hist_ft)
        assert card.neighbours == want.neighbours
    with pytest.raises(ValueError, match="the SAE expects two equal"):
        acc.update(base[:3], ft[:2])
    # one batch encoded 4 rows at a time: the same statistics, top rows and histogram
    small = DiffAccumulator(identity_sae, k=4, chunk=4)
    small.update(base, ft)
    for name in ("mean_base", "mean_ft", "freq_base", "freq_ft", "effect_size"):
        torch.testing.assert_close(getattr(small.result(), name), getattr(ref, name), atol=1e-6, rtol=1e-5)
    for latent in (0, 1):
        a, b = small.card(latent), acc.card(latent)
        assert [r["row"] for r in a.top_base] == [r["row"] for r in b.top_base] and a.hist_ft == b.hist_ft


def test_response_mean_difference_within_groups_hand_set():
    """Misaligned - aligned answers within each prompt group with both kinds, averaged over groups:
    a group of misaligned answers only (the fine-tune's own domain) stays out."""
    from saediff.methods.diff_stream import StreamedDiff

    sums = {
        "base": torch.zeros(1, 2, dtype=torch.float64),
        "ft": torch.zeros(1, 2, dtype=torch.float64),
        "mis": torch.tensor([[[4.0, 0.0]], [[3.0, 3.0]], [[9.0, 9.0]]], dtype=torch.float64),
        "ali": torch.tensor([[[0.0, 2.0]], [[2.0, 0.0]], [[0.0, 0.0]]], dtype=torch.float64),
    }
    counts = {
        "base": torch.tensor(1),
        "ft": torch.tensor(1),
        "mis": torch.tensor([2, 3, 1]),
        "ali": torch.tensor([1, 2, 0]),
    }
    got = {
        d.name: d
        for d in StreamedDiff(
            None, ["blocks.0.hook_resid_post"], sums, counts, ["a", "b", "medical"]
        ).mean_diffs("mean_diff_models")
    }
    rd = got["mean_diff_responses_L0"]
    # a: (2, 0) - (0, 2) = (2, -2); b: (1, 1) - (1, 0) = (0, 1); mean (1, -0.5); pooled would be (2.67, 2) - (0.67, 0.67)
    assert rd.vector.tolist() == [1.0, -0.5]
    assert rd.provenance == {"n_pos": 5, "n_neg": 3, "model": "finetuned", "groups": ["a", "b"]}
