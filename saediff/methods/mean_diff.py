"""Mean differences, the dense counterparts of SAE diffing (computed by ``saediff diff`` in the same
pass; the constructor is ``methods.directions.mean_diff``), and the label-permuted null of the
mean-difference family.

- ``mean_diff_models``: the fine-tune's mean residual minus the base model's on the same tokens
  (for a PEFT adapter the run names it ``lora_downstream``: the adapter's effect on that block);
- ``mean_diff_responses``: the mean residual over misaligned answers minus aligned ones (one
  model, answers labelled by the judge), within each prompt group, averaged over the groups; on the
  teacher-forced references of a pair set it is the *reference* mean difference.

The steering protocol sets each direction of this family beside the same estimator on the same data
with its two labels swapped at random within each question (``Candidates.permuted``, the protocol's
``permuted`` null): a direction the labels do not explain ends up among them. Two shapes of
estimator: ``PairedDifferences``, a mean of per-unit paired differences (the model mean difference
per answer, the persona vector per contrast example, the in-context direction per question, the
ADL per prompt), permuted by flipping each unit's sign with probability 1/2; ``LabelledAnswers``,
the response mean difference's within-group difference of token means, permuted by shuffling the
labels among the answers to each question. A diff run keeps only its directions, so its two
methods rebuild their estimators from the run's answers at the block, and keep the permuted null
only when the rebuilt estimator reproduces the run's direction (``reproduces``).

A permuted estimator is a null of *directions* only where its directions leave the candidate's
axis. Where every unit's difference points the same way (a fine-tune's shift is systematic: with a
rank-1 adapter at the block, every prompt's fine-tune - base difference lies along its B vector),
swapping labels only rescales the sum, and the permuted directions are the candidate or its
negative: such a null holds the candidate itself and is left out, saying so (``permuted_null``).

Every client that steers a diff run's directions (the head-to-head, ``saediff steer RUN``, the
organism's steer check) takes these nulls from the methods' own ``find`` (``diff_run_nulls``).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from jaxtyping import Float

from saediff.errors import SaediffError
from saediff.methods.base import Candidates, DiffingMethod, MethodInputs, diff_run_candidate

__all__ = [
    "AXIS_COS",
    "DIFF_RUN_FAMILY",
    "MIN_PAIRED_SHARE",
    "LabelledAnswers",
    "MeanDiffModels",
    "MeanDiffResponses",
    "PairedDifferences",
    "PermutedNull",
    "diff_run_methods",
    "diff_run_nulls",
    "labelled_answers",
    "model_differences",
    "permuted_null",
    "reproduces",
    "response_sums",
    "run_answers",
    "swap_signs",
    "with_permuted",
]

MIN_PAIRED_SHARE = 0.5
"""the share of labelled answers that must share their question with an answer of the other label
for the response mean difference to get a permuted null: an answer alone with its label in its
question keeps it under every permutation, so with few paired answers the permuted directions stay
close to the candidate itself and say nothing about it"""


AXIS_COS = 0.999
"""a permuted estimator whose directions keep a median |cosine| of at least this with the candidate
(over ``PROBE_SEEDS`` permutations) is the candidate itself: no null. Below it, the steering protocol
removes each permuted estimate's component along the candidate and keeps the label-free rest
(``steer_protocol``), so a consistent signal no longer makes the null hold the candidate."""
PROBE_SEEDS = 10


def swap_signs(n: int, seed: int) -> torch.Tensor:
    """(n,) of +1 / -1, each -1 with probability 1/2 (seeded): which units have their labels swapped."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).double() * 2 - 1


@dataclass(frozen=True)
class PairedDifferences:
    """An estimator that is a sum of per-unit paired differences over a count: unit ``i`` (an answer,
    a contrast example, a question, a prompt) contributes ``sums_ND[i]``, its first label's residual
    minus its second's (summed over its read tokens), and the estimate is ``sums.sum(0) / total``."""

    sums_ND: Float[torch.Tensor, "n d"]
    total: float
    """what the sum is divided by (units, or read tokens)"""

    def estimate(self) -> Float[torch.Tensor, " d"]:
        return (self.sums_ND.double().sum(0) / self.total).float()

    def permuted(self, seed: int) -> Float[torch.Tensor, " d"]:
        """The estimate with each unit's two labels swapped with probability 1/2 (its sign flipped)."""
        s = swap_signs(self.sums_ND.shape[0], seed)
        return ((s @ self.sums_ND.double()) / self.total).float()


@dataclass(frozen=True)
class LabelledAnswers:
    """The response mean difference's data at one block, per answer: its residual summed over its
    response tokens and their count, its label (1 misaligned, 0 aligned, -1 neither), its group (the
    estimator's: a prompt domain or a question) and its question (the answers to the same messages
    in one group)."""

    sums_ND: Float[torch.Tensor, "n d"]
    counts_N: Float[torch.Tensor, " n"]
    labels_N: torch.Tensor
    group_N: torch.Tensor
    question_N: torch.Tensor

    def estimate(self, labels: torch.Tensor | None = None) -> Float[torch.Tensor, " d"]:
        """Per group with both labels, the misaligned answers' token mean minus the aligned ones';
        averaged over those groups (``stream_diff``'s ``mean_diffs``)."""
        lab = self.labels_N if labels is None else labels
        n_groups, d = int(self.group_N.max()) + 1, self.sums_ND.shape[1]
        side = {}
        for want in (1, 0):
            m = lab == want
            s = torch.zeros(n_groups, d, dtype=torch.float64).index_add_(
                0, self.group_N[m], self.sums_ND[m].double()
            )
            c = torch.zeros(n_groups, dtype=torch.float64).index_add_(
                0, self.group_N[m], self.counts_N[m].double()
            )
            side[want] = (s, c)
        (sm, cm), (sa, ca) = side[1], side[0]
        both = (cm > 0) & (ca > 0)
        if not bool(both.any()):
            raise SaediffError(
                "the response mean difference: no group has both misaligned and aligned answers"
            )
        return (sm[both] / cm[both, None] - sa[both] / ca[both, None]).mean(0).float()

    def _mixed(self) -> list[torch.Tensor]:
        """The labelled answers of each question that holds both labels."""
        out = []
        for q in torch.unique(self.question_N).tolist():
            idx = ((self.question_N == q) & (self.labels_N >= 0)).nonzero()[:, 0]
            if len(set(self.labels_N[idx].tolist())) == 2:
                out.append(idx)
        return out

    def paired_share(self) -> float:
        """The share of labelled answers whose question holds both labels (what a permutation moves)."""
        n = int((self.labels_N >= 0).sum())
        return sum(len(i) for i in self._mixed()) / n if n else 0.0

    def permuted(self, seed: int) -> Float[torch.Tensor, " d"]:
        """The estimate with the labels shuffled among the labelled answers to each question (one
        misaligned and one aligned answer: swapped with probability 1/2); a question's label counts,
        and so every group's, are kept."""
        g = torch.Generator().manual_seed(seed)
        lab = self.labels_N.clone()
        for idx in self._mixed():
            lab[idx] = lab[idx][torch.randperm(len(idx), generator=g)]
        return self.estimate(lab)


class PermutedNull(NamedTuple):
    estimator: Callable[[int], torch.Tensor] | None
    """seed -> the permuted estimate; None: no permuted null"""
    note: str
    """how the labels are permuted, or (``none: ...``) why there is no permuted null"""


def permuted_null(est, vector: torch.Tensor, how: str) -> PermutedNull:
    """``est.permuted`` (``how``: how it permutes) as the candidate ``vector``'s label-permuted null,
    unless its directions stay on the candidate's axis (median |cosine| over ``PROBE_SEEDS``
    permutations at least ``AXIS_COS``): then none, and why."""
    u = vector.double().flatten()
    cos = []
    for seed in range(PROBE_SEEDS):
        v = est.permuted(seed).double().flatten()
        cos.append(abs(float(v @ u / (v.norm() * u.norm()).clamp_min(1e-30))))
    med = statistics.median(cos)
    if med >= AXIS_COS:
        return PermutedNull(
            None,
            f"none: swapping the labels leaves the direction on the candidate's axis (median |cosine| "
            f"{med:.2f}; every unit's difference points one way), a null that holds the candidate itself",
        )
    return PermutedNull(est.permuted, how)


def reproduces(rebuilt: torch.Tensor, stored: torch.Tensor, tol: float = 1e-3) -> str | None:
    """None when ``rebuilt`` is ``stored`` up to numerics (cosine >= 1 - tol, norms within 10 x tol),
    else why not: a rebuilt estimator whose permutations would be of something else."""
    a, b = rebuilt.double().flatten(), stored.double().flatten()
    if float(b.norm()) == 0.0 or float(a.norm()) == 0.0:
        return "a zero direction"
    cos = float(a @ b / (a.norm() * b.norm()))
    ratio = float(a.norm() / b.norm())
    if cos >= 1 - tol and abs(ratio - 1) <= 10 * tol:
        return None
    return (
        f"the rebuilt estimator does not reproduce the direction (cosine {cos:.4f}, norm ratio {ratio:.3f})"
    )


@torch.no_grad()
def response_sums(
    lm, toks, layer: int, keep: torch.Tensor, batch_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``toks`` (``TokenizedPrompts``): the residual after block ``layer`` summed over the
    positions of ``keep`` (a (N, T) mask from ``toks.select``), float64 (N, d), and their count (N,).
    Read with plain forward hooks, as the streamed diff reads them."""
    from saediff.models.hooks import capture_resid

    n = toks.input_ids.shape[0]
    sums = torch.zeros(n, lm.model.config.hidden_size, dtype=torch.float64)
    counts = torch.zeros(n, dtype=torch.float64)
    for i in range(0, n, batch_size):
        ids, attn, m = toks.batch(slice(i, i + batch_size), keep)
        x = capture_resid(lm.model, [layer], ids.to(lm.device), attn.to(lm.device))[layer]  # (B, T, d)
        m = m.to(x.device)
        sums[i : i + batch_size] = (x.double() * m[..., None]).sum(1).cpu()
        counts[i : i + batch_size] = m.sum(1).double().cpu()
    return sums, counts


def run_answers(run_dir: Path, info: dict) -> tuple[list, list, list]:
    """The answers a diff run read, their labels and their groups, as ``run_diff`` took them: a
    ``saediff eval`` file's (``answers.judged_responses``), else the run's ``responses.jsonl``, each
    answer grouped by its domain, or, with several samples per question and no domain, by its
    question's id (``ID:k`` -> ``ID``)."""
    from saediff._io import read_jsonl
    from saediff.data.prompts import Prompt
    from saediff.methods.answers import judged_responses

    if info.get("responses"):
        return judged_responses(info["responses"])
    rows = [r for _, r in read_jsonl(Path(run_dir) / "responses.jsonl", "the diff run's answers")]
    ps = [Prompt(str(r["id"]), r["messages"], r["response"], r.get("domain")) for r in rows]
    several = (info.get("samples") or 1) > 1
    groups = [p.domain if p.domain is not None or not several else p.id.rsplit(":", 1)[0] for p in ps]
    return ps, [r.get("misaligned") for r in rows], groups


def labelled_answers(lm_ft, prompts: list, labels: list, groups: list, layer: int) -> LabelledAnswers:
    """The response mean difference's per-answer data at block ``layer`` of the fine-tune ``lm_ft``;
    a question is an answer's messages within its group."""
    from saediff.activations.collect import tokenize_prompts

    toks = tokenize_prompts(lm_ft, prompts)
    sums, counts = response_sums(lm_ft, toks, layer, toks.select("response"))
    gid, qid = {}, {}
    group = [gid.setdefault(g, len(gid)) for g in groups]
    question = [
        qid.setdefault((g, json.dumps(p.messages, sort_keys=True)), len(qid)) for g, p in zip(groups, prompts)
    ]
    code = [1 if x is True else 0 if x is False else -1 for x in labels]
    return LabelledAnswers(sums, counts, torch.tensor(code), torch.tensor(group), torch.tensor(question))


def model_differences(lm_base, lm_ft, prompts: list, layer: int) -> PairedDifferences:
    """The model mean difference's per-answer data at block ``layer``: each answer's fine-tune minus
    base residual summed over its response tokens (the same tokens in both), over all such tokens."""
    from saediff.activations.collect import tokenize_prompts

    toks = tokenize_prompts(lm_ft, prompts)
    keep = toks.select("response")
    ft, counts = response_sums(lm_ft, toks, layer, keep)
    base, _ = response_sums(lm_base, toks, layer, keep)
    total = float(counts.sum())
    if not total:
        raise SaediffError("no response tokens in the diff run's answers")
    return PairedDifferences(ft - base, total)


def with_permuted(found: Candidates, build: Callable[[], object], how: str) -> Candidates:
    """``found`` with its best direction's permuted estimator (``build()``: an object with
    ``estimate()`` and ``permuted(seed)``), kept only where the rebuilt estimate reproduces the
    direction; ``detail["permuted_null"]``: ``how`` the labels are permuted, or why there is none."""
    if found.best is None:
        return found
    try:
        est = build()
        why = reproduces(est.estimate(), found.best.vector)
    except (SaediffError, OSError) as e:
        est, why = None, str(e)
    null = (
        PermutedNull(None, f"none: {why}") if why is not None else permuted_null(est, found.best.vector, how)
    )
    return Candidates(
        found.directions, found.seconds, {**found.detail, "permuted_null": null.note}, null.estimator
    )


class MeanDiffModels(DiffingMethod):
    """The fine-tune's mean residual minus the base model's on the diff run's answers. Its permuted
    null swaps which model is the fine-tune within each answer (the two read the same tokens), with
    probability 1/2: rebuilt from the run's ``responses.jsonl`` at the block; left out where every
    answer's difference points one way (``permuted_null``), as a low-rank adapter's do."""

    name = "mean_diff_models"
    summary = "mean residual of the fine-tune minus the base model on the same tokens"
    order = 1
    tags = ("mean_diff_models", "lora_downstream")
    from_diff_run = True

    def find(self, inputs: MethodInputs) -> Candidates:
        L = inputs.layer
        found = diff_run_candidate(inputs, (f"mean_diff_models_L{L}", f"lora_downstream_L{L}"))

        def build():
            if inputs.run_dir is None:
                raise SaediffError("no diff run folder to rebuild it from")
            ps, _, _ = run_answers(inputs.run_dir, inputs.diff_info)
            return model_differences(inputs.lm_base, inputs.lm_ft, ps, L)

        return with_permuted(found, build, "fine-tune / base swapped within each answer with probability 1/2")


class MeanDiffResponses(DiffingMethod):
    """The fine-tune's mean residual over misaligned answers minus aligned ones, within each prompt
    group. Its permuted null shuffles the labels among the answers to each question (the references
    of a pair set: the misaligned and the aligned one swapped with probability 1/2), rebuilt from
    the run's answers at the block. Answers that are alone with their label in their question (one
    answer per question, as the organism's diff samples them) cannot be permuted: below
    ``MIN_PAIRED_SHARE`` of the labelled answers in mixed questions there is no permuted null."""

    name = "mean_diff_responses"
    summary = "mean residual over misaligned answers minus aligned ones"
    order = 2
    tags = ("mean_diff_responses",)
    from_diff_run = True

    def find(self, inputs: MethodInputs) -> Candidates:
        found = diff_run_candidate(inputs, (f"mean_diff_responses_L{inputs.layer}",))

        def build():
            if inputs.run_dir is None:
                raise SaediffError("no diff run folder to rebuild it from")
            ps, labels, groups = run_answers(inputs.run_dir, inputs.diff_info)
            if labels is None or all(x is None for x in labels):
                raise SaediffError("the diff run's answers carry no labels")
            ans = labelled_answers(inputs.lm_ft, ps, labels, groups, inputs.layer)
            share = ans.paired_share()
            if share < MIN_PAIRED_SHARE:
                raise SaediffError(
                    f"no per-question pairing: {share:.0%} of the labelled answers share their question "
                    f"with an answer of the other label (needs {MIN_PAIRED_SHARE:.0%})"
                )
            return ans

        return with_permuted(
            found, build, "misaligned / aligned labels shuffled among each question's answers"
        )


DIFF_RUN_FAMILY: dict[str, tuple[str, ...]] = {
    "mean_diff_models": ("base", "finetuned"),
    "mean_diff_responses": ("finetuned",),
    "in_context": ("base",),
}
"""the mean-difference methods whose directions ``saediff diff`` writes, and the models each one's
estimator reads when it is rebuilt for the permuted null (a caller loads only those)"""


def diff_run_methods(names: Iterable[str], layer: int) -> list[str]:
    """The methods of ``DIFF_RUN_FAMILY`` whose direction at block ``layer`` is among ``names``
    (a diff run's direction names: ``mean_diff_models_L{L}`` or ``lora_downstream_L{L}``, ...)."""
    from saediff.methods.base import get_method

    names = set(names)
    return [m for m in DIFF_RUN_FAMILY if any(f"{t}_L{layer}" in names for t in get_method(m).tags)]


def diff_run_nulls(inputs: MethodInputs, methods: Iterable[str] = DIFF_RUN_FAMILY) -> dict[str, PermutedNull]:
    """The label-permuted null of each of a diff run's mean-difference directions at
    ``inputs.layer``, as the head-to-head builds it (each method's ``find``), keyed by the
    direction's name in the run: the estimator (seed -> direction), or None and why (``note``).
    ``methods``: which of ``DIFF_RUN_FAMILY`` to build (``inputs`` needs the models they read);
    one whose direction the run lacks is left out."""
    from saediff.methods.base import get_method

    out = {}
    for m in methods:
        found = get_method(m).find(inputs)
        if found.best is not None:
            note = found.detail.get("permuted_null", "none: the method gave no permuted estimator")
            out[found.best.name] = PermutedNull(found.permuted, note)
    return out
