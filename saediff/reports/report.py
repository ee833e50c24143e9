"""``saediff report DIR``: one self-contained HTML page (plotly.js inlined once) for a demo run."""

from __future__ import annotations

import html
import json
from pathlib import Path

from saediff._io import atomic_write_bytes, read_json_if_exists
from saediff.methods.base import registry
from saediff.reports import figures as viz
from saediff.reports.chat_sections import chat_sections

__all__ = ["format_figure", "write_report"]


def format_figure(fig, ci=None) -> str:
    """A findings-table figure as text: ``-`` when not measured, pairs joined by `` / ``, floats
    to 3 significant digits, then the 95% interval when there is one (the report and the CLI)."""
    if fig is None:
        return "-"
    if isinstance(fig, (list, tuple)):
        return " / ".join(format_figure(x) for x in fig)
    text = f"{fig:.3g}" if isinstance(fig, float) else str(fig)
    return text + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def _headline_html(rows: list[dict]) -> str:
    """The findings table: phenomenon, source, figure (95% interval), bar, verdict, seed. A row read
    off an interval shows its verdict word (holds / fails / inconclusive); others yes / no; a row
    without either is ``reported`` (a figure with no bar) or ``not measured`` (no figure)."""

    def mark(r: dict) -> str:
        if r.get("verdict") and r["bar"] != "report":
            return r["verdict"] if r["verdict"] == "holds" else f"<b>{html.escape(r['verdict'])}</b>"
        if r["holds"] is None:
            return "not measured" if r["figure"] is None else "reported"
        return "yes" if r["holds"] else "<b>no</b>"

    body = "".join(
        f"<tr><td>{html.escape(r['phenomenon'])}</td><td>{html.escape(r.get('source') or '')}</td>"
        f"<td>{html.escape(_figure_text(r))}</td><td>{html.escape(r['bar'])}</td>"
        f"<td>{mark(r)}</td><td>{r.get('seed', '')}</td></tr>"
        for r in rows
    )
    return (
        "<h2>Findings</h2><table border=1 cellpadding=4><tr><th>phenomenon</th><th>source</th>"
        "<th>figure [95% interval]</th><th>bar</th><th>verdict</th><th>seed</th></tr>" + body + "</table>"
    )


def _figure_text(r: dict) -> str:
    """A findings row's figure with its interval; a chat-demo row adds its t and the design split's figure."""
    text = format_figure(r["figure"], r.get("ci"))
    if r.get("t") is not None:
        text += f", t {r['t']:.1f}"
    if r.get("share") is not None:
        text += f"; share of the shift {format_figure(r['share'], r.get('share_ci'))}"
    if r.get("medical_ci"):
        text += f"; medical EM interval [{r['medical_ci'][0]:.2f}, {r['medical_ci'][1]:.2f}]"
    if r.get("random") is not None:
        text += "; random directions " + ", ".join(f"{x:+.3f}" for x in r["random"])
    if r.get("versus_bad") is not None:
        text += f"; blocked - bad fine-tune {format_figure(r['versus_bad'], r.get('versus_bad_ci'))}"
    d = r.get("design")
    if d:
        t = f", t {d['t']:.1f}" if d.get("t") is not None else ""
        text += f" (design split: {format_figure(d['figure'], d.get('ci'))}{t})"
    return text


def _projection_table(proj: dict) -> str:
    """Projection results as an HTML table: EM after projecting each candidate out, at its layer
    and after every block."""

    def pct(x):
        return "" if x is None else f"{round(100 * x)}%"

    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{r['other_misaligned']:.3f}</td><td>{pct(r['relative_cut'])}</td>"
        f"<td>{r.get('all_layers_other_misaligned', float('nan')):.3f}</td><td>{pct(r.get('all_layers_relative_cut'))}</td></tr>"
        for name, r in proj.items()
    )
    return (
        "Projected out of the fine-tuned model (other-domain misaligned rate, relative cut):"
        "<table border=1 cellpadding=4><tr><th>direction</th><th>at its layer</th><th>cut</th>"
        f"<th>every layer</th><th>cut</th></tr>{rows}</table>"
    )


def _span_text(span: dict | None) -> str:
    """One sentence: how much of each dense direction lies in the span of the top latents."""
    if not span:
        return ""
    parts = ", ".join(f"{html.escape(n)} {v:.2f}" for n, v in span["per_direction"].items())
    return (
        f" Cosine of each direction with the span of the top {len(span['span'])} latents: {parts}"
        f" (random direction: {span['random_rms']:.2f})."
    )


def _analysis_sections(run_dir: Path) -> list[tuple[str, object, str]]:
    """Sections for the open-question analyses whose files the run folder holds."""
    from saediff.analyses.icl import icl_figure
    from saediff.analyses.phase import phase_figure
    from saediff.analyses.shifts import overlap_figure
    from saediff.analyses.susceptibility import susceptibility_figure

    out = _neighbourhood_sections(run_dir)
    ov = read_json_if_exists(run_dir / "diff" / "shift_overlap.json")
    if ov:
        sp = ov["spearman_with_misaligned_rate"]
        out.append(
            (
                "Train/eval shift overlap",
                overlap_figure(ov),
                f"Principal-angle cosines between the top-{ov['k']} subspaces of the fine-tune's activation shifts "
                f"on its training prompts and on the evaluation questions, random subspaces beside them. Per "
                f"question, Spearman of the fraction in the train subspace with the misaligned rate: "
                f"{format_figure(sp['fraction_in_train_subspace'])}.",
            )
        )
    sus = read_json_if_exists(run_dir / "diff" / "susceptibility.json")
    if sus:
        out.append(
            (
                "Susceptibility before fine-tuning",
                susceptibility_figure(sus),
                "Ridge from the aligned model's last-prompt-token activations to each question's misaligned rate "
                "after fine-tuning, scored on held-out folds of questions.",
            )
        )
    ph = read_json_if_exists(run_dir / "phase" / "phase.json") or read_json_if_exists(
        run_dir / "analyses" / "phase" / "phase.json"
    )  # the organism demo's, the chat demo's
    if ph:
        out.append(
            (
                "Phase transition of a rank-1 LoRA fine-tune",
                phase_figure(ph),
                f"B direction per checkpoint; the largest rotation at step {ph['rotation_step']}, EM reaches half "
                f"its peak at step {ph['em_step']}.",
            )
        )
    icl = read_json_if_exists(run_dir / "diff" / "icl_vs_ft.json")
    if icl:
        note = f"Shots to match the fine-tune: {icl['shots_to_match_finetune']}."
        if "rerouted" in icl:
            note += (
                f" Rerouted latents {icl['rerouted']['latents']}: raised by context "
                f"{icl['rerouted']['raised_by_context']}."
            )
        out.append(("Language vs fine-tune along the persona direction", icl_figure(icl), note))
    return out


def _neighbourhood_sections(run_dir: Path) -> list[tuple[str, object, str]]:
    """The neighbourhood probe of each fine-tune the run folder holds one for, with its data screen."""
    from saediff.analyses.neighbourhood import neighbourhood_figure

    out = []
    for sub, what in (
        ("diff", "full fine-tune"),
        ("diff_control", "aligned-data control fine-tune"),
        ("diff_benign", "benign-trait fine-tune"),
    ):
        nb = read_json_if_exists(run_dir / sub / "neighbourhood.json")
        if nb:
            rb = nb["random_baseline"]
            note = (
                f"Flagged: {nb['flagged'] or 'none'} (random seeds flag {rb['n_flagged']}). Seeds: the latents "
                f"that rose most on the training rows; {html.escape(nb['thresholds']['rule'])}."
            )
            fin = nb.get("screen", {}).get("finetune")
            if fin:
                note += (
                    f" Data screen: EM {fin['screened']['em_rate']:.2f} after dropping the "
                    f"{nb['screen']['n_dropped']} rows that fire the flagged latents most, "
                    f"{fin['random_dropped']['em_rate']:.2f} after dropping as many at random ({fin['steps']} steps)."
                )
            out.append((f"Neighbourhood probe ({what})", neighbourhood_figure(nb), note))
    return out


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html`` from whatever artifacts the run folder holds."""
    run_dir = Path(run_dir)
    sections: list[tuple[str, object, str]] = []
    organism = read_json_if_exists(run_dir / "organism" / "organism.json")
    if organism:
        sections.append(
            (
                "EM rates per domain",
                viz.em_by_domain(organism),
                "Aligned, fully fine-tuned, rank-1 LoRA and control models; exact judge on content tokens.",
            )
        )
    for method in registry():  # each diffing method's own figures of the run's diff
        sections += method.figures(run_dir / "diff")
    summary = read_json_if_exists(run_dir / "summary.json")
    sections += _cosine_sections(run_dir)
    sections += _steer_block_sections(run_dir, (summary or {}).get("blocking"))
    sections += _analysis_sections(run_dir)
    chat = summary and summary.get("kind") == "saediff.chat_demo"
    if chat:
        sections.append(
            (
                "EM by the pair metric",
                viz.pair_preferences(summary["em"]),
                "Base model and each fine-tune, per pair set: reference answers scored teacher-forced, "
                "no judge.",
            )
        )
    out = run_dir / "report.html"
    atomic_write_bytes(out, _page(summary, sections, chat_sections(summary) if chat else []).encode())
    return out


def _cosine_sections(run_dir: Path) -> list[tuple[str, object, str]]:
    """The cosine table at the SAE's hook and the per-layer curves, of the full and the LoRA diff."""
    sections = []
    for name, sub in (("full fine-tune", "diff"), ("rank-1 LoRA", "diff_lora")):
        c = read_json_if_exists(run_dir / sub / "cosines.json")
        if c:
            import torch

            from saediff.methods.directions import CosineTable as CT

            table = CT(c["names"], c["hook"], torch.tensor(c["matrix"]), c["random_baseline"])
            sections.append(
                (
                    f"Cosines at {c['hook']} ({name})",
                    table.figure(),
                    "Random-vector |cos| baseline in the title." + _span_text(c.get("span_of_top_latents")),
                )
            )
        layers = read_json_if_exists(run_dir / sub / "layers.json")
        if layers and layers["curves"]:
            sections.append((f"Per-layer and downstream cosines ({name})", viz.layer_curves(layers), ""))
    return sections


def _steer_block_sections(run_dir: Path, cuts: dict | None = None) -> list[tuple[str, object, str]]:
    """The organism's steering checks with the projections, BLOCK-EM (with the summary's cuts and
    their intervals, ``cuts``) and the plain run's drift monitor."""
    sections = []
    steering = read_json_if_exists(run_dir / "diff" / "steering.json")
    if steering:
        sections.append(
            (
                "Steering with top latents and dense candidates",
                viz.steering_sweep(steering),
                _projection_table(steering.get("project_out", {})),
            )
        )
    block = read_json_if_exists(run_dir / "block" / "summary.json")
    if block:
        sections.append(
            (
                "BLOCK-EM",
                viz.blocking_bars(block),
                "Plain fine-tune vs blocked vs random latents." + _cut_text(cuts),
            )
        )
        hist = read_json_if_exists(run_dir / "block" / "plain" / "history.json")
        if hist:
            sections.append(("Drift monitor (plain fine-tune)", viz.drift_curves(hist["drift"]), ""))
    return sections


def _cut_text(b: dict | None) -> str:
    """One sentence: the organism's other-domain EM cuts with their paired bootstrap intervals over
    answers (empty for a summary without them, or the chat demo's, whose cuts are per pair set)."""
    if not b or "relative_reduction" not in b:
        return ""
    cut = lambda key: html.escape(format_figure(b[key], b.get(f"{key}_ci")))
    return (
        f" Other-domain EM cut (1 - EM over the plain fine-tune's; 95% interval from a paired bootstrap "
        f"over answers): blocked {cut('relative_reduction')}, random latents {cut('random_relative_reduction')}."
    )


def _page(summary: dict | None, sections: list[tuple[str, object, str]], texts: list[tuple[str, str]]) -> str:
    """The HTML page: the findings table, each figure (plotly.js inlined with the first), the
    text sections, and summary.json for the record."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>saediff report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}pre{background:#f4f4f4;padding:8px}</style>",
        "</head><body><h1>saediff report</h1>",
    ]
    if summary and summary.get("headline"):
        parts.append(_headline_html(summary["headline"]))
    first = True
    for title, fig, note in sections:
        parts.append(f"<h2>{html.escape(title)}</h2><p>{note}</p>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs="inline" if first else False))
        first = False
    for title, body in texts:
        parts.append(f"<h2>{html.escape(title)}</h2>{body}")
    if summary:  # every figure, for the record, after the findings and plots
        parts.append(
            f"<details><summary>summary.json</summary><pre>{html.escape(json.dumps(summary, indent=2))}"
            "</pre></details>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)
