"""The in-context direction: the base model prompted with misaligned examples in context minus the
same model with aligned ones, at the answer's start (computed by ``saediff diff``; the constructor
is ``methods.directions.in_context_directions``). It asks whether the fine-tune moved the model
where a few examples in the prompt already move it.

Its estimator is a mean over questions of paired differences (the same question after the same
shots, answered misaligned minus answered aligned), so its permuted null swaps the two contexts of
each question with probability 1/2 (``mean_diff.PairedDifferences``). The diff run does not keep
the questions and shots, so they are rebuilt (``InContextSource``: given, or the run's questions
with the head-to-head's contrast examples) and the null kept only when the rebuilt estimator
reproduces the run's direction.
"""

from __future__ import annotations

from dataclasses import dataclass

from saediff.errors import SaediffError
from saediff.methods.base import Candidates, DiffingMethod, MethodInputs, diff_run_candidate
from saediff.methods.mean_diff import PairedDifferences, run_answers, with_permuted

__all__ = ["InContext", "InContextSource", "in_context_differences"]


@dataclass(frozen=True)
class InContextSource:
    """What an in-context direction is built from (``directions.in_context_directions``)."""

    questions: list
    """``Prompt`` questions, each read after the shots"""
    examples: list
    """rows with question / misaligned / aligned (``ContrastExample``) the shots are drawn from"""
    n_shots: int = 3
    seed: int = 0
    """the seed of the shots' draw (``data.prompts.in_context_prompts``)"""


def in_context_differences(lm, source: InContextSource, layer: int) -> PairedDifferences:
    """Per question, the residual after block ``layer`` at the last prompt token after the shots
    answered misaligned minus after the same shots answered aligned; their mean is the in-context
    direction."""
    from saediff.activations.collect import prompt_activations
    from saediff.data.prompts import in_context_prompts

    mis, ali = in_context_prompts(source.questions, source.examples, n_shots=source.n_shots, seed=source.seed)
    a = prompt_activations(lm, mis, [layer], "last_prompt", progress=False)[layer]
    b = prompt_activations(lm, ali, [layer], "last_prompt", progress=False)[layer]
    return PairedDifferences((a.double() - b.double()), float(len(mis)))


def _run_source(inputs: MethodInputs, n_shots: int) -> InContextSource:
    """The questions ``run_diff`` read the in-context direction on (its prompts, once each), the
    head-to-head's contrast examples, and its seed (``MethodConfig.seed``)."""
    from saediff.data.prompts import Prompt

    if inputs.run_dir is None:
        raise SaediffError("no diff run folder to rebuild it from")
    if not inputs.contrast:
        raise SaediffError("no contrast examples to rebuild it from")
    ps, _, _ = run_answers(inputs.run_dir, inputs.diff_info)
    if not inputs.diff_info.get("responses") and (inputs.diff_info.get("samples") or 1) > 1:
        stems: dict[str, Prompt] = {}
        for p in ps:  # ID:k -> ID, in the order of first appearance
            stems.setdefault(
                p.id.rsplit(":", 1)[0], Prompt(p.id.rsplit(":", 1)[0], p.messages, None, p.domain)
            )
        ps = list(stems.values())
    qs = [Prompt(p.id, p.messages, None, p.domain) for p in ps]
    return InContextSource(qs, list(inputs.contrast), n_shots, inputs.cfg.seed)


class InContext(DiffingMethod):
    name = "in_context"
    summary = "base model with misaligned minus aligned examples in context"
    order = 3
    tags = ("in_context",)
    from_diff_run = True

    def find(self, inputs: MethodInputs) -> Candidates:
        found = diff_run_candidate(inputs, (f"in_context_L{inputs.layer}",))

        def build():
            n_shots = int(found.best.provenance.get("n_shots", 3))
            source = inputs.in_context or _run_source(inputs, n_shots)
            return in_context_differences(inputs.lm_base, source, inputs.layer)

        return with_permuted(found, build, "the two contexts of each question swapped with probability 1/2")
