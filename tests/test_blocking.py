"""BLOCK-EM numerics: the penalty on hand-set latents, ablation and projection gradients."""

from __future__ import annotations

import pytest
import torch

from saediff.interventions.blocking import (
    BlockConfig,
    Blocker,
    ablate_latents,
    latent_codes,
    latent_penalty,
    project_out_directions,
)


def test_penalty_exact_numbers():
    # 1 sequence, 3 tokens, 2 latents: latent 0 must stay low, latent 1 must stay high
    z_theta = torch.tensor([[[3.0, 1.0], [0.5, 4.0], [9.0, 0.0]]])
    z_base = torch.tensor([[[1.0, 2.0], [1.0, 1.0], [0.0, 5.0]]])
    mask = torch.tensor([[True, True, False]])  # the third token is not an assistant token
    # token 0: relu(3-1)^2 + relu(2-1)^2 = 4 + 1 = 5; token 1: relu(.5-1)^2 + relu(1-4)^2 = 0
    assert latent_penalty(z_theta, z_base, mask, n_low=1).item() == pytest.approx(2.5)
    # both latents "low": token 0: 4 + 0, token 1: 0 + 9 -> mean 6.5
    assert latent_penalty(z_theta, z_base, mask, n_low=2).item() == pytest.approx(6.5)


@pytest.fixture
def topk_sae():
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(0)
    # float64 in the config: SAELens casts inputs to cfg.dtype, which would spoil gradcheck
    sae = TopKSAE(TopKSAEConfig(d_in=6, d_sae=10, k=3, dtype="float64"))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return sae


def test_preactivation_codes(topk_sae):
    x = torch.randn(4, 6, dtype=torch.float64)
    pre = ((x - topk_sae.b_dec) @ topk_sae.W_enc + topk_sae.b_enc).relu()
    torch.testing.assert_close(latent_codes(topk_sae, x, [2, 7]), pre[:, [2, 7]])
    # the TopK output is zero wherever the latent is not in the top k; the pre-activation is not
    enc = latent_codes(topk_sae, x, list(range(10)), preactivation=False)
    assert (enc > 0).sum(-1).max() <= 3 and (pre > 0).sum() > (enc > 0).sum()


def test_ablation_gradient_matches_autograd(topk_sae):
    """The ablate path's gradient equals the analytic one: d/dx [x - z_S(x) W_S] = I - J_S^T W_S."""
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    sae = topk_sae
    idx = [1, 4]
    assert torch.autograd.gradcheck(lambda v: ablate_latents(sae, v, idx), (x,))
    # removing the latents zeroes them when re-encoded only if decoder rows are orthogonal; at least
    # the removed part equals z_S @ W_S exactly
    out = ablate_latents(sae, x, idx)
    torch.testing.assert_close(x - out, sae.encode(x)[:, idx] @ sae.W_dec[idx])


def test_projection_removes_span():
    d = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    x = torch.tensor([[3.0, 1.0, 5.0]])
    y = project_out_directions(x, d)
    torch.testing.assert_close(y, torch.tensor([[1.0, -1.0, 0.0]]))
    torch.testing.assert_close(project_out_directions(y, d), y)


def test_blocker_penalty_end_to_end(tiny_organism, topk_sae):
    """A training step with the penalty has a positive penalty and its gradient reaches the model."""
    from saediff.models.loading import load_model

    base = load_model(str(tiny_organism / "aligned")).model
    model = load_model(str(tiny_organism / "aligned")).model
    from sae_lens import TopKSAE, TopKSAEConfig

    sae = TopKSAE(TopKSAEConfig(d_in=32, d_sae=16, k=4))
    blocker = Blocker(BlockConfig(mode="penalty", layer=0, latents_low=(0, 1, 2), lam=10.0), sae=sae)
    ids = torch.randint(3, 100, (4, 7))
    labels = ids.clone()
    labels[:, :3] = -100
    blocker.precompute_base(base, ids)
    with torch.no_grad():  # move the model so the penalty is non-zero
        for p in model.model.layers[0].parameters():
            p.add_(torch.randn_like(p) * 0.2)
    with blocker.installed(model):
        model(input_ids=ids)
        pen = blocker.extra_loss(torch.arange(4), ids, labels)
    assert pen.item() > 0
    pen.backward()
    assert model.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs latents"):
        BlockConfig(mode="penalty")


def test_blocker_projects_after_several_blocks(tiny_organism):
    """Concept ablation at several blocks: each block's output has no component along its own
    direction while installed, and the hooks are gone afterwards."""
    from saediff.models.hooks import decoder_layers
    from saediff.models.loading import load_model

    model = load_model(str(tiny_organism / "aligned")).model
    dirs = {0: torch.randn(2, 32), 1: torch.randn(1, 32)}
    span = {L: torch.linalg.qr(d.T)[0] for L, d in dirs.items()}  # (d_model, k) orthonormal
    ids = torch.randint(3, 100, (2, 6))

    def outputs() -> dict[int, torch.Tensor]:
        """Each block's output, read by hooks registered after (so run after) the blocker's."""
        seen: dict[int, torch.Tensor] = {}
        hooks = [
            decoder_layers(model)[L].register_forward_hook(
                lambda m, i, o, L=L: seen.__setitem__(L, o[0] if isinstance(o, tuple) else o)
            )
            for L in dirs
        ]
        with torch.no_grad():
            model(ids)
        for h in hooks:
            h.remove()
        return seen

    with Blocker(BlockConfig(mode="project", layer=1), directions=dirs).installed(model):
        inside = outputs()
    after = outputs()
    for L in dirs:
        assert (inside[L] @ span[L]).abs().max() < 1e-4  # nothing left along the span after block L
        assert (after[L] @ span[L]).abs().max() > 1e-2  # uninstalled: the component is back


def test_project_directions_choices():
    """Concept-ablation directions per block from a named source (the organism's ground truth), its
    random control (same shapes, other vectors), and one-line errors for impossible requests."""
    from saediff.errors import SaediffError
    from saediff.interventions.block_directions import project_directions, random_directions

    gt = {L: torch.randn(8) for L in range(3)}
    d = project_directions("ground_truth", [0, 2], named={"ground_truth": gt})
    assert sorted(d) == [0, 2] and torch.equal(d[2][0], gt[2])
    r = random_directions(d, 0)
    assert r[0].shape == (1, 8) and not torch.equal(r[0], d[0])
    with pytest.raises(SaediffError, match=r"'ground_truth' has no block 5 \(it has \[0, 1, 2\]\)"):
        project_directions("ground_truth", [5], named={"ground_truth": gt})
    with pytest.raises(
        SaediffError, match="unknown project direction 'pca'; choose from latents, model_diff, ground_truth"
    ):
        project_directions("pca", [1], named={"ground_truth": gt})
