"""BLOCK-EM: fine-tune on the narrow task while chosen SAE latents are held where the base model has them.

Three modes, one config:
- ``penalty``: ``L = L_SFT + lambda * mean_t sum_i ReLU(z_i(theta) - z_i(base))^2`` over the
  positions that hold or predict assistant tokens, for latents meant to stay low (and ``ReLU(z_base - z_theta)^2`` for latents meant to stay
  high). ``z`` are the SAE's ReLU'd pre-activations of the chosen latents by default: a TopK
  output lets a latent escape the penalty by dropping out of the top k (DESIGN.md).
- ``ablate``: the latents are removed in the forward pass, ``x - encode(x)[..., idx] @ W_dec[idx]``,
  with ordinary autograd (not SAELens's no-grad error term);
- ``project``: directions are projected out of the residual during training, after one block or
  after several (concept ablation fine-tuning, CAFT);
- ``steer``: a vector is added to the residual during training (preventative steering, Chen et
  al. 2025: the fine-tune need not move toward what is supplied already), removed at evaluation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float

from saediff.errors import SaediffError
from saediff.models.hooks import (
    add_resid_hook,
    capture_resid,
    decoder_layers,
    first_adapted_block,
    skip_blocks,
)

__all__ = [
    "BlockConfig",
    "Blocker",
    "ablate_latents",
    "check_adapters_reach",
    "latent_codes",
    "latent_penalty",
    "project_out_directions",
]

log = logging.getLogger(__name__)
Mode = Literal["none", "penalty", "ablate", "project", "steer"]


@dataclass(frozen=True)
class BlockConfig:
    mode: Mode = "penalty"
    """none | penalty | ablate | project | steer"""
    layer: int = 1
    """block index of the SAE / directions (``blocks.L.hook_resid_post``)"""
    latents_low: tuple[int, ...] = ()
    """latents that must not rise above the base model (penalty) or are removed (ablate)"""
    latents_high: tuple[int, ...] = ()
    """latents that must not fall below the base model (penalty only)"""
    lam: float = 1000.0
    """penalty weight lambda"""
    preactivation: bool = True
    """penalise ReLU'd pre-activations (True) or the SAE's encoded activations (False)"""

    def __post_init__(self):
        if self.mode not in ("none", "penalty", "ablate", "project", "steer"):
            raise SaediffError(
                f"BlockConfig.mode must be none, penalty, ablate, project or steer, got {self.mode!r}"
            )
        if self.mode in ("penalty", "ablate") and not (self.latents_low or self.latents_high):
            raise SaediffError(f"BlockConfig: mode {self.mode} needs latents")
        if self.lam < 0:
            raise SaediffError("BlockConfig.lam must be >= 0")


def latent_codes(
    sae, x: Float[torch.Tensor, "... d"], idx: list[int], preactivation: bool = True
) -> torch.Tensor:
    """Activations of the latents ``idx`` (..., len(idx)), differentiable in ``x``.

    ``preactivation``: the ReLU of SAELens's own pre-activation of these latents (what its
    ``hook_sae_acts_pre`` holds): the input goes through ``sae.process_sae_in``, so the SAE's
    activation normalisation (``constant_norm_rescale``, ``layer_norm``) and ``b_dec`` subtraction
    apply as in ``encode``; a gated SAE's magnitude path, and with TopK's
    ``rescale_acts_by_decoder_norm`` the pre-activation times the decoder norm (what TopK selects
    on). The TopK selection and the JumpReLU threshold are left out, so a latent that is off still
    has a gradient. Else ``sae.encode(x)``'s values."""
    if not preactivation:
        return sae.encode(x)[..., idx]
    sae_in = sae.process_sae_in(x)
    if hasattr(sae, "r_mag"):  # gated: the magnitude path is the pre-activation SAELens hooks
        pre = sae_in @ (sae.W_enc[:, idx] * sae.r_mag[idx].exp()) + sae.b_mag[idx]
    elif hasattr(sae, "b_enc"):
        pre = sae_in @ sae.W_enc[:, idx] + sae.b_enc[idx]
    else:
        raise SaediffError(
            f"{type(sae).__name__}: no linear encoder (W_enc, b_enc) for pre-activation codes; "
            "use preactivation=False"
        )
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        pre = pre * sae.W_dec[idx].norm(dim=-1)
    return pre.relu()


def check_adapters_reach(first_adapted: int, layer: int) -> None:
    """Refuse a penalty at block ``layer`` when the first adapted block comes after it: nothing
    trained can move the SAE's input, so the penalty is zero and the "blocked" run is the plain one."""
    if first_adapted > layer:
        raise SaediffError(
            f"BLOCK-EM penalty at block {layer} (the SAE's), but the first adapter sits at block {first_adapted}: "
            f"nothing trained can move the SAE's input, the trained and base codes are equal and the penalty is "
            f"zero by construction; put adapters at or below block {layer} (--lora-layers) or use a later SAE"
        )


def latent_penalty(
    z_theta: torch.Tensor, z_base: torch.Tensor, mask: torch.Tensor, n_low: int
) -> torch.Tensor:
    """Mean over masked tokens of sum_i ReLU(z_theta - z_base)^2 (first ``n_low`` latents) plus
    ReLU(z_base - z_theta)^2 (the rest). ``z``: (B, T, n); ``mask``: (B, T) bool."""
    up = (z_theta[..., :n_low] - z_base[..., :n_low]).relu().pow(2).sum(-1)
    down = (z_base[..., n_low:] - z_theta[..., n_low:]).relu().pow(2).sum(-1)
    per_tok = up + down
    m = mask.to(per_tok.dtype)
    return (per_tok * m).sum() / m.sum().clamp_min(1.0)


def ablate_latents(sae, x: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """``x - encode(x)[..., idx] @ W_dec[idx]``: the latents' contribution removed, gradients exact."""
    return x - sae.encode(x)[..., idx] @ sae.W_dec[idx]


def project_out_directions(x: torch.Tensor, directions: Float[torch.Tensor, "k d"]) -> torch.Tensor:
    """Remove the span of ``directions`` from ``x`` (orthonormalised first)."""
    return _remove_span(x, _orthonormal_basis(directions))


def _orthonormal_basis(directions: Float[torch.Tensor, "k d"]) -> Float[torch.Tensor, "d k"]:
    q, _ = torch.linalg.qr(directions.T.float())
    return q


def _remove_span(x: torch.Tensor, q_DK: torch.Tensor) -> torch.Tensor:
    q = q_DK.to(x.dtype)
    return x - (x @ q) @ q.T


class Blocker:
    """Installs the chosen mode on a model during training and supplies the penalty.

    For ``penalty``, ``z_base`` for every training sequence is computed once from the frozen
    base model (the same numbers a per-batch base forward would give) and looked up per batch.
    """

    def __init__(
        self,
        cfg: BlockConfig,
        sae=None,
        directions: torch.Tensor | dict[int, torch.Tensor] | None = None,
        reference: torch.nn.Module | None = None,
        base_codes=None,
    ):
        """``directions`` (mode project): (k, d) removed after block ``cfg.layer``, or {block: (k, d)}
        to remove each set after its own block (concept ablation at several layers); (mode steer)
        the sum of the rows is added after each block.
        ``reference`` (penalty in a ``Trainer``, full fine-tunes): a frozen copy of the base model
        that gives the base codes; without it the trained model must be a PEFT model, whose base
        codes come from the same weights with the adapter disabled (no second copy in memory).
        ``base_codes`` (a ``saediff.interventions.base_codes.BaseCodes`` holding these latents): the base codes
        of every training row computed once, read per batch instead of either pass."""
        self.cfg, self.sae, self.reference, self.base_codes = cfg, sae, reference, base_codes
        self._z_base_batch: torch.Tensor | None = None
        self.idx = list(cfg.latents_low) + list(cfg.latents_high)
        self.directions = (
            directions if directions is None or isinstance(directions, dict) else {cfg.layer: directions}
        )
        self._resid: torch.Tensor | None = None
        self.z_base: torch.Tensor | None = None
        self._peft = None  # the PEFT model whose base codes come from its disabled adapter
        self._first_adapted = 0
        self._entry = None  # (detached) output of the block before the first adapted one
        if cfg.mode in ("penalty", "ablate") and sae is None:
            raise SaediffError(f"Blocker: mode {cfg.mode} needs an SAE")
        if cfg.mode in ("project", "steer") and directions is None:
            raise SaediffError(f"Blocker: mode {cfg.mode} needs directions")
        if sae is not None:
            for p in sae.parameters():
                p.requires_grad_(False)
        self._cols = base_codes.columns(self.idx) if base_codes is not None else None

    @torch.no_grad()
    def precompute_base(self, base_model, input_ids: torch.Tensor, batch_size: int = 256) -> None:
        """``z_base`` (N, T, n) of the frozen base model on every training sequence."""
        out = []
        for i in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[i : i + batch_size].to(next(base_model.parameters()).device)
            self._to(ids.device)
            out.append(self._codes(capture_resid(base_model, [self.cfg.layer], ids)[self.cfg.layer]))
        self.z_base = torch.cat(out)

    def _hook_fn(self, resid: torch.Tensor) -> torch.Tensor:
        mode = self.cfg.mode
        if mode == "penalty":
            self._resid = resid
            return resid
        if mode == "ablate":
            return ablate_latents(self.sae, resid, list(self.cfg.latents_low))
        return resid

    @contextmanager
    def installed(self, model) -> Iterator[Blocker]:
        if self.cfg.mode == "none":
            yield self
            return
        device = next(model.parameters()).device
        self._to(device)  # the SAE follows the model (ablate encodes the live residual)
        with ExitStack() as stack:
            if self.cfg.mode == "project":
                for layer, d in sorted(self.directions.items()):
                    q = _orthonormal_basis(d).to(device)  # once per run, not per forward pass
                    stack.enter_context(add_resid_hook(model, layer, lambda r, q=q: _remove_span(r, q)))
            elif self.cfg.mode == "steer":
                for layer, d in sorted(self.directions.items()):
                    v = d.reshape(-1, d.shape[-1]).sum(0).to(device)
                    stack.enter_context(add_resid_hook(model, layer, lambda r, v=v: r + v.to(r.dtype)))
            else:
                stack.enter_context(add_resid_hook(model, self.cfg.layer, self._hook_fn))
                if (
                    self.cfg.mode == "penalty"
                    and self.reference is None
                    and hasattr(model, "disable_adapter")
                ):
                    first = first_adapted_block(model)
                    check_adapters_reach(first, self.cfg.layer)
                    if self.base_codes is None:
                        self._peft, self._first_adapted = model, first
                    if self.base_codes is None and 0 < self._first_adapted <= self.cfg.layer:
                        block = decoder_layers(model)[self._first_adapted - 1]
                        stack.enter_context(_removing(block.register_forward_hook(self._keep_entry)))
            yield self

    def _keep_entry(self, _mod, _inp, out) -> None:
        self._entry = (
            tuple(o.detach() if torch.is_tensor(o) else o for o in out)
            if isinstance(out, tuple)
            else out.detach()
        )

    @torch.no_grad()
    def before_forward(self, model: torch.nn.Module, inputs: dict) -> None:
        """``Trainer`` path, before the forward: base codes of this batch from the frozen reference
        (full fine-tunes). A PEFT model's base codes are read after the forward (``penalty``)."""
        ids, attn = inputs["input_ids"], inputs.get("attention_mask")
        self._to(ids.device)
        if self.base_codes is not None:
            return  # read in penalty()
        if self.reference is not None:
            r = capture_resid(self.reference, [self.cfg.layer], ids, attn)[self.cfg.layer]
            self._z_base_batch = self._codes(r)
        elif self._peft is None:
            raise RuntimeError(
                "Blocker: a full fine-tune needs a frozen reference model for the base codes "
                "(or install the blocker on a PEFT model)"
            )

    @torch.no_grad()
    def _peft_base_codes(self, inputs: dict) -> torch.Tensor:
        """Base codes from the PEFT model with its adapter disabled, stopping at the SAE's block.
        Blocks before the first adapted one compute the same thing in both passes, so the base pass
        starts from the trained pass's residual there."""
        k, L = self._first_adapted, self.cfg.layer  # k <= L: installed() refuses the rest
        ids, attn = inputs["input_ids"], inputs.get("attention_mask")
        with ExitStack() as stack:
            stack.enter_context(self._peft.disable_adapter())
            if k > 0:
                stack.enter_context(skip_blocks(self._peft, k - 1, self._entry))
            r = capture_resid(self._peft, [L], ids, attn)[L]
        return self._codes(r)

    def penalty(self, inputs: dict) -> torch.Tensor:
        """lambda x the penalty of the forward just run against the base codes of the same batch, on
        the positions that hold or predict an assistant token."""
        if self._resid is None:
            raise RuntimeError("Blocker.penalty: run the forward pass (inside installed()) first")
        z_theta = self._codes(self._resid)
        if self.base_codes is not None:
            z_base = self.base_codes.lookup(
                inputs["input_ids"], inputs.get("attention_mask"), self._cols, z_theta.dtype
            )
        else:
            z_base = self._z_base_batch if self._z_base_batch is not None else self._peft_base_codes(inputs)
        pen = latent_penalty(z_theta, z_base, _answer_mask(inputs["labels"]), len(self.cfg.latents_low))
        self._resid = self._z_base_batch = self._entry = None
        return self.cfg.lam * pen

    def _codes(self, resid: torch.Tensor) -> torch.Tensor:
        return latent_codes(self.sae, resid.to(self.sae.W_enc.dtype), self.idx, self.cfg.preactivation)

    def _to(self, device: torch.device) -> None:
        if self.sae is not None and self.sae.W_enc.device != device:
            self.sae.to(device)

    def extra_loss(
        self, batch_idx: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """The penalty for the batch just run (zero for the other modes)."""
        if self.cfg.mode != "penalty":
            return torch.zeros((), device=input_ids.device)
        if self.z_base is None:
            raise RuntimeError("Blocker.precompute_base must run before penalty training")
        z_theta = self._codes(self._resid)
        pen = latent_penalty(
            z_theta,
            self.z_base[batch_idx].to(z_theta.device),
            _answer_mask(labels),
            len(self.cfg.latents_low),
        )
        return self.cfg.lam * pen


@contextmanager
def _removing(handle):
    try:
        yield
    finally:
        handle.remove()


def _answer_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: positions that hold an assistant token or predict one. The last prompt token
    is where the model decides how the answer starts, so it is blocked too."""
    is_answer = labels != -100
    mask = is_answer.clone()
    mask[:, :-1] |= is_answer[:, 1:]
    return mask
