"""The diff-SAE method: an SAE trained on activation differences (fine-tune minus base, the same
tokens read from both models; ``saediff sae train --on-difference``) and read by how much of the
mean difference each latent carries."""

from __future__ import annotations

import torch
from jaxtyping import Float

from saediff.methods.base import Candidates, DiffingMethod, MethodInputs
from saediff.methods.directions import Direction

__all__ = ["DiffSAE", "difference_latents"]


@torch.no_grad()
def difference_latents(
    sae, diffs_ND: Float[torch.Tensor, "n d_in"], top: int = 20, batch_size: int = 8192
) -> list[dict]:
    """For an SAE trained on activation differences (fine-tune minus base): its ``top`` latents by
    mean activation over ``diffs_ND``, the share of the mean difference each one carries along its
    own decoder row (``mean_act * <W_dec_j, mean diff> / |mean diff|^2``, unit-norm decoders: the
    shares of all latents and b_dec sum to 1 when the SAE is exact), and its firing rate."""
    s1 = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
    for i in range(0, diffs_ND.shape[0], batch_size):
        z = sae.encode(diffs_ND[i : i + batch_size].float().to(sae.W_enc.device)).cpu()
        s1 += z.double().sum(0)
        fired += (z > 0).sum(0)
    n = max(1, diffs_ND.shape[0])
    mean_act = (s1 / n).float()
    mean_diff = diffs_ND.float().mean(0)
    share = (
        mean_act * (sae.W_dec.detach().float().cpu() @ mean_diff) / mean_diff.pow(2).sum().clamp_min(1e-12)
    )
    order = mean_act.argsort(descending=True)[:top]
    return [
        {
            "latent": int(j),
            "mean_act": float(mean_act[j]),
            "share_of_mean_diff": float(share[j]),
            "freq": float(fired[j]) / n,
        }
        for j in order
    ]


class DiffSAE(DiffingMethod):
    """An SAE trained here on the pair's activation differences (fine-tune minus base, the same
    tokens); the direction is the decoder row, scaled by its mean activation, of the latent that
    carries the largest share of the mean difference."""

    name = "diff_sae"
    summary = "SAE on activation differences: the latent carrying most of the mean difference"
    order = 6
    tags = ("diff_sae",)
    uses_paired_rows = True

    def find(self, inputs: MethodInputs) -> Candidates:
        from saediff.saes.training import SAETrainConfig, train_sae

        cfg, rows = inputs.cfg, inputs.paired_rows()
        diffs = rows[:, 1] - rows[:, 0]
        scfg = SAETrainConfig(
            d_sae=cfg.diff_sae_latents or inputs.sae_size["d_sae"],
            k=cfg.diff_sae_k or inputs.sae_size["k"],
            steps=cfg.diff_sae_steps,
            batch_size=min(cfg.batch_size, diffs.shape[0] // 2),
            lr=cfg.lr,
            seed=cfg.seed,
            device="cpu",
        )
        sae, hist = train_sae(diffs, scfg, hook_name=inputs.hook, progress=False)
        ranked = sorted(
            difference_latents(sae, diffs, top=sae.cfg.d_sae), key=lambda r: -r["share_of_mean_diff"]
        )
        best = ranked[0]
        vector = sae.W_dec[best["latent"]].detach().float().clone() * best["mean_act"]
        detail = {
            "latent": best["latent"],
            "share_of_mean_diff": best["share_of_mean_diff"],
            "fvu": hist["fvu"][-1],
        }
        return Candidates((Direction(self.name, vector, inputs.hook, "diff_sae", detail),), None, detail)
