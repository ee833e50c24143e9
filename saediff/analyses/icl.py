"""Language vs fine-tune along the persona direction: how many in-context misaligned examples
move the aligned model as far along the direction as the fine-tune does with none?

Per question, the projection on a persona direction (unit vector; default the run's response mean
difference at the SAE's layer) of the residual averaged over the tokens of the fine-tuned model's
own answer (teacher-forced, as the diff reads them; ``positions="last_prompt"``: at the last
prompt token instead, before any answer): the aligned model after n misaligned in-context examples (n = 0 .. max_shots; the same examples a diff run's in-context
direction uses) against the fine-tuned model with none. ``shots_to_match_finetune`` is the
smallest n whose mean projection reaches the fine-tune's (None: not within ``max_shots``). With a
BLOCK-EM run that rerouted (``--block-run``), the same sweep reads the SAE activations of the
latents that rose outside the blocked set: does context alone raise them?

    saediff icl RUN --icl-examples data/contrast.jsonl --max-shots 8
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from saediff.errors import MissingFileError, SaediffError
from saediff.models.hooks import parse_layer, resid_post

__all__ = ["rerouted_latents", "run_icl", "shots_to_match"]

log = logging.getLogger(__name__)


def shots_to_match(curve: list[float], target: float) -> int | None:
    """The smallest index n with ``curve[n] >= target`` (None when no value reaches it)."""
    return next((n for n, v in enumerate(curve) if v >= target), None)


def rerouted_latents(block_run: str | Path) -> list[int]:
    """The latents a BLOCK-EM run's rerouting re-diff found outside the blocked sets (every
    blocked lambda's ``reroute.new_latents``, first seen first)."""
    path = Path(block_run) / "summary.json"
    if not path.exists():
        raise MissingFileError(f"{block_run} is not a saediff block run (summary.json missing)")
    seen: list[int] = []
    for run in json.loads(path.read_text())["runs"].values():
        for i in (run.get("reroute") or {}).get("new_latents", []):
            if i not in seen:
                seen.append(int(i))
    if not seen:
        raise SaediffError(f"{path}: no rerouted latents (run saediff block with --reroute)")
    return seen


def _direction(run_dir: Path, name: str | None, layer: int):
    from saediff.methods.export import load_directions

    dirs = load_directions(run_dir / "directions")
    if name is None:
        name = next(
            (
                n
                for n in (
                    f"mean_diff_responses_L{layer}",
                    f"mean_diff_models_L{layer}",
                    f"lora_downstream_L{layer}",
                )
                if n in dirs
            ),
            None,
        )
        if name is None:
            raise SaediffError(f"{run_dir}/directions: no mean difference at layer {layer}; give --direction")
    if name not in dirs:
        raise SaediffError(f"{run_dir}/directions: no direction {name!r} (have {', '.join(sorted(dirs))})")
    return dirs[name]


# long: its signature and docstring; the code itself is 46 lines
def run_icl(
    run_dir: str | Path,
    examples,
    *,
    max_shots: int = 8,
    direction: str | None = None,
    exclude_domain: str | None = None,
    block_run: str | Path | None = None,
    positions: str = "response",
    max_questions: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """The in-context sweep for a diff run. ``examples``: contrast examples (a file for
    ``saediff.data.prompts.load_contrast_examples`` or the objects; their misaligned answers are the
    shots). ``exclude_domain``: leave the fine-tune's own domain out of the questions;
    ``max_questions``: read at most that many, evenly spaced over the run's order. Writes
    ``icl_vs_ft.json`` and ``icl_vs_ft.html`` into the run folder."""
    from saediff.data.prompts import load_contrast_examples
    from saediff.data.runs import read_run
    from saediff.models.loading import ModelSpec, load_model

    run_dir = Path(run_dir)
    info = read_run(run_dir)["steps"]["diff"]
    examples = load_contrast_examples(examples) if isinstance(examples, (str, Path)) else list(examples)
    if not 1 <= max_shots <= len(examples):
        raise SaediffError(f"max_shots={max_shots} needs 1..{len(examples)} contrast examples")
    d = _direction(run_dir, direction, parse_layer(info["sae_hook"]))
    qs = _questions(run_dir, exclude_domain, positions, max_questions)
    sae = latents = None
    if block_run is not None:
        from saediff.saes.loading import load_sae

        sae, latents = load_sae(info["sae"]), rerouted_latents(block_run)
    read = _Reader(d, positions, sae, latents, progress)
    base = load_model(info["base"])
    curve_QN, lat_curve = _shot_curves(read, base, qs, examples, max_shots, seed)
    ft = load_model(
        ModelSpec(
            info["finetuned"] or info["base"], adapter=info["adapter"], merge=info["adapter"] is not None
        )
    )
    ft_proj, ft_lat = read(ft, qs)
    out = {
        "kind": "saediff.icl_vs_ft",
        "direction": d.name,
        "hook": resid_post(read.L),
        "positions": positions,
        "max_shots": max_shots,
        "n_questions": len(qs),
        "exclude_domain": exclude_domain,
        **_matching(qs, curve_QN, ft_proj),
    }
    if sae is not None:
        out["rerouted"] = {
            "block_run": str(block_run),
            "latents": latents,
            "hook": sae.cfg.metadata.hook_name,
            "aligned_mean_activation_by_shots": lat_curve,
            "finetuned_mean_activation": ft_lat,
            "raised_by_context": [lat_curve[-1][j] > lat_curve[0][j] for j in range(len(latents))],
        }
    _write(run_dir, out, d.name, max_shots)
    return out


def _shot_curves(
    read, base, qs: list, examples: list, max_shots: int, seed: int
) -> tuple[torch.Tensor, list]:
    """``read`` of the base model on the questions after 0..``max_shots`` misaligned examples in
    context: (questions, shots + 1) projections, and per shot count the latents' mean activations."""
    from saediff.data.prompts import in_context_prompts

    curve_QN, lat_curve = [], []
    for n in range(max_shots + 1):
        # in_context_prompts keeps the question's turns and drops its answer: put the answer back
        prompts = (
            qs
            if n == 0
            else [
                dataclasses.replace(p, response=q.response)
                for p, q in zip(in_context_prompts(qs, examples, n_shots=n, seed=seed)[0], qs)
            ]
        )
        proj, lat = read(base, prompts)
        curve_QN.append(proj)
        lat_curve.append(lat)
    return torch.stack(curve_QN, dim=1), lat_curve  # (questions, shots)


class _Reader:
    """Reads a model on prompts: the projection of each prompt's mean activation (at ``positions``)
    on the unit direction ``d`` at its block, and with an SAE the mean activation of ``latents``
    over the prompts at the SAE's block."""

    def __init__(self, d, positions: str, sae, latents: list[int] | None, progress: bool):
        self.L = parse_layer(d.hook)
        self.L_sae = parse_layer(sae.cfg.metadata.hook_name) if sae is not None else None
        self.layers = sorted({self.L, *([self.L_sae] if sae is not None else [])})
        self.unit = d.unit().float()
        self.positions, self.sae, self.latents, self.progress = positions, sae, latents, progress

    def __call__(self, lm, prompts: list) -> tuple[torch.Tensor, list[float] | None]:
        """(n,) projections, and the latents' mean activations (None without an SAE)."""
        from saediff.activations.collect import prompt_activations

        if self.positions == "last_prompt":
            prompts = [dataclasses.replace(p, response=None) for p in prompts]
        acts = prompt_activations(lm, prompts, self.layers, self.positions, progress=self.progress)
        proj = acts[self.L] @ self.unit  # (n,)
        lat = None
        if self.sae is not None:
            with torch.no_grad():
                lat = (
                    self.sae.encode(acts[self.L_sae].to(self.sae.W_enc.dtype))[:, self.latents]
                    .float()
                    .mean(0)
                    .tolist()
                )
        return proj, lat


def _write(run_dir: Path, out: dict, direction: str, max_shots: int) -> None:
    """``icl_vs_ft.json``, its figure ``icl_vs_ft.html`` and the run's record of the step."""
    from saediff._io import atomic_write_bytes, atomic_write_json
    from saediff.data.runs import update_run

    atomic_write_json(run_dir / "icl_vs_ft.json", out)
    atomic_write_bytes(run_dir / "icl_vs_ft.html", icl_figure(out).to_html(include_plotlyjs="cdn").encode())
    update_run(
        run_dir,
        "icl",
        {"direction": direction, "max_shots": max_shots, "files": ["icl_vs_ft.json", "icl_vs_ft.html"]},
    )


def _questions(run_dir: Path, exclude_domain: str | None, positions: str, max_questions: int | None) -> list:
    """The run's answered questions the sweep reads: outside ``exclude_domain``, with an answer
    unless only the last prompt token is read, at most ``max_questions`` evenly spaced."""
    from saediff.data.runs import run_questions

    qs = [
        p
        for p in run_questions(run_dir).first_answers
        if (exclude_domain is None or p.domain != exclude_domain)
        and (positions == "last_prompt" or p.response)
    ]
    if not qs:
        raise SaediffError(f"{run_dir}: no questions left after excluding domain {exclude_domain!r}")
    if max_questions is not None and len(qs) > max_questions:
        qs = [qs[i * len(qs) // max_questions] for i in range(max_questions)]
    return qs


def _matching(qs: list, curve_QN: torch.Tensor, ft_proj: torch.Tensor) -> dict:
    """How many shots move the aligned model as far along the direction as the fine-tune: on the
    mean curve, and per question (``curve_QN``: questions x shots projections)."""
    mean_curve = curve_QN.mean(0).tolist()
    per_q = [shots_to_match(curve_QN[i].tolist(), float(ft_proj[i])) for i in range(len(qs))]
    matched = [s for s in per_q if s is not None]
    return {
        "aligned_projection_by_shots": mean_curve,
        "finetuned_projection": float(ft_proj.mean()),
        "shots_to_match_finetune": shots_to_match(mean_curve, float(ft_proj.mean())),
        "per_question": {
            "matched_fraction": len(matched) / len(qs),
            "median_shots_when_matched": float(torch.tensor(matched).float().median()) if matched else None,
        },
        "per_question_projection": [
            {
                "id": p.id,
                "domain": p.domain,
                "aligned": [round(float(v), 5) for v in curve_QN[i]],
                "finetuned": round(float(ft_proj[i]), 5),
                "shots_to_match": per_q[i],
            }
            for i, p in enumerate(qs)
        ],
    }


def icl_figure(result: dict):
    """Mean projection against the number of in-context examples, the fine-tune's as a line."""
    import plotly.graph_objects as go

    shots = list(range(result["max_shots"] + 1))
    fig = go.Figure(
        [
            go.Scatter(
                x=shots,
                y=result["aligned_projection_by_shots"],
                mode="lines+markers",
                name="aligned model, n misaligned examples in context",
            )
        ]
    )
    fig.add_hline(
        y=result["finetuned_projection"], line_dash="dash", annotation_text="fine-tuned, no examples"
    )
    where = (
        "at the last prompt token" if result["positions"] == "last_prompt" else "over the fine-tune's answers"
    )
    fig.update_layout(
        title=f"projection on {result['direction']} {where} "
        f"(shots to match the fine-tune: {result['shots_to_match_finetune']})",
        xaxis_title="in-context misaligned examples",
        yaxis_title="mean projection",
    )
    return fig
