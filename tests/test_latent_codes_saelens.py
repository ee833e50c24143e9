"""``latent_codes`` (BLOCK-EM's penalty codes) agree with SAELens's own pre-activations for SAEs
that normalise their input, subtract b_dec, rescale by the decoder norm or gate."""

from __future__ import annotations

import pytest
import torch
from sae_lens import (
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)

from saediff.interventions.blocking import latent_codes

IDX = [1, 4, 6]


def _randomised(sae):
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return sae


def _saelens_pre(sae, x):
    _, cache = sae.run_with_cache(x, names_filter="hook_sae_acts_pre")
    return cache["hook_sae_acts_pre"]


@pytest.mark.parametrize(
    "make",
    [
        lambda: StandardSAE(
            StandardSAEConfig(d_in=6, d_sae=8, normalize_activations="constant_norm_rescale")
        ),
        lambda: StandardSAE(StandardSAEConfig(d_in=6, d_sae=8, normalize_activations="layer_norm")),
        lambda: JumpReLUSAE(
            JumpReLUSAEConfig(d_in=6, d_sae=8, normalize_activations="constant_norm_rescale")
        ),
        lambda: TopKSAE(
            TopKSAEConfig(
                d_in=6, d_sae=8, k=2, normalize_activations="layer_norm", rescale_acts_by_decoder_norm=True
            )
        ),
        lambda: TopKSAE(TopKSAEConfig(d_in=6, d_sae=8, k=2, apply_b_dec_to_input=False)),
        lambda: GatedSAE(GatedSAEConfig(d_in=6, d_sae=8, normalize_activations="constant_norm_rescale")),
    ],
    ids=[
        "standard-norm-rescale",
        "standard-layer-norm",
        "jumprelu-norm-rescale",
        "topk-ln-decoder-norm",
        "topk-no-b-dec",
        "gated-norm-rescale",
    ],
)
def test_preactivation_codes_match_saelens(make):
    torch.manual_seed(0)
    sae = _randomised(make())
    x = torch.randn(5, 6) * 7.0  # far from the SAE's normalised scale: normalisation matters
    want = _saelens_pre(sae, x)
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):  # what TopK then selects on and outputs
        want = want * sae.W_dec.norm(dim=-1)
    want = want[:, IDX].relu()
    torch.testing.assert_close(latent_codes(sae, x, IDX), want)


def test_preactivation_codes_equal_a_standard_saes_encode():
    """A ReLU SAE's encoded activations are its ReLU'd pre-activations: the two paths agree."""
    torch.manual_seed(1)
    sae = _randomised(
        StandardSAE(StandardSAEConfig(d_in=6, d_sae=8, normalize_activations="constant_norm_rescale"))
    )
    x = torch.randn(4, 3, 6) * 3.0
    torch.testing.assert_close(latent_codes(sae, x, IDX), sae.encode(x)[..., IDX])
    torch.testing.assert_close(latent_codes(sae, x, IDX), latent_codes(sae, x, IDX, preactivation=False))
