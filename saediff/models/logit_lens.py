"""The logit lens of a residual-stream direction: which tokens it promotes and suppresses along the
direct path to the logits (the output embedding with the final norm's weight folded in)."""

from __future__ import annotations

import torch
from jaxtyping import Float

__all__ = ["logit_effects", "unembedding"]


def unembedding(model: torch.nn.Module) -> Float[torch.Tensor, "d vocab"]:
    """The direct path from the residual stream to the logits: the output embedding, with the
    final norm's weight folded in when it has one (its per-token scale is left out)."""
    W_U = model.get_output_embeddings().weight.detach().float().T  # (d, vocab)
    norm = getattr(getattr(model, "model", model), "norm", None)
    w = getattr(norm, "weight", None)
    return W_U * w.detach().float()[:, None] if w is not None else W_U


def logit_effects(
    direction: Float[torch.Tensor, " d"], W_U: Float[torch.Tensor, "d vocab"], tokenizer, k: int = 10
) -> dict[str, list[tuple[str, float]]]:
    """The tokens a direction promotes and suppresses most along the direct path (``direction @ W_U``)."""
    logits = direction.float().to(W_U.device) @ W_U
    top, bottom = logits.topk(k), (-logits).topk(k)
    name = lambda i: tokenizer.decode([int(i)])
    return {
        "promoted": [(name(i), float(v)) for v, i in zip(top.values, top.indices)],
        "suppressed": [(name(i), -float(v)) for v, i in zip(bottom.values, bottom.indices)],
    }
