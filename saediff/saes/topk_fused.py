"""The fused TopK SAE step (``SAETrainConfig.kernel="fused"``): one autograd function computes the
loss and every gradient by hand, touching only the selected latents after the encoder's matmul.

Where a TopK step's time goes on a CPU at d_in 128, d_sae 2048, k 16, batch 1024 (one thread;
bench/sae_train.py): the encoder's dense (B, d_sae) matmul and the top-k selection over its
output are most of it; everything after the selection is B x k work. So this step

- runs the encoder matmul once, in float32 or (``bf16=True``) in bf16 with float32 weights kept
  as masters: the bf16 product only *selects* the latents, whose values are then recomputed in
  float32 (the selection may differ from float32's where two pre-activations tie to bf16's 8
  bits; the loss and gradients are float32 for the selected set);
- selects the top k with ``topk_rows``: the max of each strided group of latents, the top-k
  groups, then the top k among those groups' members (exact: the k largest lie in the k groups
  with the largest maxima), about 20% faster than one ``topk`` over all latents (5.9 against 7.4
  ms for 1024 x 2048 here);
- decodes with ``embedding_bag`` over the k active rows of ``W_dec``;
- writes the backward by hand: per-entry dot products for the codes' gradients, one sparse
  (d_sae, B) matrix product each for the ``W_dec`` and ``W_enc`` gradients, a weighted
  ``bincount`` for ``b_enc``; no (B, d_sae) tensor is read after the selection.

It computes what ``training_step.topk_step_loss(kernel="dense")`` does (the reference; tests/
test_sae_step.py checks loss and gradients agree), AuxK term included: the top ``n_aux``
pre-activations among dead latents, rectified, reconstruct the main error.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["FusedOut", "fused_topk_loss", "topk_rows"]

GROUP = 16
"""latents per strided group in ``topk_rows``"""


def topk_rows(pre_BS: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row of ``pre_BS`` (values, indices; unsorted), as
    ``pre_BS.topk(k, sorted=False)`` gives them (the same values; indices may differ at ties).

    Latent ``s`` belongs to group ``s % C`` (C = S / GROUP groups of GROUP latents, strided so the
    group maxima are one vectorised max over a (B, GROUP, C) view). The k groups with the largest
    maxima hold the k largest entries: each of them holds an entry >= the smallest of their maxima,
    and every other entry is <= it. The top k among their k * GROUP members is the answer."""
    B, S = pre_BS.shape
    C = S // GROUP
    if S % GROUP or C < 4 * k:  # too few groups to save anything
        return pre_BS.topk(k, dim=-1, sorted=False)
    v_BGC = pre_BS.view(B, GROUP, C)
    _, grp_BK = v_BGC.amax(1).topk(k, dim=-1, sorted=False)  # (B, k) groups
    cand = v_BGC.gather(2, grp_BK[:, None, :].expand(B, GROUP, k)).view(B, GROUP * k)
    vals_BK, pos_BK = cand.topk(k, dim=-1, sorted=False)
    return vals_BK, (pos_BK // k) * C + grp_BK.gather(1, pos_BK % k)


_DOTS = getattr(torch.ops.aten, "_embedding_bag_per_sample_weights_backward", None)
"""the backward of ``embedding_bag`` in its per-sample weights: exactly ``_rowdot``, computed without
gathering the rows (2-3x faster than the gather below, which stands in where it is missing)"""


def _rowdot(idx_BK: torch.Tensor, T_SD: torch.Tensor, y_BD: torch.Tensor) -> torch.Tensor:
    """(B, K): ``T_SD[idx_BK[b, j]] . y_BD[b]``."""
    B, K = idx_BK.shape
    if _DOTS is not None:
        bag = torch.arange(B, device=idx_BK.device)
        return _DOTS(y_BD, T_SD, idx_BK.reshape(-1), bag * K, bag.repeat_interleave(K), 0, -1).view(B, K)
    rows_BKD = T_SD.index_select(0, idx_BK.reshape(-1)).view(B, K, -1)
    return (rows_BKD * y_BD[:, None, :]).sum(-1)


def _scatter_rows(rows_N: torch.Tensor, cols_N: torch.Tensor, w_N: torch.Tensor, rhs_MD, n: int):
    """(n, D): ``out[rows_N[i]] += w_N[i] * rhs_MD[cols_N[i]]`` summed over i, as one sparse
    (n, M) matrix times ``rhs_MD`` (no (N, D) products materialised)."""
    M = torch.sparse_coo_tensor(
        torch.stack([rows_N, cols_N]), w_N, (n, rhs_MD.shape[0]), check_invariants=False
    )
    return torch.sparse.mm(M, rhs_MD)


class FusedOut(NamedTuple):
    loss: torch.Tensor
    """differentiable in W_enc, b_enc, W_dec, b_dec"""
    mse: torch.Tensor
    aux: torch.Tensor
    vals_BK: torch.Tensor
    idx_BK: torch.Tensor


class _FusedTopKLoss(torch.autograd.Function):
    """Forward: the loss, with the gradients computed alongside; backward: those gradients times
    the incoming one (the loss is a scalar)."""

    @staticmethod
    def forward(ctx, x_BD, W_enc, b_enc, W_dec, b_dec, k, var, dead_S, n_aux, aux_coef, bf16):
        B, S = x_BD.shape[0], W_enc.shape[1]
        xc_BD = x_BD - b_dec
        W_enc_SD = W_enc.T.contiguous()  # rows per latent, for the gathers below
        if bf16:
            pre_BS = torch.addmm(b_enc.bfloat16(), xc_BD.bfloat16(), W_enc.bfloat16())
            _, idx_BK = topk_rows(pre_BS, k)
            vals_BK = _rowdot(idx_BK, W_enc_SD, xc_BD) + b_enc[idx_BK]
        else:
            pre_BS = torch.addmm(b_enc, xc_BD, W_enc)
            vals_BK, idx_BK = topk_rows(pre_BS, k)
        z_BK = vals_BK.relu()
        e_BD = x_BD - (F.embedding_bag(idx_BK, W_dec, per_sample_weights=z_BK, mode="sum") + b_dec)
        mse = e_BD.pow(2).sum(-1).mean()
        g_xhat = e_BD * (-2.0 / (B * var))  # d loss / d xhat, (B, D)
        g_vals = _rowdot(idx_BK, W_dec, g_xhat) * (vals_BK > 0)  # d loss / d pre at the selection
        # entries (latent, token, weight) of the sparse (S, B) matrices behind the gradients
        sel = [idx_BK, torch.arange(B, device=x_BD.device)[:, None].expand(B, k), z_BK, g_vals]
        rhs_dec = [g_xhat]
        g_xc = F.embedding_bag(idx_BK, W_enc_SD, per_sample_weights=g_vals, mode="sum")
        aux = mse.new_zeros(())
        if n_aux > 0:
            dead_idx = dead_S.nonzero()[:, 0]
            a_vals, a_pos = pre_BS[:, dead_idx].topk(n_aux, dim=-1, sorted=False)
            a_idx = dead_idx[a_pos]  # (B, n_aux)
            a_pre = _rowdot(a_idx, W_enc_SD, xc_BD) + b_enc[a_idx] if bf16 else a_vals
            a_vals = a_pre.relu()
            ea_BD = e_BD - F.embedding_bag(a_idx, W_dec, per_sample_weights=a_vals, mode="sum")
            aux = ea_BD.pow(2).sum(-1).mean() / var
            g_recon = ea_BD * (-2.0 * aux_coef / (B * var))  # d loss / d AuxK recon, (B, D)
            g_avals = _rowdot(a_idx, W_dec, g_recon) * (a_pre > 0)
            tok = torch.arange(B, device=x_BD.device)[:, None].expand(B, n_aux)
            sel = [
                torch.cat([a, b.reshape(-1)])
                for a, b in zip((t.reshape(-1) for t in sel), (a_idx, tok, a_vals, g_avals))
            ]
            rhs_dec.append(g_recon)
            g_xc = g_xc + F.embedding_bag(a_idx, W_enc_SD, per_sample_weights=g_avals, mode="sum")
        rows, tok, z, g = (t.reshape(-1) for t in sel)
        dec_cols = tok.clone()
        dec_cols[B * k :] += B  # the AuxK entries multiply g_recon, stacked under g_xhat
        g_W_dec = _scatter_rows(rows, dec_cols, z, torch.cat(rhs_dec), S)
        g_W_enc = _scatter_rows(rows, tok, g, xc_BD, S).T.contiguous()  # Adam is slower on strided grads
        g_b_enc = torch.bincount(rows, weights=g, minlength=S)
        g_b_dec = g_xhat.sum(0) - g_xc.sum(0)
        ctx.grads = (g_W_enc, g_b_enc, g_W_dec, g_b_dec)
        ctx.mark_non_differentiable(mse, aux, vals_BK, idx_BK)
        return mse / var + aux_coef * aux, mse, aux, vals_BK, idx_BK

    @staticmethod
    def backward(ctx, g_loss, *_):
        grads, ctx.grads = ctx.grads, None  # no reference left here: autograd takes them without a copy
        if float(g_loss) != 1.0:
            grads = tuple(g * g_loss for g in grads)
        return (None, *grads, None, None, None, None, None, None)


def fused_topk_loss(
    p, x_BD: torch.Tensor, k: int, var: float, dead_S, n_aux: int, aux_coef: float, bf16: bool = False
) -> FusedOut:
    """The TopK loss (normalised by the data variance ``var``) plus ``aux_coef`` times the AuxK
    term over the ``n_aux`` largest dead pre-activations, for ``SAEParams`` ``p`` on (B, d_in) rows
    ``x_BD``; ``loss.backward()`` fills the parameters' gradients (module docstring)."""
    with torch.autocast(x_BD.device.type, enabled=False):
        out = _FusedTopKLoss.apply(
            x_BD.float(), p.W_enc, p.b_enc, p.W_dec, p.b_dec, k, var, dead_S, n_aux, aux_coef, bf16
        )
    return FusedOut(*out)
