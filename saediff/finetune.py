"""One training loop for pretraining, full fine-tunes and LoRA fine-tunes of causal LMs.

The loss is next-token cross-entropy on the positions whose label is not ``-100`` (for chat
fine-tunes: assistant tokens only). Parameters that do not require grad are left alone, so the
same loop trains a full model or a peft-wrapped one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from tqdm.auto import tqdm

from saediff import _io

__all__ = ["TrainConfig", "TrainHistory", "Batches", "train_lm", "lm_loss"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    """optimizer steps"""
    batch_size: int = 32
    """sequences per step"""
    lr: float = 1e-4
    """peak learning rate (AdamW)"""
    warmup: int = 0
    """linear warm-up steps"""
    decay: bool = False
    """cosine decay to 10% of ``lr`` after warm-up (pretraining); constant otherwise"""
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"TrainConfig needs steps, batch_size >= 1 and lr > 0, got {self}")


@dataclass(frozen=True)
class TrainHistory:
    loss: list[float]
    """training loss per step (LM loss plus any extra loss)"""
    extra: list[float] = field(default_factory=list)
    """the extra loss per step (e.g. the BLOCK-EM penalty), if any"""


class Batches(Protocol):
    input_ids: torch.Tensor  # (N, T)
    labels: torch.Tensor  # (N, T)


def lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, pad_id: int | None = 0):
    """Mean next-token cross-entropy over positions with ``labels != -100``."""
    mask = None if pad_id is None else (input_ids != pad_id).long()
    logits = model(input_ids=input_ids, attention_mask=mask).logits  # (B, T, V)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
    )


def _lr_factor(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if not cfg.decay:
        return 1.0
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def train_lm(
    model: torch.nn.Module,
    data: Batches,
    cfg: TrainConfig,
    *,
    pad_id: int | None = 0,
    desc: str = "train",
    callback: Callable[[int, float], None] | None = None,
    extra_loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    progress: bool = True,
) -> TrainHistory:
    """Train ``model`` in place on random batches of ``data``; returns the loss per step.

    ``extra_loss(batch_index, input_ids, labels)`` is added to the LM loss after the forward pass
    (e.g. the BLOCK-EM latent penalty, which reads activations captured by a forward hook);
    ``callback(step, loss)`` runs after each optimizer step.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train_lm: the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(cfg, s))
    gen = torch.Generator().manual_seed(cfg.seed)
    n = data.input_ids.shape[0]
    device = next(model.parameters()).device
    model.train()
    losses: list[float] = []
    extras: list[float] = []
    for step in tqdm(range(cfg.steps), desc=desc, leave=False, disable=_io.no_progress(progress)):
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        ids, labels = data.input_ids[idx].to(device), data.labels[idx].to(device)
        loss = lm_loss(model, ids, labels, pad_id)
        if extra_loss is not None:
            extra = extra_loss(idx, ids, labels)
            extras.append(extra.item())
            loss = loss + extra
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if callback is not None:
            callback(step, losses[-1])
    model.eval()
    log.info("%s: loss %.4f -> %.4f over %d steps", desc, losses[0], losses[-1], cfg.steps)
    return TrainHistory(loss=losses, extra=extras)
