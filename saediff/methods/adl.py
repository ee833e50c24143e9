"""The activation difference lens (ADL, after the science-of-finetuning diffing-toolkit): the mean
difference of a fine-tune's and its base model's residuals on the first few answer tokens, per
layer and position, read through the logit lens and checked by steering the base model with it.

Narrow fine-tunes leave a trace at the first positions of any answer that reads like their
training data; the ADL finds it without an SAE. Positions: the first ``k`` response tokens of each
prompt that carries an answer (teacher-forced), else the last ``k`` prompt tokens (ending at the
generation prompt, where the answer starts). Memory holds per (layer, position) sums, never the
activations.

    saediff adl --base M --adapter A --prompts data.jsonl --k 5 --pairs offdomain --out RUN
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from jaxtyping import Float

from saediff import _io, console
from saediff.errors import SaediffError
from saediff.methods.base import Candidates, DiffingMethod, MethodInputs
from saediff.methods.directions import Direction
from saediff.methods.mean_diff import PairedDifferences, permuted_null
from saediff.models.loading import LoadedModel

__all__ = [
    "ADL",
    "ADLConfig",
    "ADLResult",
    "SteerCheck",
    "adl_differences",
    "adl_permuted",
    "first_token_positions",
    "position_mean",
    "run_adl",
]

log = logging.getLogger(__name__)


class SteerCheck(Protocol):
    """(name, direction, model, block, unit, output folder, permuted) -> the check's headline: the
    steering check a caller binds to an evaluator and a cost (``interventions.causal.steer_check``);
    ``permuted``: seed -> the direction's estimator with its labels permuted (its label-permuted
    null). A method never runs the causal protocol itself, so every method's directions are checked
    the same way."""

    def __call__(
        self,
        name: str,
        vector: torch.Tensor,
        lm: LoadedModel,
        layer: int,
        unit: float,
        out: Path,
        *,
        permuted=None,
    ) -> dict: ...


@dataclass(frozen=True)
class ADLConfig:
    k: int = 5
    """answer positions read (the diffing-toolkit reads the first 5 tokens)"""
    layers: tuple[int, ...] | None = None
    """blocks to read (None: all)"""
    steer_layer: int | None = None
    """block whose difference (the mean over the k positions) is steered with (None: the middle
    block); its cost, scale and null are the steering check's (``SteerCheck``)"""
    n_logit_tokens: int = 10
    batch_size: int = 16

    def __post_init__(self):
        if self.k < 1:
            raise SaediffError(f"ADLConfig.k must be >= 1, got {self.k}")


@dataclass(frozen=True)
class ADLResult:
    diff: dict[int, Float[torch.Tensor, "k d"]]
    """per block: mean (fine-tune - base) residual at each of the k positions"""
    count: Float[torch.Tensor, " k"]
    """prompts that reached each position"""
    base_norm: dict[int, float]
    """per block: the base model's mean residual norm at those positions"""
    per_prompt: dict[int, Float[torch.Tensor, "n d"]] = field(default_factory=dict)
    """for the blocks asked for: per prompt, its (fine-tune - base) residuals summed over its read
    positions (float64), for the label-permuted null (``adl_permuted``)"""


def first_token_positions(toks, k: int) -> torch.Tensor:
    """(N, k) column index of each prompt's j-th read position, -1 where a prompt has fewer."""
    n, t = toks.role.shape
    pos = torch.arange(t).expand(n, t)
    out = torch.full((n, k), -1, dtype=torch.long)
    for i in range(n):
        resp = pos[i][toks.role[i] == 1]
        if resp.numel():
            sel = resp[:k]
        else:
            sel = pos[i][toks.role[i] == 0][-k:]
        out[i, : sel.numel()] = sel
    return out


@torch.no_grad()
def adl_differences(
    lm_base, lm_ft, prompts: list, cfg: ADLConfig, progress: bool = True, per_prompt: tuple[int, ...] = ()
) -> ADLResult:
    """Mean (fine-tune - base) residual per block and per read position over ``prompts``; for the
    blocks ``per_prompt``, each prompt's sum over its read positions too (N x d per such block)."""
    from saediff.activations.collect import tokenize_prompts
    from saediff.activations.streams import check_same_tokenizer
    from saediff.models.hooks import capture_resid

    check_same_tokenizer(lm_base, lm_ft)
    n_layers = lm_base.model.config.num_hidden_layers
    layers = list(cfg.layers) if cfg.layers is not None else list(range(n_layers))
    if not layers or min(layers) < 0 or max(layers) >= n_layers:
        raise SaediffError(f"ADL layers {layers}: the model has blocks 0..{n_layers - 1}")
    toks = tokenize_prompts(lm_base, prompts)
    cols = first_token_positions(toks, cfg.k)  # (N, k)
    d = lm_base.model.config.hidden_size
    sums = {L: torch.zeros(cfg.k, d, dtype=torch.float64) for L in layers}
    norm_sum = {L: 0.0 for L in layers}
    count = torch.zeros(cfg.k, dtype=torch.float64)
    by_prompt = {L: torch.zeros(len(prompts), d, dtype=torch.float64) for L in per_prompt if L in sums}
    every = toks.role >= 0
    for i in console.progress(range(0, len(prompts), cfg.batch_size), desc="adl", enabled=progress):
        rows = slice(i, i + cfg.batch_size)
        ids, attn, _ = toks.batch(rows, every)
        c = cols[rows]  # (B, k)
        ok = c >= 0
        r_idx, j_idx = ok.nonzero(as_tuple=True)
        reads = [
            capture_resid(lm.model, layers, ids.to(lm.device), attn.to(lm.device)) for lm in (lm_base, lm_ft)
        ]
        for L in layers:
            xb = reads[0][L][r_idx.to(lm_base.device), c[ok].to(lm_base.device)].double().cpu()  # (n_ok, d)
            xf = reads[1][L][r_idx.to(lm_ft.device), c[ok].to(lm_ft.device)].double().cpu()
            sums[L].index_add_(0, j_idx, xf - xb)
            norm_sum[L] += float(xb.norm(dim=1).sum())
            if L in by_prompt:
                by_prompt[L].index_add_(0, r_idx + i, xf - xb)
        count += torch.bincount(j_idx, minlength=cfg.k).double()
    if not count[0]:
        raise SaediffError("ADL: no prompt has a position to read")
    diff = {L: (sums[L] / count.clamp_min(1)[:, None]).float() for L in layers}
    base_norm = {L: norm_sum[L] / float(count.sum()) for L in layers}
    return ADLResult(diff, count.float(), base_norm, by_prompt)


SWAPPED = "fine-tune / base swapped within each prompt with probability 1/2"


def adl_permuted(result: ADLResult, L: int) -> PairedDifferences:
    """The ADL's position-mean at block ``L`` as paired differences per prompt (both models read the
    same tokens): its estimate is ``position_mean``, and swapping which model is the fine-tune within
    a prompt flips that prompt's sum (the label-permuted null). Needs ``per_prompt`` at ``L``."""
    if L not in result.per_prompt:
        raise SaediffError(f"ADL: block {L}'s per-prompt sums were not kept (adl_differences per_prompt)")
    return PairedDifferences(result.per_prompt[L], float(result.count.sum()))


def _logit_lens(result: ADLResult, lm, n: int) -> dict:
    from saediff.models.logit_lens import logit_effects, unembedding

    W_U = unembedding(lm.model)
    out = {}
    for L, D in result.diff.items():
        mean = position_mean(result, L)
        out[str(L)] = {
            "mean": logit_effects(mean, W_U, lm.tokenizer, n),
            "per_position": [
                logit_effects(D[j], W_U, lm.tokenizer, n)["promoted"] for j in range(D.shape[0])
            ],
        }
    return out


def position_mean(result: ADLResult, L: int) -> torch.Tensor:
    """The difference averaged over the read positions, each weighted by the prompts that reached it."""
    w = result.count / result.count.sum()
    return (result.diff[L] * w[:, None]).sum(0)


# long: its signature and docstring; the code itself is 53 lines
def run_adl(
    base: str,
    out: str | Path,
    prompts: list,
    cfg: ADLConfig = ADLConfig(),
    *,
    finetuned: str | None = None,
    adapter: str | None = None,
    check: SteerCheck | None = None,
    prompts_name: str = "",
    progress: bool = True,
) -> dict:
    """The ADL on a fine-tune pair: ``adl.json`` (per block: the norm of each position's difference,
    the cosine of the position-mean with each position, the logit-lens tokens), ``directions/``
    (``adl_L{L}``: the position-mean per block, method ``adl``) and, with a ``check`` (the steering
    check of ``interventions.causal.steer_check`` bound to an evaluator and a cost: the cost level
    chosen on the select half, the effect reported on the other against the null at the same cost,
    the ADL's own label-permuted estimator among it), its headline for the position-mean at
    ``steer_layer`` under ``steer``."""
    from saediff.methods.export import export_directions
    from saediff.models.hooks import resid_post
    from saediff.models.loading import load_pair
    from saediff.models.provenance import digest, model_fingerprint

    out = Path(out)
    lm_base, lm_ft = load_pair(base, finetuned, adapter)
    n_layers = lm_base.model.config.num_hidden_layers
    L_s = cfg.steer_layer if cfg.steer_layer is not None else n_layers // 2
    read = list(cfg.layers) if cfg.layers is not None else list(range(n_layers))
    if L_s not in read:
        raise SaediffError(f"ADL steer layer {L_s} is not among the layers read ({sorted(read)})")
    res = adl_differences(lm_base, lm_ft, prompts, cfg, progress, per_prompt=(L_s,) if check else ())
    lens = _logit_lens(res, lm_base, cfg.n_logit_tokens)
    per_layer = {}
    for L, D in res.diff.items():
        mean = position_mean(res, L)
        per_layer[str(L)] = {
            "norm_per_position": D.norm(dim=1).tolist(),
            "norm_mean": float(mean.norm()),
            "relative_norm": float(mean.norm()) / max(res.base_norm[L], 1e-12),
            "cos_mean_vs_position": torch.nn.functional.cosine_similarity(D, mean[None], dim=1).tolist(),
            "base_residual_norm": res.base_norm[L],
            "logit_lens": lens[str(L)],
        }
    made_by = {
        "base": model_fingerprint(lm_base.spec),
        "finetuned": model_fingerprint(lm_ft.spec),
        "prompts": digest([asdict(p) for p in prompts]),
        "settings": asdict(cfg),
    }
    dirs = [
        Direction(
            f"adl_L{L}", position_mean(res, L), resid_post(L), "adl", {"k": cfg.k, "prompts": prompts_name}
        )
        for L in sorted(res.diff)
    ]
    export_directions(dirs, out / "directions", model=base)
    summary = {
        "k": cfg.k,
        "prompts_per_position": res.count.tolist(),
        "steer_layer": L_s,
        "layers": per_layer,
        "provenance": made_by,
    }
    if check is not None:
        vec = position_mean(res, L_s)
        null = permuted_null(adl_permuted(res, L_s), vec, SWAPPED)
        summary["permuted_null"] = null.note
        summary["steer"] = check(
            f"adl_L{L_s}", vec, lm_base, L_s, res.base_norm[L_s], out, permuted=null.estimator
        )
    else:
        summary["steer"] = None
        log.info("ADL: no evaluator given (--pairs or --judge-url): no steering check")
    _io.atomic_write_json(out / "adl.json", summary)
    return summary


class ADL(DiffingMethod):
    """The activation difference lens at one block: the fine-tune's mean shift over the first
    ``adl_k`` answer positions (``position_mean``). Both models read the same tokens, so its
    permuted null swaps which model is the fine-tune within each prompt with probability 1/2; left
    out where every prompt's shift points one way (``mean_diff.permuted_null``: a low-rank
    adapter's at its own block), as a null that would hold the candidate itself."""

    name = "adl"
    summary = "activation difference lens: mean fine-tune - base shift on the first answer tokens"
    order = 7
    tags = ("adl",)
    results_file = "adl.json"

    def find(self, inputs: MethodInputs) -> Candidates:
        L = inputs.layer
        res = adl_differences(
            inputs.lm_base,
            inputs.lm_ft,
            inputs.prompts,
            ADLConfig(k=inputs.cfg.adl_k, layers=(L,)),
            progress=False,
            per_prompt=(L,),
        )
        d = Direction(self.name, position_mean(res, L), inputs.hook, "adl", {"k": inputs.cfg.adl_k})
        null = permuted_null(adl_permuted(res, L), d.vector, SWAPPED)
        return Candidates((d,), None, {"permuted_null": null.note}, null.estimator)
