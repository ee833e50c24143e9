"""Persona-vector data flagging (Chen et al. 2025): which training rows would push a model along a
trait direction before any fine-tuning happens.

Per training row, the *projection difference* is the projection on the direction's unit vector of
the base model's mean residual over the training answer's tokens, minus the same over the base
model's own answer to that prompt (both teacher-forced through the base model, at the
direction's block). A row whose answer sits further along the trait than what the model would say
itself is one the fine-tune learns the trait from; the paper finds the dataset mean predicts the
post-fine-tune trait (r 0.88-0.95) and ranks rows for filtering. A replication found norm-matched
random directions nearly as predictive, so every figure here stands beside random directions.

    saediff flag --model M --data train.jsonl --direction RUN/directions:mean_diff_responses_L15 --out FLAG
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch

from saediff import _io
from saediff.errors import SaediffError
from saediff.methods.base import Candidates, DiffingMethod, MethodInputs
from saediff.methods.directions import Direction
from saediff.methods.mean_diff import PairedDifferences, permuted_null

__all__ = [
    "PersonaVector",
    "base_answers",
    "flag_rows",
    "persona_differences",
    "persona_vector",
    "projection_differences",
]

log = logging.getLogger(__name__)


def base_answers(
    lm,
    rows: list,
    out: Path,
    *,
    max_new_tokens: int = 200,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> list[str]:
    """The base model's own greedy answer to each row's prompt (every turn before the last), kept
    in ``out/base_answers.jsonl`` batch by batch under a fingerprint of the model, the prompts and
    the settings, so an interrupted run continues where it stopped."""
    from saediff.models.loading import generate
    from saediff.models.provenance import digest, model_fingerprint

    made_by = {
        "model": model_fingerprint(lm.spec),
        "prompts": digest([r[:-1] for r in rows]),
        "max_new_tokens": max_new_tokens,
        "greedy": True,
    }
    head, path = out / "base_answers.json", out / "base_answers.jsonl"
    done: list[str] = []
    if head.exists() and json.loads(head.read_text()) == made_by and path.exists():
        done = [row["answer"] for _, row in _io.read_jsonl(path, "base answers")]
    else:
        _io.atomic_write_json(head, made_by)
        _io.atomic_write_jsonl(path, [])
    for i in range(len(done), len(rows), batch_size):
        new = generate(
            lm,
            [r[:-1] for r in rows[i : i + batch_size]],
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            batch_size=batch_size,
            seed=seed,
            progress=False,
        )
        done += [a.strip() or "." for a in new]
        _io.atomic_write_jsonl(path, ({"row": k, "answer": a} for k, a in enumerate(done)))
        if progress:
            log.info("base answers: %d / %d", len(done), len(rows))
    return done


@torch.no_grad()
def projection_differences(
    lm, rows: list, answers: list[str], direction, *, n_random: int = 3, seed: int = 0, progress: bool = True
) -> dict:
    """Per row: the projection of the training answer's and of the base answer's mean residual on
    ``direction``'s unit vector, and their difference; the same difference along ``n_random``
    random unit directions (seeded) for the null. Returns {"proj_train", "proj_base", "score":
    lists per row, "random_scores": n_random lists}."""
    from saediff.activations.collect import prompt_activations
    from saediff.data.prompts import Prompt
    from saediff.models.hooks import parse_layer

    L = parse_layer(direction.hook)
    train = [Prompt(f"row{i}", r[:-1], r[-1]["content"]) for i, r in enumerate(rows)]
    own = [Prompt(f"row{i}", r[:-1], a) for i, (r, a) in enumerate(zip(rows, answers))]
    a_train = prompt_activations(lm, train, [L], "response", progress=progress)[L]  # (N, d)
    a_base = prompt_activations(lm, own, [L], "response", progress=progress)[L]
    g = torch.Generator().manual_seed(seed + 7)
    U = torch.cat([direction.unit().float()[None], torch.randn(n_random, a_train.shape[1], generator=g)])
    U = U / U.norm(dim=1, keepdim=True)
    p_train, p_base = a_train @ U.T, a_base @ U.T  # (N, 1 + n_random)
    diff = p_train - p_base
    return {
        "proj_train": p_train[:, 0].tolist(),
        "proj_base": p_base[:, 0].tolist(),
        "score": diff[:, 0].tolist(),
        "random_scores": diff[:, 1:].T.tolist(),
    }


def flag_rows(
    model: str,
    data: str | Path,
    direction_source: str,
    out: str | Path,
    *,
    drop_fraction: float | None = None,
    max_new_tokens: int = 200,
    n_random: int = 3,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Score every row of a chat JSONL along a direction (``FOLDER:NAME`` of an export folder):
    ``out/flag.jsonl`` (per row: score, both projections), ``out/flag.json`` (the dataset's mean
    projection difference with a 95% interval over rows, beside each random direction's, and the
    top rows). With ``drop_fraction``: ``out/screened.jsonl`` without the highest-scoring rows and
    ``out/random_dropped.jsonl`` without as many random ones (``saediff flag --finetune`` trains on both)."""
    from saediff.data.chat_data import load_chat_jsonl
    from saediff.evaluation.pairs import mean_t_interval
    from saediff.methods.export import load_direction
    from saediff.models.loading import load_model

    if drop_fraction is not None and not 0 < drop_fraction < 1:
        raise SaediffError(f"--drop-fraction must lie in (0, 1), got {drop_fraction}")
    direction = load_direction(direction_source)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = load_chat_jsonl(data)
    for i, r in enumerate(rows):
        if r[-1]["role"] != "assistant":
            raise SaediffError(f"{data}: row {i + 1} does not end with an assistant answer")
    lm = load_model(model)
    answers = base_answers(
        lm, rows, out, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, progress=progress
    )
    res = projection_differences(
        lm, rows, answers, direction, n_random=n_random, seed=seed, progress=progress
    )
    scores = res["score"]
    _io.atomic_write_jsonl(
        out / "flag.jsonl",
        (
            {"row": i, "score": s, "proj_train": a, "proj_base": b}
            for i, (s, a, b) in enumerate(zip(scores, res["proj_train"], res["proj_base"]))
        ),
    )
    order = sorted(range(len(rows)), key=lambda i: -scores[i])
    summary = {
        "direction": direction_source,
        "n_rows": len(rows),
        "mean": mean_t_interval(scores),
        "random": [mean_t_interval(r) for r in res["random_scores"]],
        "top_rows": order[:10],
    }
    if drop_fraction is not None:
        summary["screen"] = _screen(rows, scores, order, drop_fraction, out, seed)
    _io.atomic_write_json(out / "flag.json", summary)
    return summary


def _screen(
    rows: list, scores: list[float], order: list[int], drop_fraction: float, out: Path, seed: int
) -> dict:
    """``out/screened.jsonl`` without the ``drop_fraction`` highest-scoring rows (``order``: most
    flagged first) and ``out/random_dropped.jsonl`` without as many random ones (seeded); what
    was dropped and the mean scores of both dropped sets."""
    n_drop = max(1, round(drop_fraction * len(rows)))
    dropped, rand = set(order[:n_drop]), set(random.Random(seed + 1).sample(range(len(rows)), n_drop))
    for fname, skip in (("screened.jsonl", dropped), ("random_dropped.jsonl", rand)):
        _io.atomic_write_jsonl(out / fname, ({"messages": r} for i, r in enumerate(rows) if i not in skip))
    return {
        "drop_fraction": drop_fraction,
        "n_dropped": n_drop,
        "screened": str(out / "screened.jsonl"),
        "random_dropped": str(out / "random_dropped.jsonl"),
        "score_dropped_mean": sum(scores[i] for i in dropped) / n_drop,
        "score_random_dropped_mean": sum(scores[i] for i in rand) / n_drop,
    }


def persona_vector(lm, examples: list, layer: int, batch_size: int = 16) -> torch.Tensor:
    """Mean over ``examples`` (objects with question / misaligned / aligned) of the base model's
    mean residual over the misaligned answer's tokens minus the aligned answer's, after ``layer``."""
    return persona_differences(lm, examples, layer, batch_size).estimate()


@torch.no_grad()
def persona_differences(lm, examples: list, layer: int, batch_size: int = 16) -> PairedDifferences:
    """Per example, the base model's mean residual over the misaligned answer's tokens minus the
    aligned answer's (to the same question), after ``layer``: the persona vector is their mean, and
    swapping an example's two answers flips its difference (the label-permuted null)."""
    from saediff.activations.collect import prompt_activations
    from saediff.data.prompts import Prompt

    msgs = lambda e: [{"role": "user", "content": e.question}]
    mis = [Prompt(f"m{i}", msgs(e), e.misaligned) for i, e in enumerate(examples)]
    ali = [Prompt(f"a{i}", msgs(e), e.aligned) for i, e in enumerate(examples)]
    a = prompt_activations(lm, mis, [layer], "response", batch_size=batch_size, progress=False)[layer]
    b = prompt_activations(lm, ali, [layer], "response", batch_size=batch_size, progress=False)[layer]
    return PairedDifferences(a.double() - b.double(), float(len(examples)))


class PersonaVector(DiffingMethod):
    """Chen et al.'s persona vector with reference answers: the base model's mean response residual
    over misaligned answers minus aligned ones (no fine-tune needed). Each contrast example answers
    one question both ways, so its permuted null swaps the two answers of each example with
    probability 1/2."""

    name = "persona"
    summary = "persona vector: base model's residual over misaligned minus aligned reference answers"
    order = 8
    tags = ("persona",)

    def find(self, inputs: MethodInputs) -> Candidates:
        if not inputs.contrast:
            return Candidates((), None, {"note": "no contrast examples: no persona vector"})
        diffs = persona_differences(inputs.lm_base, inputs.contrast, inputs.layer)
        v = diffs.estimate()
        null = permuted_null(
            diffs, v, "the two answers of each contrast example swapped with probability 1/2"
        )
        return Candidates(
            (Direction(self.name, v, inputs.hook, "persona"),),
            None,
            {"permuted_null": null.note},
            null.estimator,
        )
