"""The chat demo's sections of the report (``reports.report.write_report``): tables of the SAE,
steering by the pair metric, the projection checks, BLOCK-EM, the open questions and sampled
answers."""

from __future__ import annotations

import html

__all__ = ["chat_sections", "table"]


def table(header: list[str], rows: list[list]) -> str:
    """An HTML table: floats to 3 decimals, None as an empty cell."""

    def cell(x) -> str:
        return html.escape(f"{x:.3f}" if isinstance(x, float) else "" if x is None else str(x))

    return (
        "<table border=1 cellpadding=4><tr>"
        + "".join(f"<th>{html.escape(h)}</th>" for h in header)
        + "</tr>"
        + "".join("<tr>" + "".join(f"<td>{cell(x)}</td>" for x in r) + "</tr>" for r in rows)
        + "</table>"
    )


def chat_sections(s: dict) -> list[tuple[str, str]]:
    """The chat demo's tables: the SAE, steering by the pair metric, BLOCK-EM and sampled answers."""
    steer = s.get("steering")
    analyses = s.get("analyses") or {}
    return [
        *_sae_section(s.get("sae"), s.get("layer")),
        *_steer_section(steer),
        *_project_section((steer or {}).get("project")),
        *_block_section(s.get("blocking")),
        *(
            [("Open questions by the pair metric", _chat_analyses_html(analyses))]
            if analyses.get("susceptibility") or analyses.get("overlap")
            else []
        ),
        *_samples_section(s.get("samples")),
    ]


def _sae_section(sae: dict | None, layer) -> list[tuple[str, str]]:
    if not sae:
        return []
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
    return [
        (
            f"SAE at block {layer} (answer tokens; metrics on held-out conversations)",
            table(list(keys), [[sae.get(k) for k in keys]]),
        )
    ]


def _steer_section(steer: dict | None) -> list[tuple[str, str]]:
    if not steer:
        return []
    rows = [
        [
            name,
            c.get("scale"),
            c.get("cost_kl"),
            c.get("effect"),
            _ci(c.get("effect_ci")),
            c.get("p_value"),
            (c.get("null_quantiles") or {}).get("q50"),
            (c.get("null_quantiles") or {}).get("q95"),
            c.get("beats_null"),
            c.get("verdict"),
            (c.get("equal_norm") or {}).get("null_mean_effect"),
            c.get("mc1"),
            c.get("note") or "",
        ]
        for name, c in steer["candidates"].items()
    ]
    null = steer.get("null_config") or {}
    return [
        (
            "Steering the base model, scored by the pair metric",
            f"<p>{html.escape(steer['protocol'])}. Budget {steer['kl_budget']:g} nats per neutral token "
            f"(levels {', '.join(f'{x:g}' for x in steer['costs'])}); null: {null.get('n_isotropic')} "
            f"isotropic and {null.get('n_covariance')} covariance-matched directions (seed {null.get('seed')}); "
            f"base preference on the held-out split {steer['base']['preference']:+.3f}.</p>"
            + table(
                [
                    "candidate",
                    "scale (x resid norm)",
                    "cost (KL/token)",
                    "preference added",
                    "95% CI (paired)",
                    "p (null)",
                    "null median",
                    "null 95th pct",
                    "beats null",
                    "verdict",
                    "null at equal norm",
                    "MC1",
                    "note",
                ],
                rows,
            ),
        ),
        *_style_crossed_section(steer),
    ]


def _style_crossed_section(steer: dict) -> list[tuple[str, str]]:
    """The same candidates through the same protocol on the style-crossed pairs (its halves choose and
    report)."""
    cross = steer.get("style_crossed")
    if not cross:
        return []
    rows = [
        [
            name,
            sc.get("scale"),
            sc.get("cost_kl"),
            sc.get("effect"),
            _ci(sc.get("effect_ci")),
            sc.get("p_value"),
            (sc.get("null_quantiles") or {}).get("q95"),
            sc.get("verdict"),
            c.get("verdict"),
            sc.get("note") or "",
        ]
        for name, c in steer["candidates"].items()
        for sc in [c.get("style_crossed") or {}]
    ]
    return [
        (
            "Steering the base model on the style-crossed pairs",
            f"<p>The same candidates, budget and null on {html.escape(str(cross['pair_set']))} (misaligned "
            "answers in the aligned references' careful register, aligned ones in the bad data's blunt "
            f"one): {cross['n_select']} questions choose the cost level, {cross['n_report']} report; base "
            f"preference there {cross['base']['preference']:+.3f}. A direction that carries only the "
            "references' style adds little or negative preference here.</p>"
            + table(
                [
                    "candidate",
                    "scale (x resid norm)",
                    "cost (KL/token)",
                    "preference added",
                    "95% CI (paired)",
                    "p (null)",
                    "null 95th pct",
                    "verdict",
                    "verdict held out",
                    "note",
                ],
                rows,
            ),
        )
    ]


def _ci(ci: list[float] | None) -> str | None:
    return ci and f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def _project_section(project: dict | None) -> list[tuple[str, str]]:
    if not project:
        return []
    rows = [
        [
            kind,
            name,
            c["shift"],
            c["surviving"],
            _ci(c["surviving_ci"]),
            c["removed"],
            _ci(c["removed_ci"]),
            c["surviving_share"],
            _ci(c["surviving_share_ci"]),
            c.get("p_value"),
            c.get("verdict"),
            c["preference"],
            c["base_ablated_preference"],
        ]
        for kind in ("project", "clamp")
        for name, c in project[kind]["candidates"].items()
    ]
    rnd = "; ".join(
        f"{kind} {', '.join(f'{x:+.3f}' for x in project[kind]['random_removed'])}"
        for kind in ("project", "clamp")
    )
    shift_ci = _ci(project.get("shift_ci")) or ""
    return [
        (
            "Projecting or clamping each candidate in the bad fine-tune and the base model, scored by the "
            "pair metric",
            f"<p>{html.escape(project['protocol'])}. Held-out preference: fine-tune "
            f"{project['finetuned_preference']:+.3f}, base model {project['base_preference']:+.3f}; the "
            f"fine-tune's shift {project['shift']:+.3f} {shift_ci} (paired over {project['n']} questions). "
            f"Random directions remove {rnd}. p: (1 + random directions removing at least as much) / "
            "(1 + random directions).</p>"
            + table(
                [
                    "check",
                    "candidate",
                    "shift (ft - base)",
                    "surviving (both ablated)",
                    "95% CI (paired)",
                    "removed",
                    "95% CI (paired)",
                    "surviving share",
                    "95% CI (bootstrap)",
                    "p (random)",
                    "verdict",
                    "fine-tune ablated",
                    "base ablated",
                ],
                rows,
            ),
        )
    ]


def _block_section(block: dict | None) -> list[tuple[str, str]]:
    if not block:
        return []
    rows = [
        [
            name,
            pair_set,
            b["bad_shift"],
            b["shift"],
            b["kept"],
            _ci(b.get("kept_ci")),
            b["cut"],
            _ci(b.get("cut_ci")),
            b.get("note") or "",
        ]
        for name, per in block.items()
        for pair_set, b in per.items()
    ]
    header = [
        "run",
        "pair set",
        "bad - base",
        "blocked - base",
        "shift kept",
        "95% CI",
        "shift cut",
        "95% CI",
    ]
    return [
        (
            "BLOCK-EM (full fine-tune on bad advice, latents held where the base model has them)",
            "<p>Shares of the bad fine-tune's shift over the base model; intervals from a paired bootstrap "
            "over questions of the ratio (the findings table reads each bar off them).</p>"
            + table([*header, "note"], rows),
        )
    ]


def _samples_section(samples: dict | None) -> list[tuple[str, str]]:
    if not samples:
        return []
    body = "".join(
        f"<h3>{html.escape(name)}</h3>"
        + "".join(
            f"<p><b>{html.escape(a['question'])}</b><br>{html.escape(a['answer'])}</p>" for a in answers
        )
        for name, answers in samples.items()
    )
    first = next(iter(samples.values()))[0]
    how = f"temperature {first.get('temperature', 1.0)}, top-p {first.get('top_p', 1.0)}"
    return [(f"Sampled answers ({how}, one per question)", body)]


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
            + table(["principal angle", "cosine", "random mean", "random p95"], rows)
        )
    return "".join(parts)
