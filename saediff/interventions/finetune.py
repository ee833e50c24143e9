"""Fine-tuning causal LMs: chat fine-tunes on the transformers ``Trainer``, and a small loop.

- ``finetune`` (chat data, LoRA from a PEFT config or a full fine-tune) runs on
  ``transformers.Trainer``, so mixed precision, gradient accumulation, gradient checkpointing,
  checkpoints, resume and multi-GPU (``accelerate launch``) come from the library. TRL's
  ``SFTTrainer`` would add nothing here: its assistant-only loss needs ``{% generation %}``
  markers that Qwen2.5 and Llama templates lack, so saediff masks labels itself
  (``saediff.data.chat_data``) and only overrides ``compute_loss`` to add the BLOCK-EM penalty.
- ``train_lm`` is the organism's pretraining loop over pre-tokenized fixed-length batches.

The loss is next-token cross-entropy on the positions whose label is not ``-100``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import torch
from transformers import PrinterCallback, Trainer, TrainerCallback

from saediff import console
from saediff.errors import SaediffError
from saediff.models.precision import Resolved, model_precision, resolve_precision, set_precision

__all__ = [
    "Batches",
    "ChatTrainer",
    "FinetuneConfig",
    "TrainConfig",
    "TrainHistory",
    "checkpoints",
    "finetune",
    "latest_checkpoint",
    "lm_loss",
    "make_trainable",
    "train_lm",
]

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
            raise SaediffError(f"TrainConfig needs steps, batch_size >= 1 and lr > 0, got {self}")


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
    """Mean next-token cross-entropy over positions with ``labels != -100``.

    ``input_ids`` are right-padded with ``pad_id`` (None: no padding). Only each row's trailing run
    of it is padding: the same id inside a sequence is a real token (with pad = eos, as saediff sets
    for Llama tokenizers, every ``<|eot_id|>`` of a multi-turn chat), so ``input_ids != pad_id``
    would hide those tokens from attention."""
    mask = None if pad_id is None else _right_padding_mask(input_ids, pad_id)
    logits = model(input_ids=input_ids, attention_mask=mask).logits  # (B, T, V)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
    )


def _right_padding_mask(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(B, T) attention mask, 0 on each row's trailing run of ``pad_id`` and 1 before it."""
    trailing = (input_ids == pad_id).flip(1).long().cumprod(1).flip(1)
    return 1 - trailing


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
        raise SaediffError("train_lm: the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(cfg, s))
    gen = torch.Generator().manual_seed(cfg.seed)
    n = data.input_ids.shape[0]
    device = next(model.parameters()).device
    model.train()
    losses: list[float] = []
    extras: list[float] = []
    for step in console.progress(range(cfg.steps), desc=desc, enabled=progress):
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


@dataclass(frozen=True)
class FinetuneConfig:
    """A chat fine-tune: what trains and how. The CLI's flags parse into this."""

    method: Literal["lora", "full"] = "lora"
    """``lora`` (PEFT adapter) or ``full`` (every weight, or those ``freeze_after_block`` leaves)"""
    lora_rank: int = 1
    """adapter rank r (the ModelOrganismsForEM narrow adapters are rank 1 on ``down_proj``)"""
    lora_alpha: float | None = None
    """LoRA alpha; default: the rank (scale 1)"""
    lora_modules: tuple[str, ...] = ("down_proj",)
    """module names to adapt, e.g. ``down_proj`` or every projection ``q_proj ... down_proj``"""
    lora_layers: tuple[int, ...] | None = None
    """decoder layers that get adapters; None: all"""
    rslora: bool = False
    """rank-stabilised LoRA (scale alpha / sqrt(r)), as in the r32 EM fine-tunes"""
    steps: int = 300
    """optimizer steps"""
    batch_size: int = 8
    """sequences per device per micro-batch"""
    grad_accum: int = 1
    """micro-batches per optimizer step"""
    lr: float = 1e-5
    warmup_steps: int = 0
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """mixed precision (autocast) over float32 trainable weights, whatever dtype the model was
    loaded in; ``auto``: bf16 autocast where the device multiplies bf16 natively (a GPU that
    supports it, a CPU with AMX or AVX512-bf16: ``saediff.models.precision``), none elsewhere"""
    gradient_checkpointing: bool = False
    max_length: int = 2048
    """tokens per conversation (longer ones are cut)"""
    save_every: int | None = None
    """checkpoint every N steps (``out/checkpoints/checkpoint-N``); None: none"""
    freeze_after_block: int | None = None
    """train only decoder layers <= this block (the BLOCK-EM paper's fix for rerouting)"""
    seed: int = 0

    def __post_init__(self):
        if self.method not in ("lora", "full"):
            raise SaediffError(f"FinetuneConfig.method must be lora or full, got {self.method!r}")
        if (
            min(self.steps, self.batch_size, self.grad_accum, self.lora_rank, self.max_length) < 1
            or self.lr <= 0
        ):
            raise SaediffError(
                "FinetuneConfig: steps, batch_size, grad_accum, lora_rank, max_length must be >= 1 and lr > 0"
            )
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise SaediffError(
                f"FinetuneConfig.precision must be auto, fp32, bf16 or fp16, got {self.precision!r}"
            )
        if self.save_every is not None and self.save_every < 1:
            raise SaediffError("FinetuneConfig.save_every must be >= 1")


def make_trainable(model: torch.nn.Module, cfg: FinetuneConfig) -> torch.nn.Module:
    """``model`` wrapped with a fresh PEFT LoRA adapter (``method="lora"``), or itself with every
    weight trainable (``"full"``); with ``freeze_after_block`` only decoder layers up to that block
    train (embeddings stay frozen: they are tied to the unembedding in small models).

    Trainable weights are float32 masters even when the model was loaded in bfloat16 (``--dtype
    auto`` on a GPU): an AdamW step of ~lr (1e-5) is below half a bfloat16 ulp of a weight of
    size ~0.01 and would round away. A full fine-tune casts the whole model to float32 in place
    (frozen blocks too, so a run without autocast never mixes dtypes); a LoRA fine-tune keeps its
    frozen weights in the load dtype and its adapter in float32."""
    from saediff.models.hooks import decoder_layers

    n_layers = len(decoder_layers(model))
    if cfg.lora_layers is not None and any(not 0 <= L < n_layers for L in cfg.lora_layers):
        raise SaediffError(f"lora layers {list(cfg.lora_layers)} outside the model's blocks 0-{n_layers - 1}")
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [m for m in cfg.lora_modules if m not in names]
        if missing:
            raise SaediffError(f"lora modules {', '.join(missing)} not found in {type(model).__name__}")
        torch.manual_seed(cfg.seed)  # lora_A's random init: the same adapter start for every run of a sweep
        model = get_peft_model(
            model,
            LoraConfig(
                r=cfg.lora_rank,
                lora_alpha=cfg.lora_alpha or cfg.lora_rank,
                lora_dropout=0.0,
                target_modules=list(cfg.lora_modules),
                use_rslora=cfg.rslora,
                bias="none",
                layers_to_transform=list(cfg.lora_layers) if cfg.lora_layers is not None else None,
            ),
        )
    else:
        model.float()
        for p in model.parameters():
            p.requires_grad_(True)
    if cfg.freeze_after_block is not None:
        keep = {
            id(p)
            for i, blk in enumerate(decoder_layers(model))
            if i <= cfg.freeze_after_block
            for p in blk.parameters()
        }
        for p in model.parameters():
            if id(p) not in keep:
                p.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise SaediffError("make_trainable: nothing left to train (adapters only on frozen layers?)")
    for p in model.parameters():
        if p.requires_grad and p.dtype in (
            torch.bfloat16,
            torch.float16,
        ):  # PEFT upcasts its adapters already
            p.data = p.data.float()
    return model


def frozen_linears_to_bf16(model: torch.nn.Module) -> int:
    """Hold the frozen ``nn.Linear`` weights of a LoRA fine-tune under bf16 autocast in bfloat16;
    returns how many. Autocast casts them to bfloat16 for every matmul anyway, and a frozen weight's
    cast is not cached between steps, so holding them cast gives the same numbers without the cast
    at each step (``bench/model_side.py``: ``lora_step_bf16_base_vs_fp32``). An unembedding tied to
    the embedding stays float32: the embedding lookup would put the residual stream in bfloat16."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight
    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad and m.weight.dtype == torch.float32:
            if tied and m is out_emb:
                continue
            m.weight.data = m.weight.data.to(torch.bfloat16)
            n += 1
    return n


def checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-N`` under ``folder`` (the Trainer's layout), oldest first."""
    return sorted((int(p.name.split("-")[-1]), p) for p in Path(folder).glob("checkpoint-*"))


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest ``checkpoint-N`` under ``folder``, or None."""
    found = checkpoints(folder)
    return found[-1][1] if found else None


class _Penalty(Protocol):
    def before_forward(self, model: torch.nn.Module, inputs: dict) -> None: ...
    def penalty(self, inputs: dict) -> torch.Tensor: ...


class ChatTrainer(Trainer):
    """``Trainer`` whose loss is the model's own (assistant tokens, exact over gradient
    accumulation) plus an optional extra term, e.g. the BLOCK-EM penalty (logged as ``penalty``)."""

    def __init__(self, *args, extra: _Penalty | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.extra = extra
        self._extra_sum, self._extra_n = 0.0, 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.extra is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # the base pass (a frozen reference, or the adapter disabled) and both SAE encodes run under
        # the mixed precision accelerate gives the trained forward, so at the base weights the
        # penalty is exactly 0 under bf16 autocast as in fp32
        with self.accelerator.autocast():
            self.extra.before_forward(self.accelerator.unwrap_model(model), inputs)
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = out[0] if return_outputs else out
        with self.accelerator.autocast():
            pen = self.extra.penalty(inputs)
        self._extra_sum, self._extra_n = self._extra_sum + float(pen.detach()), self._extra_n + 1
        # the LM loss above is already normalised over the accumulated batch; the penalty is a
        # per-micro-batch mean, so it is divided by the number of micro-batches here
        scaled = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        loss = loss + (pen / self.current_gradient_accumulation_steps if scaled else pen)
        return (loss, out[1]) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs):
        if self._extra_n and "loss" in logs:
            logs["penalty"] = self._extra_sum / self._extra_n
            self._extra_sum, self._extra_n = 0.0, 0
        super().log(logs, *args, **kwargs)


class _EachStep(TrainerCallback):
    """Calls ``advance()`` after each optimizer step (saediff's progress display)."""

    def __init__(self, advance: Callable[[], None]):
        self.advance = advance

    def on_step_end(self, args, state, control, **kwargs):
        self.advance()


def finetune_precision(cfg: FinetuneConfig, model: torch.nn.Module | None, device) -> Resolved:
    """What ``cfg.precision`` means for ``model``: ``auto`` is the precision the model was loaded
    at (``ModelSpec.precision``: the organism's is fp32); for a model built in place rather than
    loaded, bf16 on a GPU that supports it and fp32 on a CPU, as before ``--precision``."""
    if cfg.precision != "auto":
        return resolve_precision(cfg.precision, device)
    loaded = model_precision(model) if model is not None else None
    if loaded is not None:
        return loaded
    on_gpu = torch.device(device).type == "cuda"
    return "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "fp32"


def _training_args(cfg: FinetuneConfig, ckpt_dir: Path, device: torch.device, precision: Resolved):
    """The ``TrainingArguments`` of ``cfg`` (checkpoints to ``ckpt_dir``, mixed precision as resolved)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(ckpt_dir),
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        # transformers checkpoints each layer's forward inside its module hooks, so the residual the
        # penalty's hook captures keeps its graph (tests/test_blockem.py checks the weights match)
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        save_strategy="steps" if cfg.save_every else "no",
        save_steps=cfg.save_every or 500,
        logging_steps=1,
        report_to="none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        disable_tqdm=True,  # the steps show on saediff.console's display instead (_EachStep)
        remove_unused_columns=False,
        use_cpu=device.type == "cpu",
        dataloader_num_workers=0,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
    )


def finetune(
    model: torch.nn.Module,
    tokenizer,
    dataset,
    cfg: FinetuneConfig,
    out: str | Path,
    *,
    extra: _Penalty | None = None,
    callbacks: list | None = None,
    resume: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Train ``model`` (from ``make_trainable``) in place on a ``ChatDataset``; returns the log per
    step (``step``, ``loss``, ``penalty`` when ``extra`` is given, ``learning_rate``).

    Checkpoints go to ``out/checkpoints`` every ``cfg.save_every`` steps; ``resume`` continues from
    the newest one (optimizer, scheduler, RNG and data order restored by the Trainer), so an
    interrupted run ends where an uninterrupted one would. Runs under ``accelerate launch`` /
    ``torchrun`` as data-parallel training without changes.
    """
    from saediff.data.chat_data import ChatCollator

    out = Path(out)
    device = next(model.parameters()).device
    # the model's own forwards (the fine-tune's steps, and its evaluations after) run at the
    # fine-tune's precision, whatever precision it was loaded at
    precision = finetune_precision(cfg, model, device)
    set_precision(model, precision)
    if precision == "bf16" and cfg.method == "lora":
        frozen_linears_to_bf16(model)
    ckpt_dir = out / "checkpoints"
    args = _training_args(cfg, ckpt_dir, device, precision)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    saves_tokenizer = hasattr(tokenizer, "save_pretrained")  # checkpoints then load as model folders
    trainer = ChatTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=ChatCollator(pad),
        processing_class=tokenizer if saves_tokenizer else None,
        extra=extra,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # library code does not print; the log is returned
    found = checkpoints(ckpt_dir) if resume else []
    first, start = found[-1] if found else (0, None)
    if start is not None:
        log.info("resuming fine-tune %s from step %d", out, first)
    shown = progress and trainer.is_world_process_zero()
    with console.task(cfg.steps, desc=f"fine-tune {out.name}", enabled=shown) as advance:
        advance(first)
        trainer.add_callback(_EachStep(advance))
        trainer.train(resume_from_checkpoint=str(start) if start else None)
    model.eval()
    return [
        {"step": h["step"], **{k: h[k] for k in ("loss", "penalty", "learning_rate") if k in h}}
        for h in trainer.state.log_history
        if "loss" in h
    ]
