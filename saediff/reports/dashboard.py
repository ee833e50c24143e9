"""Feature dashboards for a diff run, in the SAELens / Neuronpedia layout but with the diff's two
models side by side: for each latent the run carded (its top risers and fallers), the top
activations with context in the base and the fine-tuned model, the activation histograms before
and after, the logit effects of its decoder row, its decoder neighbours, and its cosine with the
run's dense candidates. One self-contained HTML page per run (plotly inlined once).

``sae-dashboard`` was the first choice; it does not fit: it renders one model's activations (no
before/after view) and pins transformer-lens < 3 and transformers < 5 (it would replace the
TransformerLens 3 / transformers 5 stack saediff runs on, and pull a CUDA torch).

    saediff dashboard RUN            # RUN/dashboard.html
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path

import torch

from saediff.errors import MissingFileError
from saediff.models.logit_lens import logit_effects, unembedding

__all__ = [
    "card_html",
    "crosscoder_card_html",
    "crosscoder_dashboard_data",
    "dashboard_data",
    "dashboard_html",
    "write_dashboard",
]

log = logging.getLogger(__name__)


def dashboard_data(run_dir: str | Path, lm=None, sae=None) -> list[dict]:
    """Per carded latent: its card (``cards.json``), rank and delta (``diff.json``), logit effects
    (``lm``: the run's base model, loaded when None) and cosines with the run's dense candidates at
    the SAE's hook."""
    from saediff.data.runs import read_run
    from saediff.methods.export import load_directions
    from saediff.methods.sae_diff import LatentDiff
    from saediff.models.loading import load_model
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


def _examples(rows: list[dict], peak: float) -> str:
    """Top activations as Neuronpedia-style snippets: the context with the firing token shaded by
    its activation (relative to the latent's peak over both models)."""
    items = []
    for r in rows[:8]:
        ctx = html.escape(str(r.get("context", r.get("token", r["row"]))))
        alpha = max(0.15, min(1.0, r["value"] / peak)) if peak > 0 else 0.15
        ctx = ctx.replace("[", f"<mark style='background:rgba(255,120,0,{alpha:.2f})'>", 1).replace(
            "]", "</mark>", 1
        )
        items.append(
            f"<div class='ex'><span class='v'>{r['value']:.2f}</span> {ctx} "
            f"<span class='p'>{html.escape(str(r.get('prompt', '')))}</span></div>"
        )
    return "".join(items) or "<i>never fires</i>"


def card_html(d: dict) -> str:
    """One latent's card (an entry of ``dashboard_data``) as HTML; the page inlines plotly.js once."""
    from saediff.reports.figures import latent_card_hist

    peak = max([r["value"] for r in d["top_base"] + d["top_ft"]] or [0.0])
    logit = lambda pairs: "".join(f"<tr><td>{html.escape(t)}</td><td>{v:+.2f}</td></tr>" for t, v in pairs)
    nb = ", ".join(f"<a href='#latent-{j}'>#{j}</a> ({c:.2f})" for j, c in d["neighbours"])
    cos = ", ".join(
        f"{html.escape(n)} {c:+.2f}" for n, c in sorted(d["cosines"].items(), key=lambda x: -abs(x[1]))
    )
    rank = f"rank {d['rank']} of the diff" if d["rank"] is not None else "fell most"
    hist = latent_card_hist(d).to_html(full_html=False, include_plotlyjs=False)
    return (
        f"<section id='latent-{d['latent']}'><h2>latent {d['latent']} <small>{rank}: mean {d['mean_base']:.3f} "
        f"&rarr; {d['mean_ft']:.3f} (delta {d['delta']:+.3f})</small></h2>"
        f"<div class='grid'><div><h3>top activations, base model</h3>{_examples(d['top_base'], peak)}"
        f"<h3>top activations, fine-tuned model</h3>{_examples(d['top_ft'], peak)}</div>"
        f"<div><h3>activation histogram</h3>{hist}"
        f"<h3>logit effects (direct path)</h3><table><tr><th>promoted</th><th></th></tr>{logit(d['logits']['promoted'])}"
        f"<tr><th>suppressed</th><th></th></tr>{logit(d['logits']['suppressed'])}</table>"
        f"<h3>decoder neighbours</h3><p>{nb}</p><h3>cosine with the dense candidates</h3><p>{cos or '-'}</p>"
        f"</div></div></section>"
    )


def crosscoder_dashboard_data(run_dir: str | Path, lm=None) -> list[dict]:
    """Per carded latent of a ``saediff crosscoder diff`` run: its card (``cards.json``: class,
    decoder norms, rel_norm, latent scaling, top contexts) and the logit effects of its fine-tune
    decoder row (``directions/cc_J``) on the run's base model."""
    from saediff.methods.export import load_directions
    from saediff.models.loading import load_model

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


def crosscoder_card_html(d: dict) -> str:
    """One crosscoder latent's card: where it fires (the code reads both models at once), its
    decoder norms and latent-scaling ratios, and what its fine-tune decoder row promotes."""
    peak = max([r["value"] for r in d["top"]] or [0.0])
    logit = lambda pairs: "".join(f"<tr><td>{html.escape(t)}</td><td>{v:+.2f}</td></tr>" for t, v in pairs)
    num = lambda v: "n/a" if v is None else f"{v:.3f}"
    return (
        f"<section id='latent-{d['latent']}'><h2>latent {d['latent']} <small>{d['class']}: rel_norm "
        f"{d['rel_norm']:.3f} (|d_base| {d['norm_base']:.3f}, |d_ft| {d['norm_ft']:.3f}, cosine {d['cosine']:+.2f}); "
        f"nu_r {num(d['nu_r'])}, nu_eps {num(d['nu_eps'])}; fires on {100 * d['freq']:.2f}% of tokens</small></h2>"
        f"<div class='grid'><div><h3>top activations</h3>{_examples(d['top'], peak)}</div>"
        f"<div><h3>logit effects of the fine-tune decoder (direct path)</h3><table><tr><th>promoted</th><th></th></tr>"
        f"{logit(d['logits']['promoted'])}<tr><th>suppressed</th><th></th></tr>{logit(d['logits']['suppressed'])}"
        f"</table></div></div></section>"
    )


def dashboard_html(data: list[dict], title: str) -> str:
    """The page: an index of the latents, then one card each (a diff run's, or a crosscoder run's);
    plotly.js inlined once."""
    import plotly.offline

    label = lambda d: f"{d['delta']:+.2f}" if "delta" in d else f"rel_norm {d['rel_norm']:.2f}"
    index = " ".join(f"<a href='#latent-{d['latent']}'>#{d['latent']} ({label(d)})</a>" for d in data)
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:auto}.grid{display:grid;grid-template-columns:1fr 1fr;"
        "gap:16px}.ex{font-family:monospace;font-size:12px;margin:2px 0}.v{color:#a40;display:inline-block;width:3em}"
        ".p{color:#888}section{border-top:1px solid #ccc;margin-top:16px}table{font-family:monospace;font-size:12px}"
    )
    js = plotly.offline.get_plotlyjs()
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style>"
        f"<script type='text/javascript'>{js}</script></head><body><h1>{html.escape(title)}</h1>"
        f"<p>Latents: {index}</p>"
        + "".join(card_html(d) if "delta" in d else crosscoder_card_html(d) for d in data)
        + "</body></html>"
    )


def write_dashboard(run_dir: str | Path, out: str | Path | None = None, lm=None) -> Path:
    """``RUN/dashboard.html`` (or ``out``): the dashboards of every latent the diff run (or the
    crosscoder diff run) carded."""
    from saediff._io import atomic_write_bytes

    run_dir = Path(run_dir)
    crosscoder = (run_dir / "crosscoder_diff.json").exists()
    data = crosscoder_dashboard_data(run_dir, lm=lm) if crosscoder else dashboard_data(run_dir, lm=lm)
    path = Path(out or run_dir / "dashboard.html")
    atomic_write_bytes(path, dashboard_html(data, f"saediff feature dashboards: {run_dir}").encode())
    return path
