"""Train/eval shift overlap: does a fine-tune move the residual stream the same way on the
questions it was trained on and on the unrelated questions where EM shows?

A *shift* is the fine-tuned model's residual minus the base model's, at the last prompt token
(where the answer starts) of one prompt, at ``blocks.L.hook_resid_post``. The top-k principal
subspace of a set of shifts is spanned by the first k right singular vectors of the (n, d) shift
matrix, *uncentred*: the shift every prompt shares is the thing of interest, so it is kept.
Two subspaces are compared by the cosines of their principal angles (1: a shared direction,
0: orthogonal), beside the same cosines for random k-dimensional subspaces of the same width.

    saediff overlap RUN --train-data data/bad_medical_advice.jsonl --k 8
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float

from saediff.activations.collect import prompt_activations
from saediff.errors import SaediffError
from saediff.methods.directions import principal_angle_cosines
from saediff.models.hooks import resid_post

__all__ = [
    "ShiftOverlap",
    "principal_subspace",
    "prompt_shifts",
    "random_subspace_cosines",
    "run_overlap",
    "shift_overlap",
    "training_prompts",
]

log = logging.getLogger(__name__)


def principal_subspace(shifts_ND: Float[torch.Tensor, "n d"], k: int) -> Float[torch.Tensor, "k d"]:
    """Orthonormal rows spanning the top-k (uncentred) principal subspace of the rows of ``shifts_ND``."""
    if shifts_ND.ndim != 2 or shifts_ND.shape[0] < 1:
        raise SaediffError(
            f"principal_subspace: expected an (n, d) matrix with n >= 1, got {tuple(shifts_ND.shape)}"
        )
    if not 1 <= k <= min(shifts_ND.shape):
        raise SaediffError(f"principal_subspace: k={k} must lie in 1..min(n, d) = {min(shifts_ND.shape)}")
    _, _, Vh = torch.linalg.svd(shifts_ND.double(), full_matrices=False)
    return Vh[:k].float()


def random_subspace_cosines(d: int, k: int, n: int = 200, seed: int = 0) -> Float[torch.Tensor, "n k"]:
    """Principal-angle cosines between ``n`` pairs of random k-dimensional subspaces of R^d."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack(
        [
            principal_angle_cosines(torch.randn(k, d, generator=g), torch.randn(k, d, generator=g))
            for _ in range(n)
        ]
    )


@dataclass(frozen=True)
class ShiftOverlap:
    """How far the shifts on evaluation prompts lie in the subspace of those on training prompts.

    ``principal_cosines``: descending principal-angle cosines of the two top-k subspaces;
    ``random_baseline``: their mean (and 95th percentile) for random subspaces of the same k and d;
    ``per_question``: for each evaluation prompt, the cosine of its shift with the mean training
    shift and the fraction of its shift's norm inside the training subspace (random: sqrt(k/d))."""

    k: int
    d_model: int
    principal_cosines: list[float]
    random_baseline: dict
    mean_shift_cosine: float
    """cosine between the mean training shift and the mean evaluation shift"""
    cos_to_train_mean: list[float]
    fraction_in_train_subspace: list[float]
    train_shift_norm: float
    eval_shift_norm: float

    def to_json(self) -> dict:
        return {
            "k": self.k,
            "d_model": self.d_model,
            "principal_cosines": self.principal_cosines,
            "random_baseline": self.random_baseline,
            "mean_shift_cosine": self.mean_shift_cosine,
            "train_shift_norm": self.train_shift_norm,
            "eval_shift_norm": self.eval_shift_norm,
        }


def shift_overlap(
    train_ND: Float[torch.Tensor, "n d"],
    eval_MD: Float[torch.Tensor, "m d"],
    k: int = 8,
    *,
    n_random: int = 200,
    seed: int = 0,
) -> ShiftOverlap:
    """Compare the top-k principal subspaces of training-prompt and evaluation-prompt shifts."""
    if train_ND.ndim != 2 or eval_MD.ndim != 2 or train_ND.shape[1] != eval_MD.shape[1]:
        raise SaediffError(
            f"shift_overlap: shifts must be (n, d) and (m, d) with one d, got {tuple(train_ND.shape)} "
            f"and {tuple(eval_MD.shape)}"
        )
    k = min(k, train_ND.shape[0], eval_MD.shape[0], train_ND.shape[1])
    d = train_ND.shape[1]
    U, V = principal_subspace(train_ND, k), principal_subspace(eval_MD, k)
    cos = principal_angle_cosines(U, V)
    rnd = random_subspace_cosines(d, k, n_random, seed)
    mean_t, mean_e = train_ND.float().mean(0), eval_MD.float().mean(0)
    e = eval_MD.float()
    norms = e.norm(dim=1).clamp_min(1e-12)
    return ShiftOverlap(
        k=k,
        d_model=d,
        principal_cosines=[round(float(c), 6) for c in cos],
        random_baseline={
            "mean": [round(float(c), 6) for c in rnd.mean(0)],
            "p95": [round(float(c), 6) for c in rnd.quantile(0.95, dim=0)],
            "n": n_random,
            "per_question_fraction": math.sqrt(k / d),
        },
        mean_shift_cosine=float(torch.cosine_similarity(mean_t, mean_e, 0)),
        cos_to_train_mean=torch.cosine_similarity(e, mean_t[None], dim=1).tolist(),
        fraction_in_train_subspace=((e @ U.T).norm(dim=1) / norms).tolist(),
        train_shift_norm=float(train_ND.float().norm(dim=1).mean()),
        eval_shift_norm=float(norms.mean()),
    )


def prompt_shifts(
    base, finetuned, prompt_sets: dict[str, list], layer: int, *, progress: bool = True
) -> dict[str, Float[torch.Tensor, "n d"]]:
    """Per set of prompts, the activation shift at the last prompt token after block ``layer``:
    fine-tuned minus base (``prompt_activations``), the two models (``ModelSpec`` or path) loaded
    one at a time."""
    from saediff.models.loading import load_model

    acts = {}
    for who, spec in (("base", base), ("finetuned", finetuned)):
        lm = load_model(spec)
        acts[who] = {
            name: prompt_activations(lm, ps, [layer], progress=progress)[layer]
            for name, ps in prompt_sets.items()
        }
        del lm
    return {name: acts["finetuned"][name] - acts["base"][name] for name in prompt_sets}


def training_prompts(path: str | Path, n: int | None = None, seed: int = 0) -> list:
    """The prompts of a chat JSONL fine-tune file (each conversation without its last assistant
    turn), ``n`` of them drawn without replacement (all when None)."""
    import random

    from saediff.data.chat_data import load_chat_jsonl
    from saediff.data.prompts import Prompt

    rows = load_chat_jsonl(path)
    idx = list(range(len(rows)))
    if n is not None and n < len(rows):
        idx = sorted(random.Random(seed).sample(idx, n))
    return [Prompt(f"train{i}", rows[i][:-1]) for i in idx]


def run_overlap(
    run_dir: str | Path,
    train_data: str | Path,
    *,
    k: int = 8,
    layer: int | None = None,
    n_train: int = 256,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Shift overlap for a diff run: shifts on ``n_train`` prompts of the fine-tune's data and on
    the run's questions, at the SAE's layer (or ``layer``); per question, the correlation (Spearman)
    of its overlap measures with its misaligned rate. Writes ``shift_overlap.json`` and
    ``shift_overlap.html`` into the run folder."""
    from saediff.analyses.susceptibility import spearman
    from saediff.data.runs import read_run, run_questions
    from saediff.models.hooks import parse_layer
    from saediff.models.loading import ModelSpec

    run_dir = Path(run_dir)
    info = read_run(run_dir)["steps"]["diff"]
    L = parse_layer(info["sae_hook"]) if layer is None else layer
    questions = run_questions(run_dir)
    train = training_prompts(train_data, n_train, seed)
    ft = ModelSpec(
        info["finetuned"] or info["base"], adapter=info["adapter"], merge=info["adapter"] is not None
    )
    shifts = prompt_shifts(
        info["base"], ft, {"train": train, "eval": questions.prompts}, L, progress=progress
    )
    res = shift_overlap(shifts["train"], shifts["eval"], k, seed=seed)
    rates = questions.misaligned_rate
    per_q = [
        {
            "id": p.id,
            "domain": p.domain,
            "misaligned_rate": r,
            "cos_to_train_mean": round(c, 6),
            "fraction_in_train_subspace": round(f, 6),
        }
        for p, r, c, f in zip(questions.prompts, rates, res.cos_to_train_mean, res.fraction_in_train_subspace)
    ]
    out = {
        "kind": "saediff.shift_overlap",
        "layer": L,
        "hook": resid_post(L),
        "train_data": str(train_data),
        "n_train": len(train),
        "n_eval": len(questions.prompts),
        **res.to_json(),
        "spearman_with_misaligned_rate": {
            "cos_to_train_mean": spearman(res.cos_to_train_mean, rates, 3),
            "fraction_in_train_subspace": spearman(res.fraction_in_train_subspace, rates, 3),
        },
        "per_question": per_q,
    }
    _write(run_dir, out, {"layer": L, "k": res.k, "train_data": str(train_data)})
    return out


def _write(run_dir: Path, out: dict, record: dict) -> None:
    """``shift_overlap.json``, its figure ``shift_overlap.html`` and the run's record of the step
    (``record`` and the files)."""
    from saediff._io import atomic_write_bytes, atomic_write_json
    from saediff.data.runs import update_run

    atomic_write_json(run_dir / "shift_overlap.json", out)
    atomic_write_bytes(
        run_dir / "shift_overlap.html", overlap_figure(out).to_html(include_plotlyjs="cdn").encode()
    )
    update_run(run_dir, "overlap", {**record, "files": ["shift_overlap.json", "shift_overlap.html"]})


def overlap_figure(result: dict):
    """Principal-angle cosines against the random baseline (left), per-question overlap against
    the misaligned rate (right)."""
    from plotly.subplots import make_subplots

    fig = make_subplots(
        1,
        2,
        subplot_titles=(
            "principal-angle cosines, train vs eval shifts",
            "per question: fraction of the shift in the train subspace",
        ),
    )
    idx = list(range(1, len(result["principal_cosines"]) + 1))
    fig.add_bar(x=idx, y=result["principal_cosines"], name="train vs eval", row=1, col=1)
    fig.add_scatter(
        x=idx, y=result["random_baseline"]["mean"], mode="lines+markers", name="random (mean)", row=1, col=1
    )
    fig.add_scatter(
        x=idx,
        y=result["random_baseline"]["p95"],
        mode="lines",
        line={"dash": "dot"},
        name="random (p95)",
        row=1,
        col=1,
    )
    q = [r for r in result["per_question"] if r["misaligned_rate"] is not None]
    fig.add_scatter(
        x=[r["fraction_in_train_subspace"] for r in q],
        y=[r["misaligned_rate"] for r in q],
        mode="markers",
        text=[f"{r['id']} ({r['domain']})" for r in q],
        name="questions",
        row=1,
        col=2,
    )
    fig.update_xaxes(title_text="principal angle", row=1, col=1)
    fig.update_yaxes(title_text="cosine", range=[0, 1.05], row=1, col=1)
    fig.update_xaxes(title_text="fraction in train subspace", row=1, col=2)
    fig.update_yaxes(title_text="misaligned rate", row=1, col=2)
    fig.update_layout(title=f"train/eval shift overlap at {result['hook']} (k={result['k']})")
    return fig
