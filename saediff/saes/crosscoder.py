"""Crosscoders: one sparse dictionary over two models' activations at the same hook, a decoder per
model (Lindsey et al. 2024), trained with BatchTopK and read with latent scaling after Minder et
al. 2025 ("Overcoming sparsity artifacts in crosscoders to interpret chat-tuning"), the method of
the science-of-finetuning diffing-toolkit.

A latent's code comes from both models' activations of the same token; it has a decoder row for
the base model and one for the fine-tune. A latent whose base decoder is near zero is a
*fine-tune-only* candidate, but the L1/TopK pressure manufactures such latents (a shared concept
the base model also has, written only into the fine-tune's decoder): latent scaling asks how much
of the fine-tune decoder's direction the base model's reconstruction (``nu_r``) and its
reconstruction error (``nu_eps``) really carry. Low ``nu_eps`` and low ``nu_r``: truly new.

Training (``train_crosscoder``): each model's activations are scaled by one number so that their
mean squared norm is ``d_in``; the encoder sums both models' projections; BatchTopK keeps the top
``k x batch`` scores (activation x the sum of the latent's two decoder norms) of a batch, with k
annealed from ``k_start``; the loss is both models' squared error over their summed variance, plus
AuxK on latents dead for ``dead_tokens`` tokens. Inference thresholds the score at the running
mean of the smallest kept score (a JumpReLU, as the ``batchtopk`` SAEs of ``saes.py``).

A crosscoder is a folder: ``cfg.json`` (``kind: saediff.crosscoder``, ``d_in``, ``d_sae``, ``k``,
``hook_name``, ``models`` [base, fine-tune], ``norm_scale`` [base, fine-tune], ``threshold``,
``train``: the settings) and ``crosscoder.safetensors`` (``W_enc`` (2, d_in, d_sae), ``b_enc``
(d_sae), ``W_dec`` (d_sae, 2, d_in), ``b_dec`` (2, d_in)), index 0 the base model.

    saediff crosscoder train --base M --adapter A --prompts P --hook blocks.15.hook_resid_post --out CC
    saediff crosscoder diff CC --base M --adapter A --prompts P --out RUN
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from jaxtyping import Float

from saediff import _io, console
from saediff.errors import MissingFileError, SaediffError

__all__ = [
    "CLASSES",
    "KIND",
    "WEIGHTS",
    "Crosscoder",
    "CrosscoderConfig",
    "check_crosscoder_folder",
    "check_crosscoder_out",
    "class_counts",
    "crosscoder_from_models",
    "crosscoder_metrics",
    "decoder_norm_table",
    "load_crosscoder",
    "save_crosscoder",
    "train_crosscoder",
]

log = logging.getLogger(__name__)
KIND = "saediff.crosscoder"
WEIGHTS = "crosscoder.safetensors"
CLASSES = ("ft_only", "base_only", "shared", "other", "dead")
"""``decoder_norm_table`` classes: rel_norm < 0.1, > 0.9, in [0.4, 0.6], the rest, never fired"""


@dataclass(frozen=True)
class CrosscoderConfig:
    d_sae: int = 1024
    """latents (the diffing-toolkit's EM crosscoder: 32 x d_in)"""
    k: int = 32
    """active latents per token on average at the end of training (BatchTopK over the batch)"""
    k_start: int | None = None
    """anneal k linearly from this value down to ``k`` over ``anneal_steps`` (diffing-toolkit: 1024
    -> 100 over 2000 steps); None: ``k`` throughout"""
    anneal_steps: int = 0
    steps: int = 3000
    batch_size: int = 1024
    lr: float = 1e-3
    warmup_steps: int = 50
    decay_fraction: float = 0.2
    """last fraction of steps with linear lr decay to 0"""
    aux_k: int | None = None
    """dead latents the AuxK loss reads per token (default: d_in // 2)"""
    aux_coefficient: float = 1 / 32
    dead_tokens: int = 20_000
    """a latent that has not fired for this many training tokens counts as dead"""
    device: str = "auto"
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.k <= self.d_sae:
            raise SaediffError(f"CrosscoderConfig: k={self.k} must lie in [1, d_sae={self.d_sae}]")
        if self.k_start is not None and not self.k <= self.k_start <= self.d_sae:
            raise SaediffError(
                f"CrosscoderConfig: k_start={self.k_start} must lie in [k={self.k}, d_sae={self.d_sae}]"
            )
        if self.steps < 1 or self.batch_size < 1:
            raise SaediffError("CrosscoderConfig: steps and batch_size must be >= 1")

    def k_at(self, step: int) -> int:
        """k at a training step (the annealing schedule)."""
        if self.k_start is None or step >= self.anneal_steps:
            return self.k
        return round(self.k_start + (self.k - self.k_start) * step / max(1, self.anneal_steps))


class Crosscoder(torch.nn.Module):
    """The weights (index 0 of the model axis M is the base model) and what reading them needs."""

    def __init__(
        self, d_in: int, d_sae: int, k: int = 32, hook_name: str = "", models: tuple[str, str] = ("", "")
    ):
        super().__init__()
        self.W_enc = torch.nn.Parameter(torch.empty(2, d_in, d_sae))  # (M, D, S)
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))  # (S,)
        self.W_dec = torch.nn.Parameter(torch.empty(d_sae, 2, d_in))  # (S, M, D)
        self.b_dec = torch.nn.Parameter(torch.zeros(2, d_in))  # (M, D)
        self.register_buffer("norm_scale", torch.ones(2))
        """each model's activations are multiplied by this before encoding"""
        self.register_buffer("threshold", torch.zeros(()))
        """inference: a latent is active where its score (activation x decoder norms) exceeds this"""
        self.k, self.hook_name, self.models = k, hook_name, tuple(models)
        self.train_settings: dict = {}

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[2]

    def scaled(self, x_BMD: Float[torch.Tensor, "batch 2 d_in"]) -> Float[torch.Tensor, "batch 2 d_in"]:
        """Raw activations in the space the crosscoder reconstructs (each model's scale applied)."""
        return x_BMD.to(self.W_enc.dtype) * self.norm_scale[:, None]

    def pre_acts(self, x_BMD: torch.Tensor) -> Float[torch.Tensor, "batch d_sae"]:
        """ReLU of the summed encoder projections of both models' (scaled) activations."""
        return self.pre_acts_scaled(self.scaled(x_BMD))

    def pre_acts_scaled(self, xs_BMD: torch.Tensor) -> Float[torch.Tensor, "batch d_sae"]:
        """``pre_acts`` of activations already in the scaled space."""
        return (torch.einsum("bmd,mds->bs", xs_BMD - self.b_dec, self.W_enc) + self.b_enc).relu()

    def dec_norms(self) -> Float[torch.Tensor, "d_sae 2"]:
        return self.W_dec.norm(dim=2)

    @torch.no_grad()
    def encode(self, x_BMD: Float[torch.Tensor, "batch 2 d_in"]) -> Float[torch.Tensor, "batch d_sae"]:
        """Latent codes at inference: activations whose score passes ``threshold``."""
        return self.encode_scaled(self.scaled(x_BMD))

    @torch.no_grad()
    def encode_scaled(self, xs_BMD: torch.Tensor) -> Float[torch.Tensor, "batch d_sae"]:
        """``encode`` of activations already in the scaled space."""
        pre = self.pre_acts_scaled(xs_BMD)
        return pre * (pre * self.dec_norms().sum(1) > self.threshold)

    def decode(self, z_BS: Float[torch.Tensor, "batch d_sae"]) -> Float[torch.Tensor, "batch 2 d_in"]:
        """Both models' reconstructions, in the scaled space."""
        return torch.einsum("bs,smd->bmd", z_BS, self.W_dec) + self.b_dec


def _batchtopk(pre_BS: torch.Tensor, norms_S: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, smallest kept score): the top ``k x batch`` scores of the batch kept, the rest zero."""
    score = (pre_BS * norms_S).flatten()
    vals, idx = score.topk(min(k * pre_BS.shape[0], score.numel()), sorted=False)
    mask = torch.zeros_like(score, dtype=torch.bool).scatter_(0, idx, True).view_as(pre_BS) & (pre_BS > 0)
    kept = vals[vals > 0]
    return pre_BS * mask, (kept.min() if kept.numel() else vals.new_zeros(())).detach()


def _step_loss(
    cc: Crosscoder, x_BMD: torch.Tensor, k: int, var: float, dead_S: torch.Tensor, aux_k: int, aux_coef: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, fvu, smallest kept score, fired latents) of one batch of scaled activations."""
    pre = cc.pre_acts_scaled(x_BMD)
    z, kept_min = _batchtopk(pre, cc.dec_norms().sum(1), k)
    err = x_BMD - cc.decode(z)
    fvu = err.pow(2).sum((1, 2)).mean() / var
    loss = fvu
    if aux_coef > 0 and bool(dead_S.any()):
        n_aux = min(aux_k, int(dead_S.sum()))
        vals, idx = pre.masked_fill(~dead_S, 0.0).topk(n_aux, dim=1, sorted=False)
        z_aux = torch.zeros_like(pre).scatter(1, idx, vals)
        recon = torch.einsum("bs,smd->bmd", z_aux, cc.W_dec)
        e = err.detach()
        loss = loss + aux_coef * (e - recon).pow(2).sum((1, 2)).mean() / e.pow(2).sum(
            (1, 2)
        ).mean().clamp_min(1e-12)
    return loss, fvu.detach(), kept_min, (z > 0).any(0)


def train_crosscoder(
    batches: Iterator[Float[torch.Tensor, "batch 2 d_in"]] | Float[torch.Tensor, "n 2 d_in"],
    cfg: CrosscoderConfig,
    *,
    hook_name: str = "",
    models: tuple[str, str] = ("", ""),
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
) -> tuple[Crosscoder, dict]:
    """Train a BatchTopK crosscoder on paired rows (``[:, 0]`` base, ``[:, 1]`` fine-tune: the same
    token in both, ``activations.paired_model_stream``); returns it and the history (per 10 steps:
    loss, FVU, dead fraction, k). One process: BatchTopK ranks the whole batch.

    With ``checkpoint_dir`` and ``checkpoint_every`` the whole training state (weights, Adam, the
    schedule, dead-latent clocks, threshold, history) is saved every N steps; ``resume`` continues
    from it, reading past the batches already used, so a resumed run ends with the crosscoder of an
    uninterrupted one (a live model stream is read again up to there: the models run, nothing trains)."""
    if isinstance(batches, torch.Tensor):
        if batches.ndim != 3 or batches.shape[1] != 2 or batches.shape[0] < cfg.batch_size:
            raise SaediffError(
                f"train_crosscoder: rows of shape {tuple(batches.shape)}; need (n >= batch_size, 2, d_in)"
            )
        from saediff.activations.store import shuffled_batches

        batches = shuffled_batches(batches, cfg.batch_size, seed=cfg.seed)
    from saediff.saes.training import _device, _lr_factor

    device = _device(cfg)
    first = next(batches).float()
    if first.ndim != 3 or first.shape[1] != 2:
        raise SaediffError(f"train_crosscoder: a batch of shape {tuple(first.shape)}; need (batch, 2, d_in)")
    d_in = first.shape[2]
    cc = _initial(first, cfg, hook_name, models)
    cc.to(device)
    x0 = cc.scaled(first.to(device))
    var = float((x0 - x0.mean(0)).pow(2).sum((1, 2)).mean())
    opt = torch.optim.Adam([cc.W_enc, cc.b_enc, cc.W_dec, cc.b_dec], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(cfg, s))
    last_fired = torch.zeros(cfg.d_sae, dtype=torch.long, device=device)
    aux_k = cfg.aux_k or max(1, d_in // 2)
    hist: dict = {"loss": [], "fvu": [], "dead_fraction": [], "k": []}
    tokens, x, thr_started, start = 0, first, False, 0
    ckpt = Path(checkpoint_dir) / "train_state.pt" if checkpoint_dir else None
    made_by = _train_fingerprint(cfg, first)
    if resume and ckpt is not None and ckpt.exists():
        state = _load_state(ckpt, made_by, device)
        cc.load_state_dict(state["params"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        last_fired.copy_(state["last_fired"])
        tokens, start, var, hist = (
            int(state["tokens"]),
            int(state["step"]),
            float(state["var"]),
            state["hist"],
        )
        thr_started = bool(state["thr_started"])
        for _ in range(start - 1):  # the first batch was read above
            next(batches)
        log.info("crosscoder: resumed at step %d from %s", start, ckpt)
    for step in console.progress(range(start, cfg.steps), desc="crosscoder", enabled=progress):
        if step > 0:
            x = next(batches).float()
        xs = cc.scaled(x.to(device, non_blocking=True))
        k = cfg.k_at(step)
        dead = (tokens - last_fired) > cfg.dead_tokens
        loss, fvu, kept_min, fired = _step_loss(cc, xs, k, var, dead, aux_k, cfg.aux_coefficient)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            if k == cfg.k:  # the threshold belongs to the final k: a running mean from its first step on
                cc.threshold.copy_(0.99 * cc.threshold + 0.01 * kept_min if thr_started else kept_min)
                thr_started = True
        tokens += x.shape[0]
        last_fired[fired] = tokens
        if step % 10 == 0 or step == cfg.steps - 1:
            hist["loss"].append(float(loss.detach()))
            hist["fvu"].append(float(fvu))
            hist["dead_fraction"].append(float(((tokens - last_fired) > cfg.dead_tokens).float().mean()))
            hist["k"].append(k)
        if (
            ckpt is not None
            and checkpoint_every
            and (step + 1) % checkpoint_every == 0
            and step + 1 < cfg.steps
        ):
            state = {"params": cc.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
            state |= {"last_fired": last_fired, "tokens": tokens, "step": step + 1, "var": var}
            state |= {"hist": hist, "thr_started": thr_started, "provenance": json.dumps(made_by)}
            _save_state(ckpt, state)
    cc.train_settings = {key: v for key, v in asdict(cfg).items() if key != "device"}
    return cc.cpu().eval(), hist


def _train_fingerprint(cfg: CrosscoderConfig, first: torch.Tensor) -> dict:
    """What a training checkpoint belongs to: the settings (not the device) and the first batch
    (the data and its order)."""
    from saediff.models.provenance import tensor_digest

    settings = {k: v for k, v in asdict(cfg).items() if k != "device"}
    return {"settings": settings, "d_in": int(first.shape[2]), "first_batch": tensor_digest(first)}


def _save_state(ckpt: Path, state: dict) -> None:
    from saediff.saes.training import _torch_bytes

    ckpt.parent.mkdir(parents=True, exist_ok=True)
    _io.atomic_write_bytes(ckpt, _torch_bytes(state))


def _load_state(ckpt: Path, made_by: dict, device) -> dict:
    """The saved state, if it is this run's (same settings and data), else one line."""
    from saediff.models.provenance import mismatch

    state = torch.load(ckpt, map_location=device, weights_only=True)  # tensors and plain values only
    why = mismatch(json.loads(state["provenance"]), made_by)
    if why is not None:
        raise SaediffError(
            f"{ckpt} is the checkpoint of another crosscoder training run ({why}); delete it, or train "
            "without --resume"
        )
    return state


def _initial(
    first: torch.Tensor, cfg: CrosscoderConfig, hook_name: str, models: tuple[str, str]
) -> Crosscoder:
    """A crosscoder initialised from the first batch (B, 2, d_in): each model's norm scale, seeded
    random decoder rows at norm 1/sqrt(2) per model, the encoder their transpose, ``b_dec`` the
    scaled batch mean."""
    d_in = first.shape[2]
    cc = Crosscoder(d_in, cfg.d_sae, cfg.k, hook_name, models)
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        cc.norm_scale.copy_((d_in / first.pow(2).sum(2).mean(0)).sqrt())
        W = torch.randn(cfg.d_sae, 2, d_in, generator=gen)
        cc.W_dec.copy_(W / W.norm(dim=2, keepdim=True) / math.sqrt(2))  # each model's row at norm 1/sqrt(2)
        cc.W_enc.copy_(cc.W_dec.permute(1, 2, 0))
        cc.b_dec.copy_((first * cc.norm_scale[:, None]).mean(0))
    return cc


def save_crosscoder(cc: Crosscoder, path: str | Path, extra: dict | None = None) -> Path:
    """Write the folder (``cfg.json`` + ``crosscoder.safetensors``) through a temporary folder and
    a rename; a folder that holds anything but a crosscoder is never replaced."""
    from saediff import __version__

    path = Path(path)
    check_crosscoder_out(path)
    cfg = {
        "kind": KIND,
        "saediff_version": __version__,
        "d_in": cc.d_in,
        "d_sae": cc.d_sae,
        "k": cc.k,
        "hook_name": cc.hook_name,
        "models": list(cc.models),
        "norm_scale": cc.norm_scale.tolist(),
        "threshold": float(cc.threshold),
        "train": cc.train_settings,
        **(extra or {}),
    }
    tensors = {n: getattr(cc, n).detach().cpu().contiguous() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}

    def write(tmp: Path) -> None:
        _io.atomic_save_safetensors(tensors, tmp / WEIGHTS)
        _io.atomic_write_json(tmp / "cfg.json", cfg)

    _io.replace_folder(path, write)
    return path


def load_crosscoder(path: str | Path, device: str = "cpu") -> Crosscoder:
    """A crosscoder folder as written by ``save_crosscoder`` (unknown cfg keys are ignored)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "cfg.json").is_file() or not (path / WEIGHTS).is_file():
        raise MissingFileError(f"{path} is not a crosscoder folder (cfg.json + {WEIGHTS})")
    cfg = json.loads((path / "cfg.json").read_text())
    if cfg.get("kind") != KIND:
        raise SaediffError(f"{path}/cfg.json: kind {cfg.get('kind')!r}, expected {KIND!r}")
    w = load_file(str(path / WEIGHTS))
    want = {
        "W_enc": (2, cfg["d_in"], cfg["d_sae"]),
        "b_enc": (cfg["d_sae"],),
        "W_dec": (cfg["d_sae"], 2, cfg["d_in"]),
        "b_dec": (2, cfg["d_in"]),
    }
    for name, shape in want.items():
        if name not in w or tuple(w[name].shape) != shape:
            got = tuple(w[name].shape) if name in w else "missing"
            raise SaediffError(f"{path}/{WEIGHTS}: {name} is {got}, cfg.json says {shape}")
    cc = Crosscoder(
        cfg["d_in"],
        cfg["d_sae"],
        cfg.get("k", 32),
        cfg.get("hook_name", ""),
        tuple(cfg.get("models", ("", ""))),
    )
    with torch.no_grad():
        for name in want:
            getattr(cc, name).copy_(w[name])
        cc.norm_scale.copy_(torch.tensor(cfg.get("norm_scale", [1.0, 1.0])))
        cc.threshold.fill_(float(cfg.get("threshold", 0.0)))
    cc.train_settings = cfg.get("train", {})
    return cc.to(device).eval()


def decoder_norm_table(cc: Crosscoder, fired: torch.Tensor | None = None) -> dict[str, torch.Tensor | list]:
    """Per latent: both decoder norms, ``rel_norm`` = 0.5 (|d_base| - |d_ft|) / max(|d_base|, |d_ft|)
    + 0.5 (Minder et al.'s Delta_norm: 0 fine-tune-only, 1 base-only, 0.5 shared), the cosine of
    the two decoder rows, and a class from ``CLASSES`` (``dead`` where ``fired`` is 0)."""
    n = cc.dec_norms().detach().float()  # (S, 2)
    rel = 0.5 * (n[:, 0] - n[:, 1]) / n.max(1).values.clamp_min(1e-12) + 0.5
    cos = torch.nn.functional.cosine_similarity(
        cc.W_dec[:, 0].detach().float(), cc.W_dec[:, 1].detach().float(), dim=1
    )
    cls = [
        "ft_only" if r < 0.1 else "base_only" if r > 0.9 else "shared" if 0.4 <= r <= 0.6 else "other"
        for r in rel.tolist()
    ]
    if fired is not None:
        cls = ["dead" if f == 0 else c for c, f in zip(cls, fired.tolist())]
    return {"norm_base": n[:, 0], "norm_ft": n[:, 1], "rel_norm": rel, "cosine": cos, "class": cls}


@torch.no_grad()
def crosscoder_metrics(cc: Crosscoder, held_N2D: Float[torch.Tensor, "n 2 d_in"], chunk: int = 4096) -> dict:
    """On held-out paired rows: FVU of each model and of both, mean L0, the share of latents that
    never fire on them, and how many latents fall in each ``decoder_norm_table`` class."""
    fired = torch.zeros(cc.d_sae, dtype=torch.long)
    sq = torch.zeros(2, dtype=torch.float64)
    l0 = 0.0
    xs = cc.scaled(held_N2D)
    var = (xs - xs.mean(0)).pow(2).sum(2).sum(0).double()  # (2,)
    for i in range(0, held_N2D.shape[0], chunk):
        z = cc.encode_scaled(xs[i : i + chunk])
        sq += (xs[i : i + chunk] - cc.decode(z)).pow(2).sum(2).sum(0).double()
        fired += (z > 0).sum(0)
        l0 += float((z > 0).sum())
    n = held_N2D.shape[0]
    return {
        "fvu_base": float(sq[0] / var[0]),
        "fvu_ft": float(sq[1] / var[1]),
        "fvu": float(sq.sum() / var.sum()),
        "l0": l0 / n,
        "dead_fraction": float((fired == 0).float().mean()),
        "held_rows": n,
        "classes": class_counts(decoder_norm_table(cc, fired)["class"]),
    }


def class_counts(classes: list[str]) -> dict[str, int]:
    """How many latents fall in each of ``CLASSES``."""
    return {c: classes.count(c) for c in CLASSES}


def check_crosscoder_folder(path: str | Path, shape=None) -> dict:
    """A crosscoder folder's ``cfg.json``, checked without reading its weights: the files exist, its
    ``kind`` is a crosscoder's, and against the models (``shape``, a
    ``saediff.models.validate.ModelShape``; None: not checked) its hook and ``d_in`` fit."""
    from saediff.models.validate import check_hook, read_json_file

    path = Path(path)
    if not (path / "cfg.json").is_file() or not (path / WEIGHTS).is_file():
        raise MissingFileError(f"{path} is not a crosscoder folder (cfg.json + {WEIGHTS})")
    cfg = read_json_file(path / "cfg.json", "crosscoder config")
    if cfg.get("kind") != KIND:
        raise SaediffError(f"{path}/cfg.json: kind {cfg.get('kind')!r}, expected {KIND!r}")
    if shape is not None:
        if cfg.get("hook_name"):
            check_hook(cfg["hook_name"], shape, f"crosscoder {path}: its hook")
        if cfg.get("d_in") != shape.d_model:
            raise SaediffError(
                f"crosscoder {path}: d_in {cfg.get('d_in')} does not match the width {shape.d_model} of {shape.source}"
            )
    return cfg


def check_crosscoder_out(path: Path) -> None:
    """Raise one line unless ``path`` may take a crosscoder: missing, empty, or a crosscoder folder."""
    if path.exists() and any(path.iterdir()) and not (path / "cfg.json").exists():
        raise SaediffError(
            f"crosscoder output {path} is not empty and not a crosscoder folder: choose another folder"
        )
    if (path / "cfg.json").exists() and json.loads((path / "cfg.json").read_text()).get("kind") != KIND:
        raise SaediffError(f"crosscoder output {path} holds another kind of folder: choose another folder")


def crosscoder_from_models(
    base: str,
    out: str | Path,
    cfg: CrosscoderConfig,
    prompts: list,
    hook: str,
    *,
    finetuned: str | None = None,
    adapter: str | None = None,
    positions: str = "response",
    buffer_rows: int = 65536,
    prompts_name: str = "",
    progress: bool = True,
    checkpoint_every: int | None = None,
    resume: bool = False,
) -> dict:
    """Train a crosscoder on a base model and its fine-tune read live over ``prompts`` (the last
    tenth held out for the metrics), and save it to ``out``; returns its metrics. With
    ``checkpoint_every`` or ``resume``, the training state lives in ``OUT.ckpt/`` (as ``saediff sae
    train``'s), removed once the crosscoder is saved."""
    from saediff.activations.streams import paired_source
    from saediff.models.loading import load_pair
    from saediff.models.provenance import model_fingerprint

    out = Path(out)
    check_crosscoder_out(out)  # before the models load
    lm_base, lm_ft = load_pair(base, finetuned, adapter)
    src = paired_source(
        lm_base, lm_ft, prompts, hook, positions, f"{base} vs {finetuned or adapter} over {prompts_name}"
    )
    if src.n_train < 2 * cfg.batch_size:  # a small test set: smaller batches rather than a failure
        log.warning(
            "%s has %d training rows: batch size %d instead of %d",
            src.name,
            src.n_train,
            max(1, src.n_train // 2),
            cfg.batch_size,
        )
        cfg = CrosscoderConfig(**{**asdict(cfg), "batch_size": max(1, src.n_train // 2)})
    buffer = max(min(buffer_rows, src.n_train), 2 * cfg.batch_size)  # never more than one pass of the corpus
    batches = src.stream(cfg.batch_size, buffer, cfg.seed, 0, 1)
    ckpt_dir = Path(f"{out}.ckpt") if (checkpoint_every or resume) else None
    cc, hist = train_crosscoder(
        batches,
        cfg,
        hook_name=hook,
        models=(base, finetuned or f"{base} + {adapter}"),
        progress=progress,
        checkpoint_dir=ckpt_dir,
        checkpoint_every=checkpoint_every,
        resume=resume,
    )
    metrics = crosscoder_metrics(cc, src.held)
    made_by = {
        "base": model_fingerprint(lm_base.spec),
        "finetuned": model_fingerprint(lm_ft.spec),
        "prompts": prompts_name,
        "positions": positions,
        "train_rows": src.n_train,
    }
    save_crosscoder(cc, out, {"metrics": metrics, "provenance": made_by, "history": hist})
    if ckpt_dir is not None:
        (ckpt_dir / "train_state.pt").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            ckpt_dir.rmdir()
    return {"out": str(out), **metrics}
