"""One SAE training step: the trainable tensors (``SAEParams``, in SAELens's names and layout) and
the loss of a step per architecture: TopK with the AuxK dead-latent term (four kernels that agree
to float rounding: ``dense``, the reference, ``sparse_decode`` and ``sparse`` here, ``fused`` in
``saes.topk_fused``), ReLU with an L1 penalty, and BatchTopK. ``saes.training`` runs them in its loop."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from saediff.saes.topk_fused import fused_topk_loss

__all__ = ["SAEParams", "StepOut", "batchtopk_step", "relu_step", "topk_step_loss"]


class SAEParams(torch.nn.Module):
    """The trainable tensors, in SAELens's names and layout."""

    def __init__(self, d_in: int, d_sae: int):
        super().__init__()
        self.W_enc = torch.nn.Parameter(torch.empty(d_in, d_sae))  # (D, S)
        self.W_dec = torch.nn.Parameter(torch.empty(d_sae, d_in))  # (S, D)
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in))
        self.register_buffer("threshold", torch.zeros(()))  # batchtopk -> JumpReLU

    @torch.no_grad()
    def init_from(self, sample_ND: torch.Tensor, gen: torch.Generator) -> None:
        d_in, d_sae = self.W_enc.shape
        W = torch.randn(d_sae, d_in, generator=gen)
        self.W_dec.copy_(W / W.norm(dim=1, keepdim=True))
        self.W_enc.copy_(self.W_dec.T)
        self.b_dec.copy_(sample_ND.mean(0))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))


class StepOut(NamedTuple):
    loss: torch.Tensor
    mse: torch.Tensor
    """summed squared error per token, mean over the batch"""
    aux: torch.Tensor
    fired_S: torch.Tensor
    """(S,) bool: latents active in this batch"""


def _topk_codes(pre_BS: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    vals, idx = pre_BS.topk(k, dim=-1, sorted=False)
    return vals.relu(), idx


class _TopKEncode(torch.autograd.Function):
    """The top-k pre-activations of ``xc_BD @ W_enc + b_enc`` per row, and (with ``dead_S``) the
    top-``aux_k`` among dead latents, as (values, indices) pairs. Only the selected entries carry a
    gradient, so the backward reads and writes only the B x (k + aux_k) selected rows of ``W_enc``
    (``embedding_bag``, ``index_add_``) instead of two dense (B, d_sae) matmuls, and the AuxK
    selection reads the dead columns alone; autograd through ``topk`` gives the same numbers (tests/test_saes.py)."""

    @staticmethod
    def forward(ctx, xc_BD, W_enc, b_enc, k: int, dead_S, aux_k: int):
        pre_BS = xc_BD @ W_enc + b_enc
        vals_BK, idx_BK = pre_BS.topk(k, dim=-1, sorted=False)
        if dead_S is not None:
            dead_idx = dead_S.nonzero()[:, 0]
            a_vals, a_pos = pre_BS[:, dead_idx].topk(aux_k, dim=-1, sorted=False)
            a_idx = dead_idx[a_pos]
        else:
            a_vals, a_idx = pre_BS.new_zeros(pre_BS.shape[0], 0), idx_BK.new_zeros(pre_BS.shape[0], 0)
        ctx.save_for_backward(xc_BD, W_enc, idx_BK, a_idx)
        ctx.mark_non_differentiable(idx_BK, a_idx)
        return vals_BK, idx_BK, a_vals, a_idx

    @staticmethod
    def backward(ctx, g_vals, _g_idx, g_avals, _g_aidx):
        xc_BD, W_enc, idx_BK, a_idx = ctx.saved_tensors
        B, D, S = xc_BD.shape[0], W_enc.shape[0], W_enc.shape[1]
        idx = torch.cat([idx_BK, a_idx], 1)  # (B, n = k + aux_k)
        g = torch.cat([g_vals, g_avals if g_avals is not None else g_vals.new_zeros(a_idx.shape)], 1).to(
            W_enc.dtype
        )
        W_SD = W_enc.T.contiguous()  # rows per latent: embedding_bag and index_add_ read and write whole rows
        g_xc = torch.nn.functional.embedding_bag(idx, W_SD, per_sample_weights=g, mode="sum")  # (B, D)
        g_W_SD = torch.zeros(S, D, dtype=W_enc.dtype, device=W_enc.device)
        xc = xc_BD.to(W_enc.dtype)
        step = max(
            1, 2**24 // (idx.shape[1] * D)
        )  # rows at a time: (rows, n, D) products, at most 16M numbers
        for i in range(0, B, step):
            rows = slice(i, i + step)
            g_W_SD.index_add_(0, idx[rows].reshape(-1), (g[rows, :, None] * xc[rows, None, :]).reshape(-1, D))
        g_b = torch.zeros(S, dtype=W_enc.dtype, device=W_enc.device).index_add_(
            0, idx.reshape(-1), g.reshape(-1)
        )
        return g_xc.to(xc_BD.dtype), g_W_SD.T.contiguous(), g_b, None, None, None


def topk_step_loss(
    p: SAEParams,
    x_BD: torch.Tensor,
    k: int,
    var: float,
    dead_S: torch.Tensor | None,
    aux_k: int,
    aux_coef: float,
    kernel: str = "dense",
    bf16: bool = False,
) -> StepOut:
    """TopK reconstruction loss (normalised by the data variance) plus the AuxK term.

    ``kernel`` (``SAETrainConfig.kernel``): ``dense`` scatters the codes into a (B, S) matrix and
    lets autograd run dense matmuls (the reference path); ``sparse_decode`` decodes with an
    ``embedding_bag`` over the k active rows; ``sparse`` also runs the encoder's backward at the
    selected latents only (``_TopKEncode``); ``fused`` computes loss and gradients in one
    function (``saes.topk_fused``; ``bf16``: its encoder matmul in bf16, selecting only). All must
    agree.
    """
    with_aux = dead_S is not None and aux_coef > 0 and bool(dead_S.any())
    n_aux = min(aux_k, int(dead_S.sum())) if with_aux else 0
    if kernel == "fused":
        out = fused_topk_loss(p, x_BD, k, var, dead_S, n_aux, aux_coef if with_aux else 0.0, bf16)
        fired_S = torch.zeros(p.W_enc.shape[1], dtype=torch.bool, device=x_BD.device)
        fired_S[out.idx_BK[out.vals_BK > 0]] = True
        return StepOut(out.loss, out.mse, out.aux, fired_S)
    if kernel == "sparse":
        vals_BK, idx_BK, a_vals, a_idx = _TopKEncode.apply(
            x_BD - p.b_dec, p.W_enc, p.b_enc, k, dead_S if with_aux else None, n_aux
        )
        vals_BK, a_vals = vals_BK.relu(), a_vals.relu()
        pre_BS = None
    else:
        pre_BS = (x_BD - p.b_dec) @ p.W_enc + p.b_enc
        vals_BK, idx_BK = _topk_codes(pre_BS, k)
    if kernel == "dense":
        z_BS = torch.zeros_like(pre_BS).scatter(-1, idx_BK, vals_BK)
        xhat_BD = z_BS @ p.W_dec + p.b_dec
    else:
        xhat_BD = (
            torch.nn.functional.embedding_bag(idx_BK, p.W_dec, per_sample_weights=vals_BK, mode="sum")
            + p.b_dec
        )
    err_BD = x_BD - xhat_BD
    mse = err_BD.pow(2).sum(-1).mean()
    aux = mse.new_zeros(())
    if with_aux:
        if pre_BS is not None:
            masked = pre_BS.masked_fill(~dead_S, float("-inf"))
            a_vals, a_idx = _topk_codes(masked, n_aux)
        a_vals = torch.nan_to_num(a_vals, neginf=0.0)
        recon = torch.nn.functional.embedding_bag(a_idx, p.W_dec, per_sample_weights=a_vals, mode="sum")
        aux = (err_BD.detach() - recon).pow(2).sum(-1).mean() / var
    fired_S = torch.zeros(p.W_enc.shape[1], dtype=torch.bool, device=x_BD.device)
    fired_S[idx_BK[vals_BK > 0]] = True
    return StepOut(mse / var + aux_coef * aux, mse, aux, fired_S)


def relu_step(p: SAEParams, x_BD, l1: float, var: float) -> StepOut:
    z_BS = ((x_BD - p.b_dec) @ p.W_enc + p.b_enc).relu()
    err = x_BD - (z_BS @ p.W_dec + p.b_dec)
    mse = err.pow(2).sum(-1).mean()
    sparsity = z_BS.sum(-1).mean() / math.sqrt(var)
    return StepOut(mse / var + l1 * sparsity, mse, sparsity, (z_BS > 0).any(0))


def batchtopk_step(p: SAEParams, x_BD, k: int, var: float) -> tuple[StepOut, torch.Tensor]:
    pre_BS = ((x_BD - p.b_dec) @ p.W_enc + p.b_enc).relu()
    flat = pre_BS.flatten()
    vals, idx = flat.topk(k * x_BD.shape[0], sorted=False)
    z_BS = torch.zeros_like(flat).scatter(0, idx, vals).view_as(pre_BS)
    err = x_BD - (z_BS @ p.W_dec + p.b_dec)
    mse = err.pow(2).sum(-1).mean()
    kept_min = vals[vals > 0].min() if bool((vals > 0).any()) else vals.new_zeros(())
    return StepOut(mse / var, mse, mse.new_zeros(()), (z_BS > 0).any(0)), kept_min.detach()
