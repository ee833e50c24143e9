"""``saediff report DIR``: one self-contained HTML page (plotly.js inlined once) for a demo run."""

from __future__ import annotations

import html
import json
from pathlib import Path

from saediff._io import atomic_write_bytes, read_json_if_exists
from saediff.reports import figures as viz

__all__ = ["format_figure", "write_report"]


def _card_html(card: dict) -> str:
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
    """The findings table: phenomenon, source, figure (95% interval), bar, holds, seed. A row without a
    verdict is ``reported`` (a figure with no bar) or ``not measured`` (no figure)."""

    def mark(r: dict) -> str:
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
        "<th>figure [95% interval]</th><th>bar</th><th>holds</th><th>seed</th></tr>" + body + "</table>"
    )


def _figure_text(r: dict) -> str:
    """A findings row's figure with its interval; a chat-demo row adds its t and the design split's figure."""
    text = format_figure(r["figure"], r.get("ci"))
    if r.get("t") is not None:
        text += f", t {r['t']:.1f}"
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
    from saediff.analyses.neighbourhood import neighbourhood_figure
    from saediff.analyses.phase import phase_figure
    from saediff.analyses.shifts import overlap_figure
    from saediff.analyses.susceptibility import susceptibility_figure

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


def _table(header: list[str], rows: list[list]) -> str:
    def cell(x) -> str:
        return html.escape(f"{x:.3f}" if isinstance(x, float) else "" if x is None else str(x))

    return (
        "<table border=1 cellpadding=4><tr>"
        + "".join(f"<th>{html.escape(h)}</th>" for h in header)
        + "</tr>"
        + "".join("<tr>" + "".join(f"<td>{cell(x)}</td>" for x in r) + "</tr>" for r in rows)
        + "</table>"
    )


def _chat_sections(s: dict) -> list[tuple[str, str]]:
    """The chat demo's tables: the SAE, steering by the pair metric, BLOCK-EM and sampled answers."""
    out = []
    sae = s.get("sae")
    if sae:
        keys = (
            "fvu",
            "l0",
            "dead_fraction",
            "dead_fraction_train",
            "ce_clean",
            "ce_sae",
            "ce_zero",
            "ce_loss_recovered",
            "n_train_tokens",
            "n_held_tokens",
        )
        out.append(
            (
                f"SAE at block {s.get('layer')} (answer tokens; metrics on held-out conversations)",
                _table(list(keys), [[sae.get(k) for k in keys]]),
            )
        )
    steer = s.get("steering")
    if steer:
        rows = [
            [
                name,
                c.get("scale"),
                c.get("effect"),
                c.get("random_effects") and ", ".join(f"{x:+.3f}" for x in c["random_effects"]),
                c.get("above_random"),
                c.get("mc1"),
                c.get("mc1_random_mean"),
                c.get("note") or "",
            ]
            for name, c in steer["candidates"].items()
        ]
        out.append(
            (
                "Steering the base model, scored by the pair metric",
                f"<p>{html.escape(steer['protocol'])}; base preference on the held-out split "
                f"{steer['base']['preference']:+.3f}.</p>"
                + _table(
                    [
                        "candidate",
                        "scale (x resid norm)",
                        "preference added",
                        "random directions",
                        "above every random",
                        "MC1",
                        "MC1 random mean",
                        "note",
                    ],
                    rows,
                ),
            )
        )
    project = (steer or {}).get("project")
    if project:
        rows = [
            [
                kind,
                name,
                c["removed"],
                c["removed_ci"] and f"[{c['removed_ci'][0]:+.3f}, {c['removed_ci'][1]:+.3f}]",
                c["share"],
                c["above_random"],
                c["mc1"],
            ]
            for kind in ("project", "clamp")
            for name, c in project[kind]["candidates"].items()
        ]
        rnd = "; ".join(
            f"{kind} {', '.join(f'{x:+.3f}' for x in project[kind]['random_removed'])}"
            for kind in ("project", "clamp")
        )
        out.append(
            (
                "Projecting or clamping each candidate in the bad fine-tune, scored by the pair metric",
                f"<p>{html.escape(project['protocol'])}; the fine-tune's held-out preference "
                f"{project['finetuned_preference']:+.3f}, its shift from the base model {project['shift']:+.3f}; "
                f"random directions remove {rnd}.</p>"
                + _table(
                    [
                        "check",
                        "candidate",
                        "preference removed",
                        "95% CI (paired)",
                        "share of the shift",
                        "above every random",
                        "MC1 after",
                    ],
                    rows,
                ),
            )
        )
    block = s.get("blocking")
    if block:
        rows = [
            [name, pair_set, b["bad_shift"], b["shift"], b["kept"], b["cut"]]
            for name, per in block.items()
            for pair_set, b in per.items()
        ]
        out.append(
            (
                "BLOCK-EM (full fine-tune on bad advice, latents held where the base model has them)",
                _table(["run", "pair set", "bad - base", "blocked - base", "shift kept", "shift cut"], rows),
            )
        )
    analyses = s.get("analyses") or {}
    if analyses.get("susceptibility") or analyses.get("overlap"):
        out.append(("Open questions by the pair metric", _chat_analyses_html(analyses)))
    samples = s.get("samples")
    if samples:
        body = "".join(
            f"<h3>{html.escape(name)}</h3>"
            + "".join(
                f"<p><b>{html.escape(a['question'])}</b><br>{html.escape(a['answer'])}</p>" for a in answers
            )
            for name, answers in samples.items()
        )
        out.append(("Sampled answers (temperature 1, one per question)", body))
    return out


def _chat_analyses_html(a: dict) -> str:
    """Susceptibility and train/eval overlap of the chat demo, each figure beside its baseline."""
    f = lambda v: "n/a" if v is None else f"{v:+.3f}"
    parts = []
    sus = a.get("susceptibility")
    if sus:
        perm = sus["permutation"]
        parts.append(
            f"<p><b>Susceptibility</b>: does the base model's residual at a question's last prompt token (block "
            f"{sus['layer']}) predict how far the bad fine-tune moves its preference (mean shift "
            f"{f(sus['mean_shift'])})? Ridge, {sus['folds']} folds holding out whole domains, "
            f"{sus['n_questions']} questions: held-out R<sup>2</sup> {f(sus['r2'])}, Spearman {f(sus['spearman'])}; "
            f"random features {f(sus['random_features']['r2'])} / {f(sus['random_features']['spearman'])}; permuted "
            f"targets p95 {f(perm['r2']['p95'] if perm['r2'] else None)} / "
            f"{f(perm['spearman']['p95'] if perm['spearman'] else None)}, p = {perm['p_value']:.3f}.</p>"
        )
    ov = a.get("overlap")
    if ov:
        rows = [
            [i + 1, c, m, q]
            for i, (c, m, q) in enumerate(
                zip(ov["principal_cosines"], ov["random_baseline"]["mean"], ov["random_baseline"]["p95"])
            )
        ]
        sp, null = ov["spearman_with_preference_shift"], ov["spearman_permuted_p95"]
        parts.append(
            f"<p><b>Train/eval shift overlap</b> at block {ov['layer']}: the bad fine-tune's activation shift on "
            f"{ov['n_train']} of its training prompts and on {ov['n_eval']} off-domain questions; cosine of the mean "
            f"shifts {f(ov['mean_shift_cosine'])}. Per question, Spearman with its preference shift: cosine to the "
            f"mean training shift {f(sp['cos_to_train_mean'])}, fraction in the training subspace "
            f"{f(sp['fraction_in_train_subspace'])} (shuffled shifts: |rho| p95 {null['cos_to_train_mean']:.3f} / "
            f"{null['fraction_in_train_subspace']:.3f}; random fraction "
            f"{ov['random_baseline']['per_question_fraction']:.3f}).</p>"
            + _table(["principal angle", "cosine", "random mean", "random p95"], rows)
        )
    return "".join(parts)


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
    diff = read_json_if_exists(run_dir / "diff" / "diff.json")
    cos = read_json_if_exists(run_dir / "diff" / "cosines.json")
    if diff:
        cos_gt = None
        gt_name = f"ground_truth_L{cos['hook'].split('.')[1]}" if cos else None  # at the SAE's layer
        if cos and gt_name in cos["names"]:
            gi = cos["names"].index(gt_name)
            cos_gt = {
                int(n[4:]): cos["matrix"][gi][j] for j, n in enumerate(cos["names"]) if n.startswith("sae_")
            }
        sections.append(
            (
                "Top latents (model diff)",
                viz.latent_bars(diff["latents"], cos_gt=cos_gt),
                "Mean SAE latent activation, fine-tuned minus aligned, on the fine-tuned model's answers.",
            )
        )
        cards = read_json_if_exists(run_dir / "diff" / "cards.json")
        for card in (cards or {}).get("cards", [])[:3]:
            sections.append((f"Latent card {card['latent']}", viz.latent_card_hist(card), _card_html(card)))
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
            ("BLOCK-EM", viz.blocking_bars(block), "Plain fine-tune vs blocked vs random latents.")
        )
        hist = read_json_if_exists(run_dir / "block" / "plain" / "history.json")
        if hist:
            sections.append(("Drift monitor (plain fine-tune)", viz.drift_curves(hist["drift"]), ""))
    sections += _analysis_sections(run_dir)
    summary = read_json_if_exists(run_dir / "summary.json")
    if summary and summary.get("kind") == "saediff.chat_demo":
        sections.append(
            (
                "EM by the pair metric",
                viz.pair_preferences(summary["em"]),
                "Base model and each fine-tune, per pair set: reference answers scored teacher-forced, "
                "no judge.",
            )
        )
    texts = _chat_sections(summary) if summary and summary.get("kind") == "saediff.chat_demo" else []
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
    out = run_dir / "report.html"
    atomic_write_bytes(out, "\n".join(parts).encode())
    return out
