"""SAE training, SAELens round trip, metrics, the correct-gradient splice, and bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import dies_after

from saediff.errors import SaediffError
from saediff.saes.loading import load_sae, save_sae
from saediff.saes.metrics import ce_loss_recovered, sae_metrics
from saediff.saes.training import SAETrainConfig, train_sae
from saediff.saes.training_step import SAEParams, topk_step_loss


def sparse_data(n=6000, d=16, s=48, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(s, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    idx = torch.randint(0, s, (n, k), generator=g)
    return torch.nn.functional.embedding_bag(
        idx, D, per_sample_weights=torch.rand(n, k, generator=g) + 0.5, mode="sum"
    )


@pytest.fixture(scope="module")
def data():
    return sparse_data()


@pytest.mark.parametrize(
    "arch,expected_cls", [("topk", "TopKSAE"), ("relu", "StandardSAE"), ("batchtopk", "JumpReLUSAE")]
)
def test_train_save_load_identical(arch, expected_cls, data, tmp_path):
    from sae_lens import SAE

    cfg = SAETrainConfig(arch=arch, d_sae=64, k=4, steps=400, batch_size=256, lr=5e-3, l1_coefficient=0.05)
    sae, hist = train_sae(data, cfg, hook_name="blocks.0.hook_resid_post", model_name="tiny", progress=False)
    assert type(sae).__name__ == expected_cls
    assert hist["fvu"][-1] < hist["fvu"][0]
    m = sae_metrics(sae, data)
    assert m.fvu < 0.35
    if arch == "topk":
        assert m.l0 <= 4.0 + 1e-6
    save_sae(sae, tmp_path / "sae", {"metrics": m.to_json()})
    loaded = SAE.load_from_disk(str(tmp_path / "sae"))  # SAELens reads saediff's folder
    assert loaded.cfg.metadata.hook_name == "blocks.0.hook_resid_post"
    x = data[:100]
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), sae.decode(sae.encode(x)))
    assert json.loads((tmp_path / "sae" / "saediff.json").read_text())["kind"] == "saediff.sae"


def test_topk_sae_learns_sparse_dictionary(data):
    cfg = SAETrainConfig(
        arch="topk", d_sae=64, k=4, steps=800, batch_size=256, lr=5e-3, dead_tokens=5000, aux_coefficient=0.25
    )
    sae, _ = train_sae(data, cfg, progress=False)
    m = sae_metrics(sae, data)
    assert m.fvu < 0.1 and m.dead_fraction <= 0.25


@pytest.mark.parametrize("kernel", ["sparse_decode", "sparse"])
def test_sparse_kernels_match_the_dense_reference(kernel):
    """Loss and every gradient of the sparse paths (embedding_bag decode; and the encoder's
    backward at the selected latents only, with AuxK on dead latents) equal the dense reference's."""

    g = torch.Generator().manual_seed(1)
    p = SAEParams(8, 32)
    p.init_from(torch.randn(64, 8, generator=g), g)
    with torch.no_grad():
        p.b_enc.copy_(0.1 * torch.randn(32, generator=g))
    x = torch.randn(300, 8, generator=g)  # more rows than the backward's chunk of 256
    dead = torch.zeros(32, dtype=torch.bool)
    dead[::3] = True
    outs = []
    for k in ("dense", kernel):
        p.zero_grad()
        out = topk_step_loss(p, x, 4, 2.0, dead, 6, 0.1, k)
        out.loss.backward()
        outs.append(
            (out.loss.detach(), out.aux.detach(), [q.grad.clone() for q in p.parameters()], out.fired_S)
        )
    torch.testing.assert_close(outs[0][0], outs[1][0])
    assert outs[0][1] > 0 and torch.equal(outs[0][3], outs[1][3])
    torch.testing.assert_close(outs[0][1], outs[1][1])
    for a, b in zip(outs[0][2], outs[1][2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_auto_kernel_is_recorded():
    from saediff.saes.training import SAETrainConfig, train_sae

    data = torch.randn(512, 8, generator=torch.Generator().manual_seed(0))
    _, hist = train_sae(
        data,
        SAETrainConfig(d_sae=32, k=4, steps=3, batch_size=64, device="cpu", kernel="auto"),
        progress=False,
    )
    assert hist["kernel"] in ("dense", "sparse_decode", "sparse", "fused")


def test_metrics_exact_on_hand_set_sae():
    from sae_lens import StandardSAE, StandardSAEConfig

    sae = StandardSAE(StandardSAEConfig(d_in=2, d_sae=2))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.W_dec.copy_(torch.eye(2))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0], [0.0, 0.0]])
    m = sae_metrics(sae, x)
    # x_hat = relu(x): only row 3 errs (by 1); mean (0, .5): SST = 1.25 + 2.25 + 1.25 + .25 = 5
    assert m.fvu == pytest.approx(1.0 / 5.0)
    assert m.l0 == pytest.approx(0.5)
    assert m.dead_fraction == 0.0


def test_splice_gradient_is_correct(tiny_organism):
    """Gradients through the spliced SAE equal autograd through an explicit reconstruction."""
    from saediff.models.hooks import add_resid_hook
    from saediff.models.loading import load_model

    lm = load_model(str(tiny_organism / "aligned"))
    sae, _ = train_sae(
        sparse_data(d=32, n=2000), SAETrainConfig(d_sae=64, k=4, steps=20, batch_size=256), progress=False
    )
    ids = lm.tokenizer(" CHAT USER medicalQa medicalQb ASST", return_tensors="pt")["input_ids"]
    emb = lm.model.get_input_embeddings()
    x = emb(ids).detach().requires_grad_(True)
    with add_resid_hook(lm.model, 0, lambda r: sae.decode(sae.encode(r))):
        lm.model(inputs_embeds=x).logits.sum().backward()
    g_splice = x.grad.clone()
    x.grad = None
    # the same computation with SAELens's error-term forward (no_grad error) differs
    sae.use_error_term = True
    with add_resid_hook(lm.model, 0, lambda r: sae(r)):
        lm.model(inputs_embeds=x).logits.sum().backward()
    sae.use_error_term = False
    assert not torch.allclose(g_splice, x.grad)
    res = ce_loss_recovered(lm.model, sae, 0, ids)
    assert res["ce_clean"] <= res["ce_zero"] or res["ce_clean"] > 0


def test_bad_inputs(tmp_path, data):
    sae, _ = train_sae(data, SAETrainConfig(d_sae=32, k=4, steps=5, batch_size=256), progress=False)
    with pytest.raises(ValueError, match="SAE d_in 16 does not match activations of width 8"):
        sae_metrics(sae, torch.zeros(10, 8))
    with pytest.raises(ValueError, match="k=40 must lie in"):
        SAETrainConfig(d_sae=32, k=40)
    with pytest.raises(ValueError, match="need \\(n >= batch_size"):
        train_sae(torch.zeros(10, 4), SAETrainConfig(batch_size=64), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="lacks cfg.json"):
        load_sae(tmp_path / "empty")
    with pytest.raises(SaediffError, match="cannot load SAELens release"):
        load_sae("qwen2.5-7b-instruct-andyrdt", sae_id="resid_post_layer_15_trainer_1")


def test_registry_entries_are_known_to_saelens():
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    from saediff.saes.registry import preset, registry

    known = get_pretrained_saes_directory()
    for entry in registry()["pretrained"]:
        release = known[entry["release"]]
        for s in entry["saes"]:
            assert s["sae_id"] in release.saes_map, (entry["release"], s["sae_id"])
    SAETrainConfig(**preset("organism"))


def test_sae_training_resumes_from_a_checkpoint(tmp_path, caplog):
    """Interrupted after its step-10 checkpoint and resumed, SAE training ends with the weights of
    an uninterrupted run on the same batch order."""
    from saediff.activations.store import shuffled_batches
    from saediff.saes.training import SAETrainConfig, train_sae

    data = torch.randn(4096, 16, generator=torch.Generator().manual_seed(0))
    cfg = SAETrainConfig(arch="topk", d_sae=32, k=4, steps=25, batch_size=128, lr=1e-3, dead_tokens=500)
    ref, _ = train_sae(shuffled_batches(data, 128, seed=1), cfg, progress=False)

    with pytest.raises(KeyboardInterrupt):
        train_sae(
            dies_after(shuffled_batches(data, 128, seed=1), 15),
            cfg,
            progress=False,
            checkpoint_dir=tmp_path,
            checkpoint_every=10,
        )
    assert (tmp_path / "train_state.pt").exists()
    with caplog.at_level("INFO", logger="saediff.saes.training"):
        got, hist = train_sae(
            shuffled_batches(data, 128, seed=1),
            cfg,
            progress=False,
            checkpoint_dir=tmp_path,
            checkpoint_every=10,
            resume=True,
        )
    assert "resumed at step 10" in caplog.text
    torch.testing.assert_close(got.W_dec, ref.W_dec, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.W_enc, ref.W_enc, atol=1e-6, rtol=1e-5)
    assert len(hist["loss"]) == 4  # steps 0, 10, 20 and the last, across the interruption
    # the checkpoint belongs to that run: other settings or other data are refused, not continued
    from dataclasses import replace

    with pytest.raises(
        SaediffError, match=r"checkpoint of another SAE training run \(settings\.lr: 0\.001 \(saved\)"
    ):
        train_sae(
            shuffled_batches(data, 128, seed=1),
            replace(cfg, lr=2e-3),
            progress=False,
            checkpoint_dir=tmp_path,
            checkpoint_every=10,
            resume=True,
        )
    with pytest.raises(SaediffError, match=r"\(first_batch: "):
        train_sae(
            shuffled_batches(data * 2, 128, seed=1),
            cfg,
            progress=False,
            checkpoint_dir=tmp_path,
            checkpoint_every=10,
            resume=True,
        )


_DDP_SCRIPT = """
import sys, torch, torch.distributed as td
from saediff.saes.training import SAETrainConfig, train_sae
td.init_process_group("gloo"); rank, world = td.get_rank(), td.get_world_size()
torch.set_num_threads(1)
data = torch.randn(24 * 64, 16, generator=torch.Generator().manual_seed(0))
batches = [data[i : i + 64] for i in range(0, data.shape[0], 64)]  # 24 batches of 64
mine = iter(batches[rank::world])  # rank r: batches r, r + world, ...
cfg = SAETrainConfig(arch="topk", d_sae=32, k=4, steps=12, batch_size=64, lr=1e-3, dead_tokens=256, device="cpu")
sae, _ = train_sae(mine, cfg, progress=False)
if rank == 0:
    torch.save({"W_enc": sae.W_enc.detach(), "W_dec": sae.W_dec.detach(), "b_dec": sae.b_dec.detach()}, sys.argv[1])
td.destroy_process_group()
"""


@pytest.mark.slow
def test_torchrun_trains_one_sae_data_parallel(tmp_path):
    """``torchrun --nproc_per_node 2`` (gloo): two ranks with batches of 64 give the weights of one
    process on the concatenated batches of 128 (gradients averaged; first-batch statistics and the
    dead-latent clocks reduced across ranks)."""
    import os
    import subprocess
    import sys

    from saediff.saes.training import SAETrainConfig, train_sae

    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            str(script),
            str(tmp_path / "w.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ddp = torch.load(tmp_path / "w.pt", weights_only=True)
    data = torch.randn(24 * 64, 16, generator=torch.Generator().manual_seed(0))
    batches = [data[i : i + 64] for i in range(0, data.shape[0], 64)]
    joined = iter([torch.cat([batches[2 * s], batches[2 * s + 1]]) for s in range(12)])
    cfg = SAETrainConfig(
        arch="topk", d_sae=32, k=4, steps=12, batch_size=128, lr=1e-3, dead_tokens=256, device="cpu"
    )
    one, _ = train_sae(joined, cfg, progress=False)
    for name in ("W_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(ddp[name], getattr(one, name).detach(), atol=1e-5, rtol=1e-4)


def test_release_sae_offline_is_one_line(tiny_qwen, tmp_path):
    """``--sae RELEASE:SAE_ID`` goes to the hub; offline that is one line saying so."""
    from typer.testing import CliRunner

    from saediff.cli.app import app

    r = CliRunner().invoke(
        app,
        [
            "diff",
            "--base",
            str(tiny_qwen / "model"),
            "--adapter",
            str(tiny_qwen / "lora"),
            "--sae",
            "qwen2.5-7b-instruct-andyrdt:resid_post_layer_15_trainer_1",
            "--prompts",
            "first_plot",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert "qwen2.5-7b-instruct-andyrdt" in r.output and "needs the hub" in r.output
    from saediff.saes.loading import load_sae

    with pytest.raises(ValueError, match=r"holds 7 SAEs: name one as qwen2.5-7b-instruct-andyrdt:SAE_ID"):
        load_sae("qwen2.5-7b-instruct-andyrdt")  # a bare release with several SAEs
    with pytest.raises(FileNotFoundError, match="not a SAELens release"):
        load_sae("no-such-release")
    r = CliRunner().invoke(app, ["sae", "info", "qwen2.5-7b-instruct-andyrdt:resid_post_layer_15_trainer_1"])
    assert r.exit_code == 1 and "needs the hub" in r.output
