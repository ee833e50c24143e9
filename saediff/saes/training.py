"""Sparse autoencoders: train on an activation store (saved and loaded by ``saes.loading``, measured
by ``saes.metrics``; one step's tensors and loss live in ``saes.training_step``).

saediff trains with its own loop (faster than SAELens's trainer on the same data, see
``bench/sae_train.py``) but every SAE it returns or saves is a SAELens ``SAE`` object / folder
(``cfg.json`` + ``sae_weights.safetensors``), so SAELens, saediff and other tools read the same files.

Architectures:
- ``topk``: TopK activation with the AuxK dead-latent loss (OpenAI, Gao et al. 2024);
- ``relu``: ReLU with an L1 penalty on activations (decoder rows kept at unit norm);
- ``batchtopk``: top ``k * batch`` activations across the batch while training, saved as a
  JumpReLU SAE whose threshold is the running mean of the smallest kept activation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from jaxtyping import Float

from saediff import _io, console
from saediff.errors import SaediffError
from saediff.saes.training_step import SAEParams, StepOut, batchtopk_step, relu_step, topk_step_loss

__all__ = ["SAETrainConfig", "init_distributed", "to_saelens", "train_sae"]

log = logging.getLogger(__name__)
Arch = Literal["topk", "relu", "batchtopk"]
Kernel = Literal["auto", "dense", "sparse_decode", "sparse", "fused"]
KERNELS = ("dense", "sparse_decode", "sparse", "fused")


@dataclass(frozen=True)
class SAETrainConfig:
    arch: Arch = "topk"
    """topk | relu | batchtopk"""
    d_sae: int = 256
    """number of latents"""
    k: int = 8
    """active latents per token (topk, batchtopk)"""
    l1_coefficient: float = 3.0
    """L1 penalty (relu), on activations with unit-norm decoder rows; warmed up linearly"""
    steps: int = 3000
    batch_size: int = 1024
    lr: float = 2e-3
    warmup_steps: int = 50
    decay_fraction: float = 0.2
    """last fraction of steps with linear lr decay to 0"""
    aux_k: int | None = None
    """latents the AuxK loss revives per token (default: d_in // 2)"""
    aux_coefficient: float = 1 / 32
    dead_tokens: int = 20_000
    """a latent that has not fired for this many training tokens counts as dead"""
    kernel: Kernel = "sparse_decode"
    """how a TopK step computes: ``dense`` (the reference: codes scattered into a (B, d_sae)
    matrix, autograd through dense matmuls), ``sparse_decode`` (the decoder an ``embedding_bag``
    over the k active rows), ``sparse`` (that, and the encoder's backward only at the selected
    latents, ``_TopKEncode``), ``fused`` (loss and gradients in one hand-written function after
    the encoder's matmul, a grouped top-k, fused Adam; ``saes.topk_fused``: the fastest on a CPU);
    ``auto``: whichever trains fastest on this device and shape, timed on the first batch
    (``history["kernel"]`` says which ran; bench/sae_decode.py). All agree to float rounding, but
    a TopK run amplifies rounding, so the default is one fixed path: the same run gives the same
    SAE on every machine."""
    autocast: bool = False
    """bf16: autocast over the step (GPU); with ``kernel="fused"`` (CPU or GPU) the encoder's matmul
    runs in bf16 and only selects the latents, whose codes, loss and gradients stay float32"""
    compile: bool = False
    """``torch.compile`` the training step (GPU)"""
    device: str = "auto"
    seed: int = 0

    def __post_init__(self):
        if self.arch not in ("topk", "relu", "batchtopk"):
            raise SaediffError(f"SAETrainConfig.arch must be topk, relu or batchtopk, got {self.arch!r}")
        if self.kernel not in ("auto", *KERNELS):
            raise SaediffError(
                f"SAETrainConfig.kernel must be auto, {', '.join(KERNELS)}, got {self.kernel!r}"
            )
        if self.arch != "relu" and not 0 < self.k <= self.d_sae:
            raise SaediffError(f"SAETrainConfig: k={self.k} must lie in [1, d_sae={self.d_sae}]")
        if self.steps < 1 or self.batch_size < 1:
            raise SaediffError("SAETrainConfig: steps and batch_size must be >= 1")


def _lr_factor(cfg: SAETrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_start = int(cfg.steps * (1 - cfg.decay_fraction))
    if step >= decay_start:
        return max(0.0, (cfg.steps - step) / max(1, cfg.steps - decay_start))
    return 1.0


def _device(cfg: SAETrainConfig) -> torch.device:
    if cfg.device != "auto":
        return torch.device(cfg.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# one recipe (set up, resume, the step loop) whose order decides the weights: a reader wants it whole
# long: its signature and docstring; the code itself is 59 lines
def train_sae(
    batches: Iterator[Float[torch.Tensor, "batch d_in"]] | Float[torch.Tensor, "n d_in"],
    cfg: SAETrainConfig,
    *,
    hook_name: str = "",
    model_name: str = "",
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    callback: Callable[[int, SAEParams], None] | None = None,
) -> tuple[object, dict]:
    """Train an SAE; returns (SAELens SAE, history dict with per-step loss, mse, dead fraction).

    ``batches`` is an iterator of (batch, d_in) activations (``ActivationStore.stream``) or one
    (n, d_in) tensor, which is shuffled into batches here. With ``checkpoint_dir`` and
    ``checkpoint_every`` the full training state (weights, Adam, schedule, dead-latent clocks,
    history) is saved every N steps; ``resume`` continues from it, skipping the batches already
    used, so a resumed run ends with the weights of an uninterrupted one (same batch order).
    ``callback(steps_done, params)`` runs after each step (e.g. a benchmark's held-out FVU).
    """
    batches = _as_batches(batches, cfg)
    device = _device(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    first = next(batches).float()
    d_in = first.shape[1]
    p = SAEParams(d_in, cfg.d_sae)
    dist = _Dist(cfg)
    p.init_from(dist.global_rows_mean(first)[None], gen)  # b_dec: the (global) first-batch mean, as (1, d)
    p.to(device)
    var = dist.global_variance(first)
    last_fired = torch.zeros(cfg.d_sae, dtype=torch.long, device=device)
    aux_k = cfg.aux_k or max(1, d_in // 2)
    step_fn = torch.compile(topk_step_loss) if cfg.compile else topk_step_loss
    hist = {"loss": [], "fvu": [], "dead_fraction": []}
    tokens, start = 0, 0
    ckpt = Path(checkpoint_dir) / "train_state.pt" if checkpoint_dir else None
    made_by = _run_fingerprint(cfg, first, dist.world)
    state = _resume_state(ckpt, made_by, device) if resume and ckpt is not None and ckpt.exists() else None
    # a resumed run keeps the path it chose
    kernel = cfg.kernel if state is None else state["hist"].get("kernel", cfg.kernel)
    if cfg.arch == "topk" and kernel == "auto":
        kernel = _fastest_kernel(p, first.to(device), cfg, var, aux_k, dist)
    # the fused kernel's Adam is fused too (one pass over the weights; its rounding differs from the
    # default loop's, which stays as it was so the default path trains the same SAE as before)
    opt = torch.optim.Adam(p.parameters(), lr=cfg.lr, betas=(0.9, 0.999), fused=kernel == "fused" or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(cfg, s))
    if state is not None:
        tokens, start, var, hist = _resume(state, ckpt, p, opt, sched, last_fired, batches)
    hist["kernel"] = kernel if cfg.arch == "topk" else None
    x = first
    for step in console.progress(range(start, cfg.steps), desc=f"sae {cfg.arch}", enabled=progress):
        if step > 0:
            x = next(batches).float()
        x = x.to(device, non_blocking=True)
        out = _step_loss(p, x, cfg, step, var, tokens, last_fired, step_fn, aux_k, kernel, device)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        dist.average_gradients(p)
        opt.step()
        sched.step()
        p.normalize_decoder()
        tokens += x.shape[0] * dist.world
        last_fired[dist.any_rank(out.fired_S)] = tokens
        if step % 10 == 0 or step == cfg.steps - 1:
            hist["loss"].append(out.loss.item())
            hist["fvu"].append(out.mse.item() / var)
            hist["dead_fraction"].append(float(((tokens - last_fired) > cfg.dead_tokens).float().mean()))
        if callback is not None:
            callback(step + 1, p)
        if (
            ckpt is not None
            and checkpoint_every
            and (step + 1) % checkpoint_every == 0
            and step + 1 < cfg.steps
        ):
            if dist.rank == 0:
                _save_state(ckpt, p, opt, sched, last_fired, tokens, step + 1, var, hist, made_by)
    sae = to_saelens(p.cpu(), cfg, hook_name=hook_name, model_name=model_name)
    return sae, hist


def _as_batches(batches, cfg: SAETrainConfig) -> Iterator[torch.Tensor]:
    """``batches`` as an iterator of (batch, d_in) tensors: one (n, d_in) tensor is shuffled into
    batches (seeded by ``cfg.seed``)."""
    if isinstance(batches, torch.Tensor):
        data = batches
        if data.ndim != 2 or data.shape[0] < cfg.batch_size:
            raise SaediffError(
                f"train_sae: activations of shape {tuple(data.shape)}; need (n >= batch_size, d_in)"
            )
        from saediff.activations.store import shuffled_batches

        batches = shuffled_batches(data, cfg.batch_size, seed=cfg.seed)
    return batches


def _step_loss(
    p: SAEParams,
    x: torch.Tensor,
    cfg: SAETrainConfig,
    step: int,
    var: float,
    tokens: int,
    last_fired: torch.Tensor,
    step_fn,
    aux_k: int,
    kernel: str,
    device: torch.device,
) -> StepOut:
    """The loss of step ``step`` on the batch ``x`` (B, d_in) under ``cfg.arch`` (TopK: the latents
    silent for ``cfg.dead_tokens`` tokens count as dead; ReLU: the L1 weight warmed up over the
    first tenth of the steps; BatchTopK: its threshold's running mean updated)."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.autocast):
        if cfg.arch == "topk":
            dead = (tokens - last_fired) > cfg.dead_tokens
            return step_fn(p, x, cfg.k, var, dead, aux_k, cfg.aux_coefficient, kernel, cfg.autocast)
        if cfg.arch == "relu":
            l1 = cfg.l1_coefficient * min(1.0, (step + 1) / max(1, cfg.steps // 10))
            return relu_step(p, x, l1, var)
        out, kept_min = batchtopk_step(p, x, cfg.k, var)
        if step == 0:
            p.threshold.copy_(kept_min)
        else:
            p.threshold.mul_(0.99).add_(0.01 * kept_min.float())
        return out


def _resume(
    state: dict, ckpt: Path, p: SAEParams, opt, sched, last_fired: torch.Tensor, batches
) -> tuple[int, int, float, dict]:
    """The saved training ``state`` of this run (``_resume_state``, read from ``ckpt``) loaded into
    ``p``, ``opt``, ``sched`` and ``last_fired``, the batches already used skipped; (tokens, step,
    variance, history)."""
    p.load_state_dict(state["params"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    last_fired.copy_(state["last_fired"])
    tokens, start, var, hist = (
        int(state["tokens"]),
        int(state["step"]),
        float(state["var"]),
        state["hist"],
    )
    for _ in range(start - 1):  # the first batch was read above
        next(batches)
    log.info("sae: resumed at step %d from %s", start, ckpt)
    return tokens, start, var, hist


def _save_state(
    ckpt: Path,
    p: SAEParams,
    opt,
    sched,
    last_fired,
    tokens: int,
    step: int,
    var: float,
    hist: dict,
    made_by: dict,
) -> None:
    """The full training state after ``step`` steps to ``ckpt`` (atomically)."""
    state = {
        "params": p.state_dict(),
        "opt": opt.state_dict(),
        "sched": sched.state_dict(),
        "last_fired": last_fired,
        "tokens": tokens,
        "step": step,
        "var": var,
        "hist": hist,
        "provenance": json.dumps(made_by),
    }
    _io.atomic_write_bytes(ckpt, _torch_bytes(state))


def _fastest_kernel(
    p: SAEParams, x_BD: torch.Tensor, cfg: SAETrainConfig, var: float, aux_k: int, dist
) -> str:
    """The ``KERNELS`` entry that trains fastest here: three forward and backward passes of each
    on the first batch (some latents marked dead, so the AuxK term runs), twice, interleaved, best
    time each (nothing is stepped; the gradients are dropped). Under ``torchrun`` rank 0's choice
    is every rank's, so all run the same path."""
    import time

    dead = torch.zeros(cfg.d_sae, dtype=torch.bool, device=x_BD.device)
    dead[:: max(2, cfg.d_sae // 64)] = True
    sync = torch.cuda.synchronize if x_BD.device.type == "cuda" else (lambda: None)
    best = {k: float("inf") for k in KERNELS}
    for kernel in KERNELS * 3:  # the first round warms each up
        sync()
        t = time.perf_counter()
        for _ in range(3):
            with torch.autocast(x_BD.device.type, dtype=torch.bfloat16, enabled=cfg.autocast):
                out = topk_step_loss(
                    p, x_BD, cfg.k, var, dead, aux_k, cfg.aux_coefficient, kernel, cfg.autocast
                )
            out.loss.backward()
        sync()
        best[kernel] = min(best[kernel], time.perf_counter() - t)
    p.zero_grad(set_to_none=True)
    choice = torch.tensor([KERNELS.index(min(best, key=best.get))], device=x_BD.device)
    if dist.on:
        import torch.distributed as td

        td.broadcast(choice, 0)
    kernel = KERNELS[int(choice.item())]
    log.info(
        "sae: %s kernel (%s ms per 3 steps)",
        kernel,
        ", ".join(f"{k} {1000 * v:.1f}" for k, v in best.items()),
    )
    return kernel


def _run_fingerprint(cfg: SAETrainConfig, first: torch.Tensor, world: int) -> dict:
    """What a training checkpoint belongs to: the settings (not the device, which may change on
    resume), the number of ranks, and the first batch this rank read (the data and its order)."""
    from saediff.models.provenance import tensor_digest

    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("device", "compile")}
    return {
        "settings": settings,
        "world": world,
        "d_in": int(first.shape[1]),
        "first_batch": tensor_digest(first),
    }


def _resume_state(ckpt: Path, made_by: dict, device) -> dict:
    """The saved training state, if it is this run's (same settings, ranks and data), else one line."""
    from saediff.models.provenance import mismatch

    state = torch.load(ckpt, map_location=device, weights_only=True)  # tensors and plain values only
    why = mismatch(json.loads(state["provenance"]) if "provenance" in state else None, made_by)
    if why is not None:
        raise SaediffError(
            f"{ckpt} is the checkpoint of another SAE training run ({why}); delete it, or train "
            f"without --resume"
        )
    return state


class _Dist:
    """Data parallelism under ``torchrun``: every rank trains on its own batches, gradients are
    averaged, and what depends on the whole batch (the first batch's mean and variance, which
    latents fired) is reduced across ranks, so W ranks of batch B train as one process on the
    concatenated W x B batches. A no-op in a single process."""

    def __init__(self, cfg: SAETrainConfig):
        import torch.distributed as td

        self.td = td
        self.on = td.is_available() and td.is_initialized() and td.get_world_size() > 1
        self.world = td.get_world_size() if self.on else 1
        self.rank = td.get_rank() if self.on else 0
        if self.on and cfg.arch == "batchtopk":
            raise SaediffError("batchtopk picks its top k over the whole batch: train it in one process")

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.on:
            self.td.all_reduce(t)
        return t

    def global_rows_mean(self, x: torch.Tensor) -> torch.Tensor:
        if not self.on:  # bit for bit what a single process always computed (SAE training is chaotic)
            return x.float().mean(0)
        return self._sum(x.float().sum(0)) / (x.shape[0] * self.world)

    def global_variance(self, x: torch.Tensor) -> float:
        if not self.on:
            return float((x.float() - x.float().mean(0)).pow(2).sum(-1).mean())
        mean = self.global_rows_mean(x)
        return float(self._sum((x.float() - mean).pow(2).sum(-1).sum()[None])[0] / (x.shape[0] * self.world))

    def average_gradients(self, p: torch.nn.Module) -> None:
        if self.on:
            for t in p.parameters():
                if t.grad is not None:
                    self.td.all_reduce(t.grad)
                    t.grad.div_(self.world)

    def any_rank(self, fired: torch.Tensor) -> torch.Tensor:
        return self._sum(fired.to(torch.int32)) > 0 if self.on else fired


def _torch_bytes(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def to_saelens(p: SAEParams, cfg: SAETrainConfig, *, hook_name: str = "", model_name: str = ""):
    """The SAELens SAE object holding ``p``'s weights (TopKSAE, StandardSAE or JumpReLUSAE)."""
    from sae_lens import (
        JumpReLUSAE,
        JumpReLUSAEConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
    )
    from sae_lens.saes.sae import SAEMetadata

    d_in, d_sae = p.W_enc.shape
    meta = SAEMetadata(hook_name=hook_name, model_name=model_name)
    state = {k: v.detach().clone() for k, v in p.state_dict().items() if k != "threshold"}
    if cfg.arch == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=cfg.k, metadata=meta))
    elif cfg.arch == "relu":
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=meta))
    else:
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, metadata=meta))
        state["threshold"] = torch.full((d_sae,), float(p.threshold))
    sae.load_state_dict(state)
    return sae.eval()


def init_distributed(device: str) -> tuple[int, int]:
    """(rank, world size) of data-parallel SAE training: under ``torchrun`` the process group (gloo
    on CPU, nccl on GPU, each rank on its own GPU), else (0, 1)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    import torch.distributed as td

    if not td.is_initialized():
        gpu = device != "cpu" and torch.cuda.is_available()
        if gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        td.init_process_group("nccl" if gpu else "gloo")
    return td.get_rank(), td.get_world_size()
