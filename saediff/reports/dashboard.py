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
import logging
from pathlib import Path

from saediff.methods.base import DiffingMethod

__all__ = ["card_html", "crosscoder_card_html", "dashboard_data", "dashboard_html", "write_dashboard"]

log = logging.getLogger(__name__)


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
    from saediff.methods.sae_diff import latent_card_hist

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

    label = lambda d: _LABEL[d["method"]](d)
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
        f"<p>Latents: {index}</p>" + "".join(_CARD_HTML[d["method"]](d) for d in data) + "</body></html>"
    )


def write_dashboard(run_dir: str | Path, out: str | Path | None = None, lm=None) -> Path:
    """``RUN/dashboard.html`` (or ``out``): the dashboards of every latent the run carded, whichever
    registered method's run it is (a diff run, a crosscoder diff run)."""
    from saediff._io import atomic_write_bytes

    run_dir = Path(run_dir)
    data = dashboard_data(run_dir, lm=lm)
    path = Path(out or run_dir / "dashboard.html")
    atomic_write_bytes(path, dashboard_html(data, f"saediff feature dashboards: {run_dir}").encode())
    return path


def dashboard_data(run_dir: str | Path, lm=None, sae=None) -> list[dict]:
    """The cards of the run in ``run_dir``, from the registered method whose run it is
    (``DiffingMethod.has_results`` and ``card_data``), each tagged with that method's name; a
    folder no method recognises is read as a diff run (whose loader names what is missing)."""
    from saediff.methods.base import get_method, registry

    carding = [m for m in registry() if type(m).card_data is not DiffingMethod.card_data]
    method = next((m for m in carding if m.has_results(run_dir)), get_method("sae_diff"))
    kwargs = {"sae": sae} if sae is not None else {}
    return [{**d, "method": method.name} for d in method.card_data(run_dir, lm=lm, **kwargs)]


_CARD_HTML = {"sae_diff": card_html, "crosscoder": crosscoder_card_html}
"""how each carding method's card reads (a new carding method adds its renderer here)"""
_LABEL = {
    "sae_diff": lambda d: f"{d['delta']:+.2f}",
    "crosscoder": lambda d: f"rel_norm {d['rel_norm']:.2f}",
}
