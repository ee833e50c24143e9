"""Plotly figures (returned, never shown)."""

from __future__ import annotations

import plotly.graph_objects as go

__all__ = [
    "blocking_bars",
    "drift_curves",
    "em_by_domain",
    "layer_curves",
    "pair_preferences",
    "steering_sweep",
]


def em_by_domain(organism: dict) -> go.Figure:
    """Misaligned rate per domain for each organism model."""
    fig = go.Figure()
    for name in ("aligned", "full_ft", "lora_ft", "control_ft", "steer_ground_truth"):
        if name in organism:
            rates = organism[name]["misaligned_rate"]
            fig.add_bar(name=name, x=list(rates), y=list(rates.values()))
    fig.update_layout(barmode="group", title="misaligned rate per domain (exact judge)", yaxis_range=[0, 1])
    return fig


def pair_preferences(em: dict) -> go.Figure:
    """The pair metric of each model (``em``: {model: {pair set: figures}}, the chat demo's
    ``summary.json``): mean preference (nats/token, misaligned - aligned answer) per pair set, with
    its 95% t interval; higher is more misaligned."""
    fig = go.Figure()
    for pair_set in dict.fromkeys(s for per in em.values() for s in per):
        names = [n for n in em if pair_set in em[n]]
        rows = [em[n][pair_set] for n in names]
        ci = [r["preference_ci"] or [r["preference"]] * 2 for r in rows]
        y = [r["preference"] for r in rows]
        fig.add_bar(
            name=pair_set,
            x=names,
            y=y,
            error_y={
                "type": "data",
                "symmetric": False,
                "array": [c[1] - m for c, m in zip(ci, y)],
                "arrayminus": [m - c[0] for c, m in zip(ci, y)],
            },
        )
    fig.update_layout(
        barmode="group",
        title="preference for the misaligned reference answer (pair metric)",
        yaxis_title="mean log-prob, misaligned - aligned (nats/token)",
    )
    return fig


def layer_curves(layers: dict) -> go.Figure:
    fig = go.Figure(
        [
            go.Scatter(x=layers["layers"], y=v, mode="lines+markers", name=k)
            for k, v in layers["curves"].items()
        ]
    )
    fig.update_layout(title="cosine per layer / downstream", xaxis_title="layer", yaxis_range=[-1, 1])
    return fig


def steering_sweep(steering: dict) -> go.Figure:
    """Each candidate's select-half misaligned rate per cost level (KL per neutral token), from the
    organism's ``steering.json``."""
    fig = go.Figure()
    for group, dash in (
        ("steer", None),
        ("steer_directions", "dot"),
    ):  # latents solid, dense candidates dotted
        for name, r in steering.get(group, {}).items():
            xs = [float(k) for k in r["sweep"]]
            fig.add_scatter(
                x=xs, y=list(r["sweep"].values()), mode="lines+markers", name=f"steer {name}", line_dash=dash
            )
    fig.update_layout(
        title="steering the aligned model: other-domain misaligned rate vs cost (select half)",
        xaxis_title="cost: KL per neutral token (nats)",
        xaxis_type="log",
        yaxis_range=[0, 1],
    )
    return fig


def blocking_bars(runs: dict) -> go.Figure:
    """EM after each fine-tune of a BLOCK-EM sweep (``summary.json``'s ``runs``, with 95% intervals;
    the organism's older per-run format ``other_misaligned_rate`` / ``misaligned_rate`` too)."""
    runs = runs.get("runs", runs)
    names = list(runs)
    if all("em_rate" in runs[n] for n in names):
        rate = [runs[n]["em_rate"] for n in names]
        ci = [runs[n]["em_rate_ci"] or [r, r] for n, r in zip(names, rate)]
        bars = [
            go.Bar(
                name="EM rate (other domains on the organism)",
                x=names,
                y=rate,
                error_y=dict(
                    type="data",
                    symmetric=False,
                    array=[c[1] - r for c, r in zip(ci, rate)],
                    arrayminus=[r - c[0] for c, r in zip(ci, rate)],
                ),
            )
        ]
        if all("medical" in (runs[n].get("per_question") or {}) for n in names):
            bars.append(
                go.Bar(name="medical", x=names, y=[runs[n]["per_question"]["medical"] for n in names])
            )
    else:
        bars = [
            go.Bar(name="other domains", x=names, y=[runs[n]["other_misaligned_rate"] for n in names]),
            go.Bar(name="medical", x=names, y=[runs[n]["misaligned_rate"]["medical"] for n in names]),
        ]
    fig = go.Figure(bars)
    fig.update_layout(
        barmode="group", title="BLOCK-EM: misaligned rate after fine-tuning", yaxis_range=[0, 1]
    )
    return fig


def drift_curves(drift: dict, title: str = "drift monitor") -> go.Figure:
    fig = go.Figure()
    fig.add_scatter(
        x=drift["steps"], y=drift["t_stat"], name="projection change (paired t over prompts)", yaxis="y1"
    )
    if any(e is not None for e in drift["em"]):
        fig.add_scatter(x=drift["steps"], y=drift["em"], name="other-domain EM rate", yaxis="y2")
    if drift.get("alert_step") is not None:
        fig.add_vline(x=drift["alert_step"], line_dash="dash", annotation_text="alert")
    fig.update_layout(
        title=title,
        xaxis_title="step",
        yaxis=dict(title="t statistic"),
        yaxis2=dict(title="EM rate", overlaying="y", side="right", range=[0, 1]),
    )
    return fig
