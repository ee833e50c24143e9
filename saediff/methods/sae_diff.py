"""SAE model diffing: how each latent's activation changes from a base model to a fine-tune.

Sign convention: every delta is ``finetuned - base``. Both models are encoded with the same SAE
on the same tokens (typically the fine-tuned model's own answers), so a latent that rises is one
the fine-tune turned up, not one the text happens to contain.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from jaxtyping import Float

from saediff.errors import MissingFileError, SaediffError
from saediff.methods.base import Candidates, DiffingMethod, MethodInputs, diff_run_candidate
from saediff.methods.directions import Direction

__all__ = [
    "HIST_EDGES",
    "DiffAccumulator",
    "LatentCard",
    "LatentDiff",
    "Ranking",
    "SAEDiff",
    "card_note",
    "diff_latents",
    "latent_bars",
    "latent_card",
    "latent_card_hist",
    "latent_cards",
]

Ranking = Literal["delta", "abs_delta", "effect_size", "freq_delta"]


@dataclass(frozen=True)
class LatentDiff:
    """Per-latent statistics, each an (S,) tensor."""

    mean_base: torch.Tensor
    """mean activation on the base model's activations (zeros included)"""
    mean_ft: torch.Tensor
    freq_base: torch.Tensor
    """fraction of tokens on which the latent is active (> 0)"""
    freq_ft: torch.Tensor
    effect_size: torch.Tensor
    """delta / pooled standard deviation (Cohen's d; 0 where both are constant)"""
    n_base: int
    n_ft: int
    hook_name: str = ""

    @property
    def delta(self) -> torch.Tensor:
        return self.mean_ft - self.mean_base

    @property
    def d_sae(self) -> int:
        return self.mean_base.shape[0]

    def score(self, by: Ranking = "delta") -> torch.Tensor:
        if by == "delta":
            return self.delta
        if by == "abs_delta":
            return self.delta.abs()
        if by == "effect_size":
            return self.effect_size
        if by == "freq_delta":
            return self.freq_ft - self.freq_base
        raise SaediffError(f"unknown ranking {by!r}: choose delta, abs_delta, effect_size or freq_delta")

    def top(self, n: int = 10, by: Ranking = "delta") -> list[int]:
        """Latents with the largest score (for ``delta``: the ones the fine-tune turned up most)."""
        return [int(i) for i in torch.argsort(self.score(by), descending=True, stable=True)[:n]]

    def bottom(self, n: int = 10, by: Ranking = "delta") -> list[int]:
        """Latents with the smallest score (for ``delta``: the ones that fell, e.g. assistant features)."""
        return [int(i) for i in torch.argsort(self.score(by), descending=False, stable=True)[:n]]

    def records(self) -> list[dict]:
        """One dict per latent, ordered by delta (descending)."""
        d = self.delta
        return [
            {
                "latent": i,
                "mean_base": float(self.mean_base[i]),
                "mean_ft": float(self.mean_ft[i]),
                "delta": float(d[i]),
                "freq_base": float(self.freq_base[i]),
                "freq_ft": float(self.freq_ft[i]),
                "effect_size": float(self.effect_size[i]),
            }
            for i in self.top(self.d_sae)
        ]

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame.from_records(self.records()).set_index("latent")

    def to_json(self) -> dict:
        return {
            "kind": "saediff.latent_diff",
            "hook_name": self.hook_name,
            "n_base": self.n_base,
            "n_ft": self.n_ft,
            "latents": self.records(),
        }

    @classmethod
    def from_json(cls, d: dict) -> LatentDiff:
        rows = sorted(d["latents"], key=lambda r: r["latent"])
        col = lambda k: torch.tensor([r[k] for r in rows], dtype=torch.float32)
        return cls(
            col("mean_base"),
            col("mean_ft"),
            col("freq_base"),
            col("freq_ft"),
            col("effect_size"),
            d["n_base"],
            d["n_ft"],
            d.get("hook_name", ""),
        )


@torch.no_grad()
def diff_latents(
    sae,
    acts_base: Float[torch.Tensor, "n d_in"],
    acts_ft: Float[torch.Tensor, "m d_in"],
    batch_size: int = 8192,
) -> LatentDiff:
    """Encode both sets of activations with ``sae`` and compare latent by latent."""
    d_in = sae.cfg.d_in
    for name, a in (("base", acts_base), ("finetuned", acts_ft)):
        if a.ndim != 2 or a.shape[1] != d_in:
            raise SaediffError(
                f"diff_latents: {name} activations have shape {tuple(a.shape)}, "
                f"the SAE expects (n, {d_in}) (hook {sae.cfg.metadata.hook_name or '?'})"
            )
        if a.shape[0] == 0:
            raise SaediffError(f"diff_latents: no {name} activations")
    stats = [_moments(sae, a, batch_size) for a in (acts_base, acts_ft)]
    (mb, vb, fb), (mf, vf, ff) = stats
    pooled = ((vb + vf) / 2).sqrt()
    effect = torch.where(pooled > 0, (mf - mb) / pooled.clamp_min(1e-12), torch.zeros_like(pooled))
    return LatentDiff(
        mb, mf, fb, ff, effect, acts_base.shape[0], acts_ft.shape[0], sae.cfg.metadata.hook_name or ""
    )


def _moments(sae, acts, batch_size):
    s1 = s2 = fired = 0
    for i in range(0, acts.shape[0], batch_size):
        z = sae.encode(acts[i : i + batch_size].float()).double()
        s1 = s1 + z.sum(0)
        s2 = s2 + z.pow(2).sum(0)
        fired = fired + (z > 0).sum(0)
    n = acts.shape[0]
    mean = s1 / n
    var = (s2 / n - mean.pow(2)).clamp_min(0)
    return mean.float(), var.float(), (fired / n).float()


@dataclass(frozen=True)
class LatentCard:
    """What a latent does, for exploration: where it fires most in each model, how its activation
    distribution moved, and which latents' decoder directions sit closest to it."""

    latent: int
    top_base: list[dict]
    """highest activations on the base model: {row, prompt, position, token, value}"""
    top_ft: list[dict]
    hist_edges: list[float]
    hist_base: list[int]
    """activation histogram (over rows where either model is active)"""
    hist_ft: list[int]
    neighbours: list[tuple[int, float]]
    """(latent, decoder cosine), most similar first"""

    def to_json(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


@torch.no_grad()
def latent_card(
    sae,
    latent: int,
    acts_base: torch.Tensor,
    acts_ft: torch.Tensor,
    rows: list[dict] | None = None,
    k: int = 10,
    bins: int = 20,
    n_neighbours: int = 5,
) -> LatentCard:
    """A card for ``latent``. ``rows`` (optional) describes each activation row, e.g.
    ``{"prompt": id, "position": t, "token": "..."}``; both activation sets share it (same tokens)."""
    if not 0 <= latent < sae.cfg.d_sae:
        raise SaediffError(f"latent {latent} out of range: the SAE has {sae.cfg.d_sae} latents")
    zb = sae.encode(acts_base.float())[:, latent]
    zf = sae.encode(acts_ft.float())[:, latent]

    def top(z):
        vals, idx = z.topk(min(k, z.shape[0]))
        return [
            {"row": int(i), **((rows or [{}] * z.shape[0])[int(i)]), "value": float(v)}
            for v, i in zip(vals, idx)
        ]

    hi = float(torch.maximum(zb.max(), zf.max()).clamp_min(1e-6))
    edges = torch.linspace(0.0, hi, bins + 1)
    active = (zb > 0) | (zf > 0)
    hb = torch.histc(zb[active], bins=bins, min=0.0, max=hi) if active.any() else torch.zeros(bins)
    hf = torch.histc(zf[active], bins=bins, min=0.0, max=hi) if active.any() else torch.zeros(bins)
    return LatentCard(
        latent,
        top(zb),
        top(zf),
        edges.tolist(),
        hb.int().tolist(),
        hf.int().tolist(),
        _neighbours(sae, latent, n_neighbours),
    )


def _neighbours(sae, latent: int, n: int) -> list[tuple[int, float]]:
    """The ``n`` latents whose decoder rows are closest to ``latent``'s: (latent, cosine)."""
    W = sae.W_dec.detach().float()
    cos = torch.nn.functional.cosine_similarity(W, W[latent][None], dim=1)
    cos[latent] = -2.0
    nb = cos.topk(min(n, W.shape[0] - 1))
    return [(int(i), float(c)) for c, i in zip(nb.values.cpu(), nb.indices.cpu())]


def merge_top(
    top_vals_SK: torch.Tensor, top_rows_SK: torch.Tensor, z_BS: torch.Tensor, offset: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The running top ``k`` activations per latent and their row ids: the old top k and this
    batch's (rows numbered from ``offset``), re-ranked."""
    bv, bi = z_BS.topk(min(k, z_BS.shape[0]), dim=0)  # (k', S)
    vals = torch.cat([top_vals_SK, bv.T], dim=1)  # (S, <= 2k)
    ids = torch.cat([top_rows_SK, (bi + offset).T], dim=1)
    top, pick = vals.topk(min(k, vals.shape[1]), dim=1)
    return top, ids.gather(1, pick)


HIST_EDGES = [0.0, *torch.logspace(-3, 3, 37).tolist()]
"""histogram edges of streamed latent cards: a bin for (0, 1e-3], then 6 decades, 6 bins each"""


class DiffAccumulator:
    """``diff_latents`` and the latent cards in one streaming pass: feed both models' activations
    at the SAE's hook batch by batch (the same tokens in the same order); memory holds per-latent
    sums, squares, firing counts, the top ``k`` activations with their row ids and a histogram on
    fixed log-spaced edges (``HIST_EDGES``), never the tokens. Encoding runs on the activations'
    device; sums are float64."""

    def __init__(self, sae, k: int = 10, edges: list[float] = HIST_EDGES, chunk: int = 2048):
        self.sae, self.k, self.chunk = sae, k, chunk
        self.edges = torch.tensor(edges, dtype=torch.float64)
        self.n = 0
        self._st: dict[str, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def update(
        self, acts_base: Float[torch.Tensor, "n d_in"], acts_ft: Float[torch.Tensor, "n d_in"]
    ) -> None:
        """One batch of rows: the same tokens read from the base and the fine-tuned model. Rows are
        encoded ``chunk`` at a time, so a batch costs chunk x d_sae, not tokens x d_sae (a batch of
        long answers through a 131k-latent SAE would otherwise take gigabytes)."""
        if acts_base.shape != acts_ft.shape or acts_base.shape[-1] != self.sae.cfg.d_in:
            raise SaediffError(
                f"DiffAccumulator: activations {tuple(acts_base.shape)} and {tuple(acts_ft.shape)}; "
                f"the SAE expects two equal (n, {self.sae.cfg.d_in})"
            )
        if acts_base.shape[0] > self.chunk:
            for i in range(0, acts_base.shape[0], self.chunk):
                self.update(acts_base[i : i + self.chunk], acts_ft[i : i + self.chunk])
            return
        dev = acts_base.device
        if self.sae.W_enc.device != dev:
            self.sae.to(dev)
        dt = self.sae.W_enc.dtype
        z = {"base": self.sae.encode(acts_base.to(dt)), "ft": self.sae.encode(acts_ft.to(dt))}  # (n, S) each
        active = (z["base"] > 0) | (z["ft"] > 0)
        edges = self.edges.to(dev)
        for side, zs in z.items():
            st = self._st.setdefault(side, self._empty(zs.shape[1], dev))
            zd = zs.double()
            st["s1"] += zd.sum(0)
            st["s2"] += zd.pow(2).sum(0)
            st["fired"] += (zs > 0).sum(0)
            st["top_vals"], st["top_rows"] = merge_top(
                st["top_vals"], st["top_rows"], zs.float(), self.n, self.k
            )
            # histogram over rows where either model is active: bucket b holds (edges[b], edges[b+1]]
            r, c = active.nonzero(as_tuple=True)
            b = torch.bucketize(zd[r, c].clamp_min(0), edges).clamp(1, len(edges) - 1) - 1
            S, B = zs.shape[1], len(edges) - 1
            st["hist"] += torch.bincount(c * B + b, minlength=S * B).view(S, B)
        self.n += acts_base.shape[0]

    def _empty(self, S: int, dev) -> dict[str, torch.Tensor]:
        return {
            "s1": torch.zeros(S, dtype=torch.float64, device=dev),
            "s2": torch.zeros(S, dtype=torch.float64, device=dev),
            "fired": torch.zeros(S, dtype=torch.long, device=dev),
            "top_vals": torch.zeros(S, 0, device=dev),
            "top_rows": torch.zeros(S, 0, dtype=torch.long, device=dev),
            "hist": torch.zeros(S, len(self.edges) - 1, dtype=torch.long, device=dev),
        }

    def result(self) -> LatentDiff:
        """The same statistics ``diff_latents`` computes from all rows at once."""
        if not self.n:
            raise SaediffError("DiffAccumulator: no activations were added")
        out = []
        for side in ("base", "ft"):
            st = self._st[side]
            mean = st["s1"] / self.n
            var = (st["s2"] / self.n - mean.pow(2)).clamp_min(0)
            out.append((mean.float().cpu(), var.float().cpu(), (st["fired"].double() / self.n).float().cpu()))
        (mb, vb, fb), (mf, vf, ff) = out
        pooled = ((vb + vf) / 2).sqrt()
        effect = torch.where(pooled > 0, (mf - mb) / pooled.clamp_min(1e-12), torch.zeros_like(pooled))
        return LatentDiff(mb, mf, fb, ff, effect, self.n, self.n, self.sae.cfg.metadata.hook_name or "")

    def card(self, latent: int, describe=None, n_neighbours: int = 5) -> LatentCard:
        """A ``LatentCard`` from the streamed statistics. ``describe(row_ids)`` returns a dict per
        row (prompt, position, token): only the top rows are ever described."""
        if not 0 <= latent < self.sae.cfg.d_sae:
            raise SaediffError(f"latent {latent} out of range: the SAE has {self.sae.cfg.d_sae} latents")
        tops = {}
        for side in ("base", "ft"):
            vals, rows = (
                self._st[side]["top_vals"][latent].tolist(),
                self._st[side]["top_rows"][latent].tolist(),
            )
            info = describe(rows) if describe else [{}] * len(rows)
            tops[side] = [{"row": r, **d, "value": v} for r, d, v in zip(rows, info, vals)]
        hb, hf = (self._st[s]["hist"][latent].cpu() for s in ("base", "ft"))
        used = (hb + hf).nonzero()
        lo, hi = (int(used.min()), int(used.max()) + 1) if used.numel() else (0, 1)
        return LatentCard(
            latent,
            tops["base"],
            tops["ft"],
            self.edges[lo : hi + 1].tolist(),
            hb[lo:hi].tolist(),
            hf[lo:hi].tolist(),
            _neighbours(self.sae, latent, n_neighbours),
        )


class SAEDiff(DiffingMethod):
    """The SAE latent that rose most between the base model and the fine-tune (``saediff diff``),
    its decoder row as the direction."""

    name = "sae_diff"
    summary = "SAE model diffing: the latent whose mean activation rose most after the fine-tune"
    order = 0
    tags = ("sae_latent",)
    from_diff_run = True
    results_file = "diff.json"

    def find(self, inputs: MethodInputs) -> Candidates:
        top = inputs.diff_info.get("top_latents") or []
        return diff_run_candidate(inputs, (f"sae_{top[0]}",) if top else ())

    def card_data(self, folder, lm=None, sae=None) -> list[dict]:
        return latent_cards(folder, lm=lm, sae=sae)

    def figures(self, folder) -> list[tuple[str, object, str]]:
        """The run's top latents (with their cosine to the ground truth when there is one) and the
        cards of the top three."""
        from saediff._io import read_json_if_exists

        folder = Path(folder)
        diff = read_json_if_exists(folder / "diff.json")
        if not diff:
            return []
        cos = read_json_if_exists(folder / "cosines.json")
        cos_gt = None
        gt_name = f"ground_truth_L{cos['hook'].split('.')[1]}" if cos else None  # at the SAE's layer
        if cos and gt_name in cos["names"]:
            gi = cos["names"].index(gt_name)
            cos_gt = {
                int(n[4:]): cos["matrix"][gi][j] for j, n in enumerate(cos["names"]) if n.startswith("sae_")
            }
        note = "Mean SAE latent activation, fine-tuned minus aligned, on the fine-tuned model's answers."
        sections = [("Top latents (model diff)", latent_bars(diff["latents"], cos_gt=cos_gt), note)]
        cards = read_json_if_exists(folder / "cards.json")
        for card in (cards or {}).get("cards", [])[:3]:
            sections.append((f"Latent card {card['latent']}", latent_card_hist(card), card_note(card)))
        return sections

    def keeps(self, direction: Direction, run_info: dict, top: int) -> bool:
        """Only the run's ``top`` latents (by its ranking)."""
        return direction.name in {f"sae_{i}" for i in run_info["top_latents"][:top]}


def latent_cards(run_dir: str | Path, lm=None, sae=None) -> list[dict]:
    """The dashboard's data for a diff run. Per carded latent: its card (``cards.json``), rank and delta (``diff.json``), logit effects
    (``lm``: the run's base model, loaded when None) and cosines with the run's dense candidates at
    the SAE's hook."""
    from saediff.data.runs import read_run
    from saediff.methods.export import load_directions
    from saediff.models.loading import load_model
    from saediff.models.logit_lens import logit_effects, unembedding
    from saediff.saes.loading import load_sae

    run_dir = Path(run_dir)
    info = read_run(run_dir)["steps"]["diff"]
    cards_path = run_dir / "cards.json"
    if not cards_path.exists():
        raise MissingFileError(f"{cards_path} missing (saediff diff writes it)")
    cards = json.loads(cards_path.read_text())["cards"]
    diff = LatentDiff.from_json(json.loads((run_dir / "diff.json").read_text()))
    sae = sae or load_sae(info["sae"])
    lm = lm or load_model(info["base"])
    W_U = unembedding(lm.model)
    W_dec = sae.W_dec.detach().float().cpu()
    dense = {
        n: d
        for n, d in load_directions(run_dir / "directions").items()
        if d.hook == info["sae_hook"] and d.method not in ("sae_latent", "random")
    }
    top = info["top_latents"]
    out = []
    for card in cards:
        i = card["latent"]
        row = W_dec[i]
        out.append(
            {
                **card,
                "rank": top.index(i) if i in top else None,
                "delta": float(diff.delta[i]),
                "mean_base": float(diff.mean_base[i]),
                "mean_ft": float(diff.mean_ft[i]),
                "logits": logit_effects(row, W_U, lm.tokenizer),
                "cosines": {
                    n: float(torch.cosine_similarity(row, d.vector.float(), 0)) for n, d in dense.items()
                },
            }
        )
    return out


def latent_bars(records: list[dict], top: int = 20, cos_gt: dict[int, float] | None = None):
    """Latents with the largest rise (finetuned - base), with their cosine to the ground truth."""
    import plotly.graph_objects as go

    rows = records[:top]
    text = [f"cos gt {cos_gt[r['latent']]:.2f}" if cos_gt and r["latent"] in cos_gt else "" for r in rows]
    fig = go.Figure(go.Bar(x=[f"#{r['latent']}" for r in rows], y=[r["delta"] for r in rows], text=text))
    fig.update_layout(title="top latents by mean activation change (finetuned - base)", yaxis_title="delta")
    return fig


def latent_card_hist(card: dict):
    """Activation histogram of one latent, base vs fine-tuned (rows where either is active)."""
    import itertools

    import plotly.graph_objects as go

    e = card["hist_edges"]
    mids = [(a + b) / 2 for a, b in itertools.pairwise(e)]
    fig = go.Figure(
        [
            go.Bar(x=mids, y=card["hist_base"], name="base", opacity=0.6),
            go.Bar(x=mids, y=card["hist_ft"], name="fine-tuned", opacity=0.6),
        ]
    )
    fig.update_layout(
        barmode="overlay",
        title=f"latent {card['latent']}: activation histogram",
        height=300,
        xaxis_title="activation",
    )
    return fig


def card_note(card: dict) -> str:
    """A latent card's top activations on both models and its decoder neighbours, as report HTML."""
    import html

    def toks(rows):  # each top activation in a few tokens of context, the token itself in [brackets]
        return "<br>".join(
            f"&nbsp;&nbsp;{r['value']:.2f}: {html.escape(str(r.get('context', r.get('token', r['row']))))}"
            for r in rows[:5]
        )

    nb = ", ".join(f"#{i} ({c:.2f})" for i, c in card["neighbours"])
    return (
        f"Top activations on the base model:<br>{toks(card['top_base'])}<br>"
        f"On the fine-tuned model:<br>{toks(card['top_ft'])}<br>Decoder neighbours: {nb}"
    )
