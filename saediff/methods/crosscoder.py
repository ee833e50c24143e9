"""The crosscoder diff: a trained crosscoder (``saediff.saes.crosscoder``) read over a fine-tune pair.
Per latent: decoder norms and class, firing, and latent scaling after Minder et al. 2025 (``nu_r``,
``nu_eps``: how much of a fine-tune-only latent the base model's activations and reconstruction
error really carry); cards with top contexts and the fine-tune decoder rows as directions.

    saediff crosscoder diff CC --base M --adapter A --prompts P --out RUN
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch

from saediff import _io
from saediff.errors import SaediffError
from saediff.methods.base import Candidates, DiffingMethod, MethodInputs
from saediff.methods.directions import Direction
from saediff.methods.sae_diff import merge_top
from saediff.saes.crosscoder import WEIGHTS, Crosscoder, class_counts, decoder_norm_table, load_crosscoder

__all__ = [
    "CrosscoderMethod",
    "CrosscoderStats",
    "crosscoder_cards",
    "crosscoder_stats",
    "ft_direction",
    "ft_only_ranking",
    "latent_rows",
    "run_crosscoder_diff",
]

log = logging.getLogger(__name__)


class CrosscoderStats(NamedTuple):
    """One streamed pass of a crosscoder over paired rows: firing, top rows and latent scaling."""

    n: int
    """rows read"""
    freq: torch.Tensor
    """(S,) share of rows where the latent is active"""
    mean: torch.Tensor
    """(S,) mean activation"""
    beta: dict[str, torch.Tensor]
    """``{r,eps,act}_{base,ft}``: (S,) latent-scaling betas, in the scaled space (targets: the
    reconstruction, the error plus the latent's own term, the activation)"""
    nu_r: torch.Tensor
    """(S,) beta_r_base / beta_r_ft: how much of the fine-tune decoder's direction (scaled by the
    latent's activation) the base model's reconstruction carries, relative to the fine-tune's
    (Minder et al.'s Latent Decoupling: high means other latents rebuild it in the base model)"""
    nu_eps: torch.Tensor
    """(S,) the same for the reconstruction errors (latent's own term added back): high means the
    base model's error carries the latent, the Complete Shrinkage artifact"""
    top_vals: torch.Tensor
    """(S, k) highest activations"""
    top_rows: torch.Tensor
    """(S, k) their row ids (read order)"""


@torch.no_grad()
def crosscoder_stats(cc: Crosscoder, batches, k_top: int = 10, chunk: int = 1024) -> CrosscoderStats:
    """Stream paired rows (an iterable of (n, 2, d_in) tensors, in a fixed order) through ``cc``.

    Latent scaling (Minder et al. 2025) for latent j with fine-tune decoder d_j: for each model m
    and target t_m(x), beta = sum_x z_j(x) <d_j, t_m(x)> / sum_x z_j(x)^2 |d_j|^2, the least-squares
    factor of z_j d_j against t_m. Targets, as the paper's: ``r`` the model's reconstruction
    x_hat_m (latent j's own term included: a fine-tune-only latent's base decoder row is ~0, so
    ``nu_r`` is ~0 unless other latents rebuild it in the base model), ``eps`` its reconstruction
    error plus the latent's own contribution z_j W_dec[j, m]; ``act`` (a column of its own, not a
    ratio) the model's (scaled) activation itself. Memory holds per-latent sums, never the rows
    (float64)."""
    S, dev = cc.d_sae, cc.W_enc.device
    d_ft = cc.W_dec[:, 1].float()  # (S, D)
    d_dot = torch.einsum("sd,smd->sm", d_ft, cc.W_dec.float())  # <d_j, W_dec[j, m]>
    acc = {
        key: torch.zeros(S, dtype=torch.float64, device=dev)
        for key in ("r_0", "r_1", "eps_0", "eps_1", "act_0", "act_1", "den", "s1")
    }
    fired = torch.zeros(S, dtype=torch.long, device=dev)
    top_vals, top_rows = torch.zeros(S, 0, device=dev), torch.zeros(S, 0, dtype=torch.long, device=dev)
    n = 0
    for batch in batches:
        for i in range(0, batch.shape[0], chunk):
            x = cc.scaled(batch[i : i + chunk].to(dev))  # (B, M, D)
            z = cc.encode_scaled(x).float()  # (B, S)
            x_hat = cc.decode(z)
            err = x - x_hat
            for m in (0, 1):
                acc[f"r_{m}"] += (z * (x_hat[:, m].float() @ d_ft.T)).sum(0).double()
                acc[f"act_{m}"] += (z * (x[:, m].float() @ d_ft.T)).sum(0).double()
                acc[f"eps_{m}"] += (z * (err[:, m].float() @ d_ft.T) + z.pow(2) * d_dot[:, m]).sum(0).double()
            acc["den"] += (z.pow(2).sum(0) * d_ft.pow(2).sum(1)).double()
            acc["s1"] += z.sum(0).double()
            fired += (z > 0).sum(0)
            top_vals, top_rows = merge_top(top_vals, top_rows, z, n, k_top)
            n += z.shape[0]
    if not n:
        raise SaediffError("crosscoder_stats: no rows were read")
    den = acc["den"].clamp_min(1e-30)
    beta = {
        f"{t}_{side}": (acc[f"{t}_{m}"] / den).float().cpu()
        for t in ("r", "eps", "act")
        for m, side in ((0, "base"), (1, "ft"))
    }
    ratio = lambda a, b: torch.where(
        b.abs() > 1e-12, a / b.where(b.abs() > 1e-12, torch.ones_like(b)), torch.full_like(a, float("nan"))
    )
    return CrosscoderStats(
        n,
        (fired.double() / n).float().cpu(),
        (acc["s1"] / n).float().cpu(),
        beta,
        ratio(beta["r_base"], beta["r_ft"]),
        ratio(beta["eps_base"], beta["eps_ft"]),
        top_vals.cpu(),
        top_rows.cpu(),
    )


# long: its signature and docstring; the code itself is 47 lines
def run_crosscoder_diff(
    cc_path: str | Path,
    base: str,
    out: str | Path,
    prompts: list,
    *,
    finetuned: str | None = None,
    adapter: str | None = None,
    positions: str = "response",
    top: int = 10,
    prompts_name: str = "",
    progress: bool = True,
) -> dict:
    """The crosscoder's diff table over ``prompts`` read from both models: every latent's decoder
    norms, class, firing and latent-scaling ratios (``crosscoder_diff.json``); cards with the top
    contexts of the ``top`` fine-tune-only latents, ranked by max(nu_r, nu_eps) (the most clearly
    new first; ``cards.json``); and their fine-tune decoder rows, in the residual stream's units,
    as directions (``directions/``, method ``crosscoder``) for ``saediff compare`` and ``steer``.
    A rerun with the same crosscoder, models and prompts returns the saved table."""
    from saediff.activations.collect import tokenize_prompts
    from saediff.activations.streams import paired_rows
    from saediff.methods.export import export_directions
    from saediff.models.loading import load_pair
    from saediff.models.provenance import mismatch as _mismatch

    out = Path(out)
    cc = load_crosscoder(cc_path)
    lm_base, lm_ft = load_pair(base, finetuned, adapter)
    made_by = _made_by(cc_path, lm_base, lm_ft, prompts, positions, top)
    old = _io.read_json_if_exists(out / "crosscoder_diff.json")
    if old is not None and _mismatch(old.get("provenance"), made_by) is None:
        return old["summary"]
    toks = tokenize_prompts(lm_base, prompts)
    st = crosscoder_stats(cc, paired_rows(lm_base, lm_ft, toks, cc.hook_name, positions=positions))
    rows = latent_rows(cc, st)  # indexed by latent
    picked = ft_only_ranking(rows, top)
    cards = [_card(rows[j], j, st, lm_base, prompts, toks, positions) for j in picked]
    dirs = [
        Direction(
            f"cc_{j}",
            ft_direction(cc, j),
            cc.hook_name,
            "crosscoder",
            {"latent": j, "crosscoder": str(cc_path)},
        )
        for j in picked
    ]
    if dirs:
        export_directions(dirs, out / "directions", model=base)
    summary = {
        "rows": st.n,
        "classes": class_counts([r["class"] for r in rows]),
        "ft_only_ranked": picked,
        "hook": cc.hook_name,
        "base": base,
        "crosscoder": str(cc_path),
    }
    if not picked:
        log.warning(
            "crosscoder diff: no fine-tune-only latent fired on these prompts: no candidate directions"
        )
    _io.atomic_write_json(out / "cards.json", {"cards": cards})
    _io.atomic_write_json(
        out / "crosscoder_diff.json", {"provenance": made_by, "summary": summary, "latents": rows}
    )
    return summary


def _made_by(cc_path: str | Path, lm_base, lm_ft, prompts: list, positions: str, top: int) -> dict:
    """What decides a crosscoder diff (the key a rerun returns its saved table by): the
    crosscoder's weights, both models, the prompts and the settings."""
    from saediff.models.provenance import digest, file_digest, model_fingerprint

    return {
        "crosscoder": file_digest(Path(cc_path) / WEIGHTS),
        "base": model_fingerprint(lm_base.spec),
        "finetuned": model_fingerprint(lm_ft.spec),
        "prompts": digest([asdict(p) for p in prompts]),
        "positions": positions,
        "top": top,
    }


def _card(row: dict, j: int, st: CrosscoderStats, lm_base, prompts: list, toks, positions: str) -> dict:
    """Latent ``j``'s card: its table ``row`` and its top contexts on the base model's tokens."""
    from saediff.activations.collect import row_descriptions

    ids = st.top_rows[j][st.top_vals[j] > 0].tolist()
    info = row_descriptions(lm_base, prompts, toks, positions, which=ids) if ids else []
    return {
        **row,
        "top": [{"row": i, **d, "value": float(v)} for i, d, v in zip(ids, info, st.top_vals[j].tolist())],
    }


def latent_rows(cc: Crosscoder, st: CrosscoderStats) -> list[dict]:
    """Every latent's row of the diff table: class, decoder norms, rel_norm, cosine, firing, latent scaling."""
    table = decoder_norm_table(cc, (st.freq * st.n).round().long())
    return [
        {
            "latent": j,
            "class": table["class"][j],
            "rel_norm": float(table["rel_norm"][j]),
            "norm_base": float(table["norm_base"][j]),
            "norm_ft": float(table["norm_ft"][j]),
            "cosine": float(table["cosine"][j]),
            "freq": float(st.freq[j]),
            "mean": float(st.mean[j]),
            "nu_r": _num(st.nu_r[j]),
            "nu_eps": _num(st.nu_eps[j]),
            **{f"beta_{b}": _num(v[j]) for b, v in st.beta.items()},
        }
        for j in range(cc.d_sae)
    ]


def ft_only_ranking(rows: list[dict], top: int) -> list[int]:
    """The fine-tune-only latents that fired, the most clearly new first: by max(nu_r, nu_eps)
    (latent scaling: how much of them the base model carries), then by firing rate."""
    ok = [r for r in rows if r["class"] == "ft_only" and r["nu_r"] is not None and r["nu_eps"] is not None]
    return [r["latent"] for r in sorted(ok, key=lambda r: (max(r["nu_r"], r["nu_eps"]), -r["freq"]))[:top]]


def ft_direction(cc: Crosscoder, latent: int) -> torch.Tensor:
    """A latent's fine-tune decoder row in the residual stream's units (the scale undone)."""
    return (cc.W_dec[latent, 1] / cc.norm_scale[1]).detach().float().clone()


def _num(v: torch.Tensor) -> float | None:
    x = float(v)
    return None if math.isnan(x) else x


class CrosscoderMethod(DiffingMethod):
    """A crosscoder trained here on the pair's paired rows; the direction is the fine-tune decoder
    row of the most clearly new fine-tune-only latent by latent scaling (``ft_only_ranking``), or,
    said in the detail, the most fine-tune-leaning latent that fired when none is fine-tune-only."""

    name = "crosscoder"
    summary = "crosscoder over both models: the most clearly new fine-tune-only latent (latent scaling)"
    order = 5
    tags = ("crosscoder",)
    uses_paired_rows = True
    results_file = "crosscoder_diff.json"

    def card_data(self, folder, lm=None) -> list[dict]:
        return crosscoder_cards(folder, lm=lm)

    def find(self, inputs: MethodInputs) -> Candidates:
        from saediff.saes.crosscoder import CrosscoderConfig, train_crosscoder

        cfg, rows = inputs.cfg, inputs.paired_rows()
        ccfg = CrosscoderConfig(
            d_sae=cfg.crosscoder_latents or 2 * inputs.sae_size["d_sae"],
            k=cfg.crosscoder_k or inputs.sae_size["k"],
            steps=cfg.crosscoder_steps,
            batch_size=min(cfg.batch_size, rows.shape[0] // 2),
            lr=cfg.lr,
            seed=cfg.seed,
            device="cpu",
        )
        cc, hist = train_crosscoder(rows, ccfg, hook_name=inputs.hook, progress=False)
        lat_rows = latent_rows(cc, crosscoder_stats(cc, [rows]))
        ranked = ft_only_ranking(lat_rows, 1)
        detail: dict = {"classes": class_counts([r["class"] for r in lat_rows]), "fvu": hist["fvu"][-1]}
        if not ranked:  # said in the row, not hidden: the crosscoder's most fine-tune-leaning latent instead
            alive = [r for r in lat_rows if r["class"] != "dead"]
            ranked = [min(alive, key=lambda r: r["rel_norm"])["latent"]] if alive else []
            detail["note"] = (
                "no latent is fine-tune-only (rel_norm < 0.1): the row is the most "
                "fine-tune-leaning latent that fired (lowest rel_norm)"
            )
        if not ranked:
            return Candidates((), None, detail)
        j = ranked[0]
        detail.update(
            {"latent": j, **{k: lat_rows[j][k] for k in ("class", "rel_norm", "nu_r", "nu_eps", "freq")}}
        )
        return Candidates(
            (Direction(self.name, ft_direction(cc, j), inputs.hook, "crosscoder", {"latent": j}),),
            None,
            detail,
        )


def crosscoder_cards(run_dir: str | Path, lm=None) -> list[dict]:
    """Per carded latent of a ``saediff crosscoder diff`` run: its card (``cards.json``: class,
    decoder norms, rel_norm, latent scaling, top contexts) and the logit effects of its fine-tune
    decoder row (``directions/cc_J``) on the run's base model."""
    from saediff.methods.export import load_directions
    from saediff.models.loading import load_model
    from saediff.models.logit_lens import logit_effects, unembedding

    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "crosscoder_diff.json").read_text())["summary"]
    cards = json.loads((run_dir / "cards.json").read_text())["cards"]
    if not cards:
        return []
    lm = lm or load_model(summary["base"])
    W_U = unembedding(lm.model)
    dirs = load_directions(run_dir / "directions")
    return [
        {**c, "logits": logit_effects(dirs[f"cc_{c['latent']}"].vector, W_U, lm.tokenizer)} for c in cards
    ]
