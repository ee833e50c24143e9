"""SAE quality: fraction of variance unexplained, L0 and dead latents on held-out activations, and the
CE loss recovered with the reconstruction spliced into the model."""

from __future__ import annotations

from typing import NamedTuple

import torch

from saediff.errors import SaediffError

__all__ = ["SAEMetrics", "ce_loss_recovered", "sae_metrics"]


class SAEMetrics(NamedTuple):
    fvu: float
    """fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean x||^2"""
    l0: float
    """mean number of active latents per token"""
    dead_fraction: float
    """latents that never fire on the evaluation activations"""
    mse: float

    def to_json(self) -> dict:
        return self._asdict()


@torch.no_grad()
def sae_metrics(sae, acts_ND: torch.Tensor, batch_size: int = 8192) -> SAEMetrics:
    """Reconstruction quality and sparsity of ``sae`` on activations ``acts_ND``."""
    if acts_ND.shape[-1] != sae.cfg.d_in:
        raise SaediffError(f"SAE d_in {sae.cfg.d_in} does not match activations of width {acts_ND.shape[-1]}")
    mean = acts_ND.mean(0)
    sse = sst = l0 = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for i in range(0, acts_ND.shape[0], batch_size):
        x = acts_ND[i : i + batch_size].float()
        z = sae.encode(x)
        xhat = sae.decode(z)
        sse += float((x - xhat).pow(2).sum())
        sst += float((x - mean).pow(2).sum())
        l0 += float((z > 0).sum())
        fired |= (z > 0).any(0)
    n = acts_ND.shape[0]
    return SAEMetrics(sse / sst, l0 / n, float((~fired).float().mean()), sse / n)


def ce_loss_recovered(
    model,
    sae,
    layer: int,
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    splice: torch.Tensor | None = None,
    batch_size: int | None = None,
) -> dict:
    """CE loss with the SAE reconstruction spliced into ``blocks.{layer}.hook_resid_post``.

    The splice replaces the residual by ``decode(encode(x))`` computed with ordinary autograd
    (no SAELens error term under ``no_grad``), so gradients through it are correct. ``splice``: a
    (N, T) bool mask of the positions replaced (None: all); an SAE trained on answer tokens is
    spliced there only, as the prompt holds positions it never saw (a chat model's first token
    carries a residual many times the others' norm). ``input_ids`` are right-padded (labels -100
    there); ``batch_size`` rows per forward (None: all at once). The CE is the mean over labelled
    tokens. Returns clean, spliced and zero-ablated CE (zero on the same positions) and the
    recovered fraction ``(ce_zero - ce_sae) / (ce_zero - ce_clean)``.
    """
    from saediff.models.hooks import add_resid_hook

    device = next(model.parameters()).device
    labels = input_ids.clone() if labels is None else labels
    where = torch.ones_like(input_ids, dtype=torch.bool) if splice is None else splice.bool()
    n = input_ids.shape[0]
    step = batch_size or n
    sae.to(device)
    sums, count = {"clean": 0.0, "sae": 0.0, "zero": 0.0}, 0
    for i in range(0, n, step):
        ids, lab, mask = (t[i : i + step].to(device) for t in (input_ids, labels, where))

        with torch.no_grad():
            sums["clean"] += _ce_sum(model, ids, lab)
            with add_resid_hook(model, layer, _spliced(mask, lambda r: sae.decode(sae.encode(r)))):
                sums["sae"] += _ce_sum(model, ids, lab)
            with add_resid_hook(model, layer, _spliced(mask, torch.zeros_like)):
                sums["zero"] += _ce_sum(model, ids, lab)
        count += int((lab[:, 1:] != -100).sum())
    if not count:
        raise SaediffError("ce_loss_recovered: no labelled tokens")
    clean, spliced, zero = (sums[k] / count for k in ("clean", "sae", "zero"))
    return {
        "ce_clean": clean,
        "ce_sae": spliced,
        "ce_zero": zero,
        "ce_loss_recovered": (zero - spliced) / (zero - clean) if zero != clean else float("nan"),
    }


def _spliced(mask: torch.Tensor, fn):
    """A residual hook replacing the positions of ``mask`` (B, T) by ``fn(resid)``."""
    return lambda r: torch.where(mask[..., None], fn(r).to(r.dtype), r)


def _ce_sum(model, ids: torch.Tensor, labels: torch.Tensor) -> float:
    """Summed next-token cross-entropy over the positions with ``labels != -100``."""
    logits = model(input_ids=ids).logits
    return float(
        torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
        )
    )
