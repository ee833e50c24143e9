"""The fused TopK step (saes.topk_fused) against the dense reference step, and its top-k selection."""

from __future__ import annotations

import pytest
import torch
from helpers import dies_after

from saediff.saes.topk_fused import topk_rows
from saediff.saes.training_step import SAEParams, topk_step_loss


def _step(p: SAEParams, x, kernel: str, dead, bf16: bool = False, k: int = 4, aux_k: int = 6, scale=1.0):
    """(loss, mse, aux, fired, gradients) of one step of ``kernel`` on ``x``."""
    p.zero_grad(set_to_none=True)
    out = topk_step_loss(p, x, k, 2.0, dead, aux_k, 0.1, kernel, bf16)
    (scale * out.loss).backward()
    return out.loss.detach(), out.mse, out.aux, out.fired_S, [q.grad.clone() for q in p.parameters()]


def _tiny_sae(d_in: int, d_sae: int, seed: int) -> SAEParams:
    g = torch.Generator().manual_seed(seed)
    p = SAEParams(d_in, d_sae)
    p.init_from(torch.randn(64, d_in, generator=g), g)
    with torch.no_grad():
        p.b_enc.copy_(0.1 * torch.randn(d_sae, generator=g))
    return p


def _assert_same(ref, got):
    for a, b in zip(ref[:3], got[:3]):
        torch.testing.assert_close(a, b)
    assert torch.equal(ref[3], got[3])
    for a, b in zip(ref[4], got[4]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("d_sae", [32, 256])  # 256: topk_rows' grouped selection, 32: plain topk
@pytest.mark.parametrize("with_dead", [False, True])
def test_fused_step_matches_the_dense_reference(d_sae, with_dead):
    """Loss, MSE, AuxK term, fired latents and every gradient of the fused step equal the dense
    reference's, with and without dead latents (AuxK), and the backward scales with the loss."""
    p = _tiny_sae(8, d_sae, seed=1)
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(2))
    dead = torch.zeros(d_sae, dtype=torch.bool)
    if with_dead:
        dead[::3] = True
    ref = _step(p, x, "dense", dead)
    got = _step(p, x, "fused", dead)
    assert (float(ref[2]) > 0) == with_dead
    _assert_same(ref, got)
    doubled = _step(p, x, "fused", dead, scale=2.0)
    for a, b in zip(got[4], doubled[4]):
        torch.testing.assert_close(2 * a, b)


def test_fused_step_rectifies_auxk_codes_as_the_reference():
    """Dead latents whose top pre-activations are negative contribute nothing to the AuxK term, in
    both paths (their codes are rectified)."""
    p = _tiny_sae(8, 32, seed=3)
    with torch.no_grad():
        p.b_enc[::2] = -50.0  # the dead latents: never positive
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(4))
    dead = torch.zeros(32, dtype=torch.bool)
    dead[::2] = True
    ref, got = _step(p, x, "dense", dead), _step(p, x, "fused", dead)
    _assert_same(ref, got)
    assert float(got[2]) == pytest.approx(
        float(got[1]) / 2.0
    )  # AuxK reconstructs nothing: its error is the error


def test_bf16_fused_step_selects_in_bf16_and_computes_in_float32():
    """Where the bf16 matmul picks the same latents as float32 (pre-activations 0.5 apart), the bf16
    fused step's loss and gradients are the float32 reference's: bf16 only selects."""
    d = 8
    p = SAEParams(d, 2 * d)
    with torch.no_grad():
        p.W_enc.copy_(torch.cat([torch.eye(d), -torch.eye(d)], 1))  # pre = (x - b_dec, b_dec - x) + b_enc
        p.W_dec.copy_(torch.randn(2 * d, d, generator=torch.Generator().manual_seed(5)))
        p.normalize_decoder()
        p.b_enc.copy_(0.01 * torch.arange(2 * d))
        p.b_dec.fill_(0.1)
    g = torch.Generator().manual_seed(6)
    x = torch.stack([0.5 * torch.randperm(d, generator=g).float() + 0.1234567 for _ in range(64)])
    dead = torch.zeros(2 * d, dtype=torch.bool)
    dead[d:] = True  # the negative half is dead: AuxK reads it
    ref = _step(p, x, "dense", dead, k=3, aux_k=2)
    got = _step(p, x, "fused", dead, bf16=True, k=3, aux_k=2)
    _assert_same(ref, got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_rows_gives_topk_values(dtype):
    """The grouped selection returns torch.topk's values (indices pointing at them), ties included."""
    g = torch.Generator().manual_seed(7)
    for pre in (
        torch.randn(64, 1024, generator=g),
        torch.randint(0, 6, (64, 1024), generator=g).float(),  # many ties
        torch.randn(8, 40, generator=g),  # too few groups: plain topk
    ):
        pre = pre.to(dtype)
        vals, idx = topk_rows(pre, 8)
        want = pre.topk(8, dim=-1).values
        assert torch.equal(vals.sort(-1, descending=True).values, want)
        assert torch.equal(pre.gather(1, idx), vals)
        assert all(len(set(row.tolist())) == 8 for row in idx)


def test_fused_kernel_trains_and_resumes(tmp_path):
    """train_sae with the fused kernel (and its fused Adam) learns, and a run resumed from its
    checkpoint ends with the uninterrupted run's weights."""
    from saediff.activations.store import shuffled_batches
    from saediff.saes.training import SAETrainConfig, train_sae

    data = torch.randn(2048, 16, generator=torch.Generator().manual_seed(8))
    cfg = SAETrainConfig(
        d_sae=64, k=4, steps=20, batch_size=128, warmup_steps=0, kernel="fused", dead_tokens=256
    )
    ref, hist = train_sae(shuffled_batches(data, 128, seed=1), cfg, progress=False)
    assert hist["kernel"] == "fused" and hist["fvu"][-1] < 0.9 * hist["fvu"][0]

    with pytest.raises(KeyboardInterrupt):
        train_sae(
            dies_after(shuffled_batches(data, 128, seed=1), 15),
            cfg,
            progress=False,
            checkpoint_dir=tmp_path,
            checkpoint_every=10,
        )
    got, _ = train_sae(
        shuffled_batches(data, 128, seed=1), cfg, progress=False, checkpoint_dir=tmp_path, resume=True
    )
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(got.state_dict()[k], v, rtol=0, atol=0)
