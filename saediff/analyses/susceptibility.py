"""Susceptibility before fine-tuning: can the aligned model's reading of a question predict how
misaligned the fine-tuned model's answers to it will be?

Features: the aligned model's residual at the last prompt token (where the answer starts) after
the chosen blocks, concatenated. Target: each question's misaligned rate after fine-tuning (from a
diff run's judged answers). Model: ridge regression (scikit-learn; standardised features, the
penalty chosen by leave-one-out inside each training fold), scored on held-out folds (k-fold
cross-validation): R^2 of the pooled held-out predictions and their Spearman correlation with the
truth. When the questions carry a domain the folds hold out whole domains (grouped k-fold): with
plain folds one domain's questions sit on both sides, and a model that only recognises the domain
scores as if it predicted the question. Two baselines go through the same folds: random Gaussian features of the same
shape (does the model's activation carry anything?) and the real features with the targets
permuted (how high do the scores go by chance?), with a permutation p-value.

    saediff predict RUN --layers 2,3 --folds 5                  # folds over domains where prompts carry one
    saediff predict RUN --folds 5 --folds-by question           # plain k-fold over questions
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from saediff.errors import SaediffError

__all__ = [
    "CVScore",
    "FoldPlan",
    "Susceptibility",
    "cross_validated",
    "fold_plan",
    "run_predict",
    "spearman",
    "susceptibility",
]

log = logging.getLogger(__name__)
ALPHAS = tuple(float(a) for a in np.logspace(-3, 5, 17))


@dataclass(frozen=True)
class CVScore:
    """Held-out scores of one cross-validated fit."""

    r2: float
    spearman: float | None
    """None when the held-out predictions or targets are constant"""
    predictions: list[float]


def spearman(x, y, min_n: int = 2) -> float | None:
    """Spearman's rho over the pairs where neither value is None; None with fewer than ``min_n``
    pairs or when either side is constant (rho is undefined)."""
    from scipy.stats import spearmanr

    pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None]
    if len(pairs) < min_n or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
        return None
    return float(spearmanr(*zip(*pairs)).statistic)


def cross_validated(
    X: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0, groups: list | np.ndarray | None = None
) -> CVScore:
    """Out-of-fold ridge predictions over ``folds`` shuffled folds of the rows; R^2 and Spearman of
    the pooled held-out predictions against ``y``. ``groups`` (n,): a label per row (its domain);
    rows of one label then always fall in the same fold (scikit-learn's ``GroupKFold``)."""
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score
    from sklearn.model_selection import GroupKFold, KFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if X.ndim != 2 or y.ndim != 1 or X.shape[0] != y.shape[0]:
        raise SaediffError(f"cross_validated: X (n, d) and y (n,) must share n, got {X.shape} and {y.shape}")
    if groups is not None and len(groups) != X.shape[0]:
        raise SaediffError(f"cross_validated: {len(groups)} group labels for {X.shape[0]} rows")
    n_units = X.shape[0] if groups is None else len(set(groups))
    unit = "question" if groups is None else "group"
    if not 2 <= folds <= n_units:
        raise SaediffError(f"cross_validated: folds={folds} needs 2..{n_units} (one {unit} per fold at most)")
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=ALPHAS))
    cv = (
        KFold(folds, shuffle=True, random_state=seed)
        if groups is None
        else GroupKFold(folds, shuffle=True, random_state=seed)
    )
    pred = cross_val_predict(model, X, y, cv=cv, groups=None if groups is None else np.asarray(groups))
    return CVScore(float(r2_score(y, pred)), spearman(pred.tolist(), y.tolist()), pred.tolist())


@dataclass(frozen=True)
class FoldPlan:
    """How ``saediff predict`` splits its questions into folds."""

    grouping: Literal["domain", "question"]
    """``domain``: whole domains are held out (a question without a domain is a group of its own);
    ``question``: plain k-fold over questions"""
    folds: int
    """the folds used (fewer than asked when there are fewer domains: one per domain)"""
    groups: tuple | None
    """one label per question for ``grouping="domain"``, else None"""
    note: str | None = None
    """why the plan differs from what was asked, for the output and the console"""

    @property
    def n_groups(self) -> int | None:
        return None if self.groups is None else len(set(self.groups))


def fold_plan(
    domains: list[str | None], folds: int, by: Literal["domain", "question"] = "domain"
) -> FoldPlan:
    """The folds for questions with these ``domains``. ``by="domain"`` groups them by domain where
    they carry one; with fewer groups than ``folds`` it holds out one domain per fold and says so;
    with no domain, or a single one for every question, it folds over questions and says so."""
    if by not in ("domain", "question"):
        raise SaediffError(f"folds by must be domain or question, got {by!r}")
    if by == "question":
        return FoldPlan("question", folds, None)
    named = {d for d in domains if d is not None}
    n_loose = sum(d is None for d in domains)
    if not named:
        return FoldPlan("question", folds, None, "no question carries a domain: folds over questions")
    if len(named) == 1 and not n_loose:
        return FoldPlan(
            "question",
            folds,
            None,
            f"every question is in domain {next(iter(named))!r}: folds over questions",
        )
    groups = tuple(str(d) if d is not None else f"\0question {i}" for i, d in enumerate(domains))
    notes = (
        [f"{n_loose} of {len(domains)} questions carry no domain: each is a group of its own"]
        if n_loose
        else []
    )
    n_groups = len(set(groups))
    if n_groups < folds:
        notes.append(f"{n_groups} domain groups for {folds} folds: one fold per domain group (leave one out)")
        folds = n_groups
    return FoldPlan("domain", folds, groups, "; ".join(notes) or None)


@dataclass(frozen=True)
class Susceptibility:
    model: CVScore
    random_features: CVScore
    permutation: dict
    """``r2`` and ``spearman``: mean and 95th percentile over ``n`` target permutations, and the
    p-value of the real R^2 (share of permutations at least as high, counting the real one)"""
    n_questions: int
    n_features: int
    folds: int
    n_groups: int | None = None
    """distinct fold groups (domains) when the folds were grouped, else None"""

    def to_json(self) -> dict:
        return {
            "r2": self.model.r2,
            "spearman": self.model.spearman,
            "random_features": {"r2": self.random_features.r2, "spearman": self.random_features.spearman},
            "permutation": self.permutation,
            "n_questions": self.n_questions,
            "n_features": self.n_features,
            "folds": self.folds,
            "n_groups": self.n_groups,
        }


def susceptibility(
    X: np.ndarray,
    y: np.ndarray,
    *,
    folds: int = 5,
    n_permutations: int = 50,
    seed: int = 0,
    groups: list | np.ndarray | None = None,
) -> Susceptibility:
    """Cross-validated ridge from features ``X`` (n questions, d) to rates ``y`` (n,), with the
    random-feature and permutation baselines, all on the same folds (grouped by ``groups``, one
    label per question, when given; permuted targets move across groups: the null of no relation)."""
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64)
    real = cross_validated(X, y, folds, seed, groups)
    rng = np.random.default_rng([seed, 7919])  # not the stream a caller's own seed-``seed`` data came from
    rand = cross_validated(rng.standard_normal(X.shape), y, folds, seed, groups)
    perm_r2, perm_rho = [], []
    for _ in range(n_permutations):
        s = cross_validated(X, rng.permutation(y), folds, seed, groups)
        perm_r2.append(s.r2)
        perm_rho.append(s.spearman if s.spearman is not None else 0.0)
    perm = {
        "n": n_permutations,
        "r2": {"mean": float(np.mean(perm_r2)), "p95": float(np.quantile(perm_r2, 0.95))}
        if perm_r2
        else None,
        "spearman": {"mean": float(np.mean(perm_rho)), "p95": float(np.quantile(perm_rho, 0.95))}
        if perm_rho
        else None,
        "p_value": (1 + sum(r >= real.r2 for r in perm_r2)) / (1 + n_permutations),
    }
    return Susceptibility(
        real, rand, perm, X.shape[0], X.shape[1], folds, None if groups is None else len(set(groups))
    )


def run_predict(
    run_dir: str | Path,
    *,
    layers: list[int] | None = None,
    folds: int = 5,
    n_permutations: int = 50,
    seed: int = 0,
    folds_by: Literal["domain", "question"] = "domain",
    progress: bool = True,
) -> dict:
    """``saediff predict RUN``: the aligned model's prompt-only activations of the run's questions
    predict each question's misaligned rate after the run's fine-tune. ``folds_by="domain"`` holds
    out whole domains where the questions carry one (``fold_plan``); the output's ``grouping``,
    ``folds`` and ``grouping_note`` say what was used. Writes ``susceptibility.json`` and
    ``susceptibility.html`` into the run folder."""
    from saediff.activations.collect import prompt_activations
    from saediff.data.runs import read_run, run_questions
    from saediff.models.hooks import parse_layer
    from saediff.models.loading import load_model

    run_dir = Path(run_dir)
    info = read_run(run_dir)["steps"]["diff"]
    layers = layers or [parse_layer(info["sae_hook"])]
    q = run_questions(run_dir)
    keep = [i for i, r in enumerate(q.misaligned_rate) if r is not None]
    if len(keep) < max(folds, 3):
        raise SaediffError(
            f"{run_dir}/responses.jsonl: {len(keep)} questions with judged answers; predict needs at "
            f"least {max(folds, 3)} (run saediff diff with a judge or labels)"
        )
    prompts = [q.prompts[i] for i in keep]
    plan = fold_plan([p.domain for p in prompts], folds, folds_by)
    if plan.note:
        log.warning("saediff predict: %s", plan.note)
    y = np.array([q.misaligned_rate[i] for i in keep])
    acts = prompt_activations(load_model(info["base"]), prompts, layers, progress=progress)
    X = np.concatenate([acts[L].numpy() for L in layers], axis=1)
    res = susceptibility(X, y, folds=plan.folds, n_permutations=n_permutations, seed=seed, groups=plan.groups)
    out = {
        "kind": "saediff.susceptibility",
        "base": info["base"],
        "layers": layers,
        **res.to_json(),
        "grouping": plan.grouping,
        "folds_requested": folds,
        "grouping_note": plan.note,
        "samples_per_question": float(np.mean([q.n_answers[i] for i in keep])),
        "per_question": [
            {"id": p.id, "domain": p.domain, "misaligned_rate": float(t), "predicted": round(float(f), 6)}
            for p, t, f in zip(prompts, y, res.model.predictions)
        ],
    }
    _write(run_dir, out, {"layers": layers, "folds": plan.folds, "grouping": plan.grouping})
    return out


def _write(run_dir: Path, out: dict, record: dict) -> None:
    """``susceptibility.json``, its figure ``susceptibility.html`` and the run's record of the step
    (``record`` and the files)."""
    from saediff._io import atomic_write_bytes, atomic_write_json
    from saediff.data.runs import update_run

    atomic_write_json(run_dir / "susceptibility.json", out)
    atomic_write_bytes(
        run_dir / "susceptibility.html", susceptibility_figure(out).to_html(include_plotlyjs="cdn").encode()
    )
    update_run(run_dir, "predict", {**record, "files": ["susceptibility.json", "susceptibility.html"]})


def susceptibility_figure(result: dict):
    """Held-out predicted vs observed misaligned rate per question, the scores and baselines in the title."""
    import plotly.graph_objects as go

    rows = result["per_question"]
    domains = sorted({str(r["domain"]) for r in rows})
    fig = go.Figure(
        [
            go.Scatter(
                x=[r["misaligned_rate"] for r in rows if str(r["domain"]) == d],
                y=[r["predicted"] for r in rows if str(r["domain"]) == d],
                mode="markers",
                name=d,
                text=[r["id"] for r in rows if str(r["domain"]) == d],
            )
            for d in domains
        ]
    )
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"
    perm = result["permutation"]
    fig.update_layout(
        title=(
            f"susceptibility: held-out R^2 {fmt(result['r2'])}, Spearman {fmt(result['spearman'])} "
            f"(random features {fmt(result['random_features']['r2'])} / {fmt(result['random_features']['spearman'])}; "
            f"permuted p95 {fmt(perm['r2']['p95'] if perm['r2'] else None)} / "
            f"{fmt(perm['spearman']['p95'] if perm['spearman'] else None)}; p = {perm['p_value']:.3f}; "
            f"{result['folds']} folds by {result.get('grouping', 'question')})"
        ),
        xaxis_title="misaligned rate after fine-tuning",
        yaxis_title="predicted from the aligned model (held out)",
    )
    return fig
