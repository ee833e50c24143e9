"""Crosscoders: exact numbers on hand-set weights, recovery of a known split into shared,
fine-tune-only and base-only features, the folder round trip, and the commands on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import dies_after
from typer.testing import CliRunner

from saediff.errors import SaediffError
from saediff.methods.crosscoder import crosscoder_stats
from saediff.saes.crosscoder import (
    Crosscoder,
    CrosscoderConfig,
    _batchtopk,
    crosscoder_metrics,
    decoder_norm_table,
    load_crosscoder,
    save_crosscoder,
    train_crosscoder,
)


def _hand_set(threshold: float = 0.0) -> Crosscoder:
    """Latent 0 reads the base model's first coordinate and writes (1, 0) to both models (shared);
    latent 1 reads the fine-tune's second coordinate and writes (0, 2) to the fine-tune alone."""
    cc = Crosscoder(2, 2)
    with torch.no_grad():
        cc.W_enc.zero_()
        cc.W_enc[0, 0, 0] = 1.0
        cc.W_enc[1, 1, 1] = 1.0
        cc.W_dec.copy_(torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 2.0]]]))
        cc.b_enc.zero_()
        cc.b_dec.zero_()
        cc.threshold.fill_(threshold)
    return cc


X = torch.tensor(
    [[[2.0, 1.0], [2.0, 3.0]], [[1.0, 0.5], [1.0, 1.0]]]
)  # (row, model, d): [0] base, [1] fine-tune


def test_hand_set_codes_reconstructions_norms_and_latent_scaling():
    cc = _hand_set()
    z = cc.encode(X)
    assert torch.equal(z, torch.tensor([[2.0, 3.0], [1.0, 1.0]]))
    assert torch.equal(cc.decode(z), torch.tensor([[[2.0, 0.0], [2.0, 6.0]], [[1.0, 0.0], [1.0, 2.0]]]))
    # scores are activation x (|d_base| + |d_ft|) = 2 for both latents: 4, 6 | 2, 2
    assert torch.equal(_hand_set(threshold=2.5).encode(X), torch.tensor([[2.0, 3.0], [0.0, 0.0]]))
    kept, kept_min = _batchtopk(
        cc.pre_acts(X), cc.dec_norms().sum(1), k=1
    )  # the top 1 x 2 scores of the batch
    assert torch.equal(kept, torch.tensor([[2.0, 3.0], [0.0, 0.0]])) and float(kept_min) == 4.0
    tab = decoder_norm_table(cc)
    assert tab["rel_norm"].tolist() == [0.5, 0.0] and tab["class"] == ["shared", "ft_only"]
    assert tab["cosine"].tolist() == pytest.approx([1.0, 0.0])
    st = crosscoder_stats(cc, [X])
    # latent 1, d = (0, 2): sum z^2 |d|^2 = (9 + 1) 4 = 40. Reconstructions (the paper's r target): base (2, 0),
    # (1, 0) give 0, the fine-tune's (2, 6), (1, 2) give 3*12 + 1*4 = 40; activations (the act column) give base
    # 3*2 + 1*1 = 7, fine-tune 20; errors (base (0, 1), (0, .5); fine-tune (0, -3), (0, -1)) plus z W_dec[1, m]:
    # base 7, fine-tune 3*6 + 1*2 = 20
    assert st.beta["r_base"].tolist() == pytest.approx([1.0, 0.0])
    assert st.beta["r_ft"].tolist() == pytest.approx([1.0, 1.0])
    assert st.beta["act_base"].tolist() == pytest.approx([1.0, 0.175])
    assert st.beta["act_ft"].tolist() == pytest.approx([1.0, 0.5])
    assert st.beta["eps_base"].tolist() == pytest.approx([1.0, 0.175])
    assert st.beta["eps_ft"].tolist() == pytest.approx([1.0, 0.5])
    assert st.nu_r.tolist() == pytest.approx([1.0, 0.0]) and st.nu_eps.tolist() == pytest.approx([1.0, 0.35])
    assert st.freq.tolist() == [1.0, 1.0] and st.mean.tolist() == [1.5, 2.0]
    assert st.top_rows[:, 0].tolist() == [0, 0]


def _known_split(n: int, seed: int = 1):
    """Paired rows from 48 sparse features: 32 shared (the same direction in both models), 8 in the
    fine-tune only, 8 in the base only."""
    g = torch.Generator().manual_seed(seed)
    F, D = 48, 16
    dirs = torch.randn(F, 1, D, generator=g).repeat(1, 2, 1)
    dirs /= dirs.norm(dim=2, keepdim=True)
    dirs[32:40, 0] = 0.0
    dirs[40:48, 1] = 0.0
    act = (torch.rand(n, F, generator=g) < 0.05).float() * (1 + torch.rand(n, F, generator=g))
    X = torch.einsum("nf,fmd->nmd", act, dirs) + 0.01 * torch.randn(n, 2, D, generator=g)
    return X, dirs, ["shared"] * 32 + ["ft_only"] * 8 + ["base_only"] * 8


def test_a_known_split_is_recovered():
    X, dirs, kinds = _known_split(16000)
    cfg = CrosscoderConfig(d_sae=96, k=3, k_start=24, anneal_steps=100, steps=800, batch_size=256, lr=1e-2)
    cc, hist = train_crosscoder(X[:14000], cfg, progress=False)
    assert hist["k"][0] == 24 and hist["k"][-1] == 3
    m = crosscoder_metrics(cc, X[14000:])
    assert m["fvu"] < 0.15 and 2.0 < m["l0"] < 4.5, m
    st = crosscoder_stats(cc, [X[14000:]])
    tab = decoder_norm_table(cc, (st.freq * st.n).round().long())
    gt = dirs.reshape(48, -1) / dirs.reshape(48, -1).norm(dim=1, keepdim=True)
    lat = cc.W_dec.detach().reshape(96, -1)
    best = (gt @ (lat / lat.norm(dim=1, keepdim=True).clamp_min(1e-9)).T).max(1)
    assert float(best.values.mean()) > 0.9
    right = sum(tab["class"][j] == k for j, k in zip(best.indices.tolist(), kinds))
    assert right >= 44, f"{right}/48 features land in their class"
    # a fine-tune-only feature is absent from the base model's activations: latent scaling says so
    ft_latents = [j for j, k in zip(best.indices.tolist(), kinds) if k == "ft_only"]
    assert float(st.nu_r[ft_latents].abs().max()) < 0.2 and float(st.nu_eps[ft_latents].abs().max()) < 0.2


def test_folder_round_trip_and_bad_folders(tmp_path):
    cc = _hand_set(threshold=1.5)
    with torch.no_grad():
        cc.norm_scale.copy_(torch.tensor([0.5, 2.0]))
    save_crosscoder(cc, tmp_path / "cc")
    back = load_crosscoder(tmp_path / "cc")
    assert torch.equal(back.encode(X), cc.encode(X)) and back.norm_scale.tolist() == [0.5, 2.0]
    assert json.loads((tmp_path / "cc" / "cfg.json").read_text())["kind"] == "saediff.crosscoder"
    save_crosscoder(cc, tmp_path / "cc")  # a crosscoder folder is replaced
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("mine")
    with pytest.raises(SaediffError, match="not a crosscoder folder"):
        save_crosscoder(cc, tmp_path / "data")
    with pytest.raises(SaediffError, match="not a crosscoder folder"):
        load_crosscoder(tmp_path / "data")
    cfg = json.loads((tmp_path / "cc" / "cfg.json").read_text())
    (tmp_path / "cc" / "cfg.json").write_text(json.dumps({**cfg, "d_in": 3}))
    with pytest.raises(SaediffError, match="W_enc is \\(2, 2, 2\\), cfg.json says \\(2, 3, 2\\)"):
        load_crosscoder(tmp_path / "cc")


def test_crosscoder_commands_on_a_tiny_model(tiny_qwen, tmp_path):
    from saediff.cli.app import app

    model, lora, cc_dir, run = tiny_qwen / "model", tiny_qwen / "lora", tmp_path / "cc", tmp_path / "run"
    common = ["--base", str(model), "--adapter", str(lora), "--prompts", "first_plot", "--positions", "all"]
    r = CliRunner().invoke(
        app,
        [
            "crosscoder",
            "train",
            *common,
            "--hook",
            "blocks.1.hook_resid_post",
            "--out",
            str(cc_dir),
            "--d-sae",
            "64",
            "--k",
            "4",
            "--steps",
            "30",
            "--batch-size",
            "64",
        ],
    )
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert 0 <= res["fvu"] < 1.5 and sum(res["classes"].values()) == 64
    cfg = json.loads((cc_dir / "cfg.json").read_text())
    assert cfg["hook_name"] == "blocks.1.hook_resid_post" and cfg["provenance"]["finetuned"]["adapter"]
    r = CliRunner().invoke(app, ["crosscoder", "diff", str(cc_dir), *common, "--out", str(run), "--top", "3"])
    assert r.exit_code == 0, r.output
    table = json.loads((run / "crosscoder_diff.json").read_text())
    assert len(table["latents"]) == 64 and table["summary"]["rows"] > 0
    cards = json.loads((run / "cards.json").read_text())["cards"]
    assert [c["latent"] for c in cards] == table["summary"]["ft_only_ranked"]
    for c in cards:
        assert c["class"] == "ft_only" and c["top"] and "[" in c["top"][0]["context"]
    if cards:
        from saediff.methods.export import load_directions

        dirs = load_directions(run / "directions")
        assert sorted(dirs) == sorted(f"cc_{c['latent']}" for c in cards)
    before = (run / "crosscoder_diff.json").stat().st_mtime_ns
    r = CliRunner().invoke(app, ["crosscoder", "diff", str(cc_dir), *common, "--out", str(run), "--top", "3"])
    assert r.exit_code == 0 and (run / "crosscoder_diff.json").stat().st_mtime_ns == before  # reused
    r = CliRunner().invoke(
        app,
        [
            "crosscoder",
            "train",
            "--base",
            str(model),
            "--prompts",
            "first_plot",
            "--hook",
            "blocks.1.hook_resid_post",
            "--out",
            str(tmp_path / "x"),
        ],
    )
    assert r.exit_code == 1 and r.output.strip().splitlines()[-1] == "error: give --finetuned or --adapter"


def test_a_fine_tune_only_latent_gets_a_card_and_a_dashboard_entry(tiny_qwen, tmp_path):
    """A hand-set crosscoder whose latent 0 reads the fine-tune minus the base along the adapter's
    B vector and writes it to the fine-tune alone: the diff classes it fine-tune-only, ranks it,
    cards it with contexts, exports its decoder row, and the dashboard shows it."""
    from saediff.cli.app import app
    from saediff.methods.directions import lora_b_directions
    from saediff.methods.export import load_directions
    from saediff.models.lora import read_adapter

    b = next(
        d
        for d in lora_b_directions(read_adapter(str(tiny_qwen / "lora")))
        if d.hook == "blocks.1.hook_resid_post"
    )
    u = b.unit()
    cc = Crosscoder(32, 4, k=2, hook_name="blocks.1.hook_resid_post")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cc.W_enc.zero_()
        cc.W_enc[0, :, 0], cc.W_enc[1, :, 0] = -u, u  # latent 0: <x_ft - x_base, u>
        shared = torch.randn(3, 32, generator=g)
        cc.W_enc[0, :, 1:] = shared.T
        cc.W_dec.zero_()
        cc.W_dec[0, 1] = u
        cc.W_dec[1:, 0] = shared
        cc.W_dec[1:, 1] = shared
        cc.b_enc.zero_()
        cc.b_dec.zero_()
    save_crosscoder(cc, tmp_path / "cc")
    run = tmp_path / "run"
    r = CliRunner().invoke(
        app,
        [
            "crosscoder",
            "diff",
            str(tmp_path / "cc"),
            "--base",
            str(tiny_qwen / "model"),
            "--adapter",
            str(tiny_qwen / "lora"),
            "--prompts",
            "first_plot",
            "--positions",
            "all",
            "--out",
            str(run),
            "--top",
            "2",
        ],
    )
    assert r.exit_code == 0, r.output
    table = json.loads((run / "crosscoder_diff.json").read_text())
    assert table["latents"][0]["class"] == "ft_only" and table["latents"][0]["rel_norm"] == 0.0
    assert table["summary"]["ft_only_ranked"] == [0]
    card = json.loads((run / "cards.json").read_text())["cards"][0]
    assert card["latent"] == 0 and card["top"] and card["top"][0]["value"] > 0
    torch.testing.assert_close(load_directions(run / "directions")["cc_0"].vector, u)
    r = CliRunner().invoke(app, ["dashboard", str(run)])
    assert r.exit_code == 0, r.output
    page = (run / "dashboard.html").read_text()
    assert "id='latent-0'" in page and "ft_only: rel_norm 0.000" in page and "logit effects" in page


def test_crosscoder_training_resumes_from_a_checkpoint(tmp_path, caplog):
    """Interrupted after its step-10 checkpoint and resumed, crosscoder training ends with the
    crosscoder of an uninterrupted run (k annealing, threshold and dead clocks included); another
    run's checkpoint is refused in one line."""
    from dataclasses import replace

    from saediff.activations.store import shuffled_batches

    data = torch.randn(4096, 2, 16, generator=torch.Generator().manual_seed(0))
    cfg = CrosscoderConfig(d_sae=32, k=4, k_start=12, anneal_steps=12, steps=25, batch_size=128, lr=1e-3)
    ref, _ = train_crosscoder(shuffled_batches(data, 128, seed=1), cfg, progress=False)
    kw = dict(progress=False, checkpoint_dir=tmp_path, checkpoint_every=10)
    with pytest.raises(KeyboardInterrupt):
        train_crosscoder(dies_after(shuffled_batches(data, 128, seed=1), 15), cfg, **kw)
    assert (tmp_path / "train_state.pt").exists()
    with caplog.at_level("INFO", logger="saediff.saes.crosscoder"):
        got, hist = train_crosscoder(shuffled_batches(data, 128, seed=1), cfg, resume=True, **kw)
    assert "resumed at step 10" in caplog.text
    for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), atol=1e-6, rtol=1e-5)
    assert len(hist["loss"]) == 4  # steps 0, 10, 20 and the last, across the interruption
    with pytest.raises(SaediffError, match="checkpoint of another crosscoder training run"):
        train_crosscoder(shuffled_batches(data, 128, seed=1), replace(cfg, lr=2e-3), resume=True, **kw)
