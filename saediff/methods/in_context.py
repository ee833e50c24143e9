"""The in-context direction: the base model prompted with misaligned examples in context minus the
same model with aligned ones, at the answer's start (computed by ``saediff diff``; the constructor
is ``methods.directions.in_context_directions``). It asks whether the fine-tune moved the model
where a few examples in the prompt already move it."""

from __future__ import annotations

from saediff.methods.base import Candidates, DiffingMethod, MethodInputs, diff_run_candidate

__all__ = ["InContext"]


class InContext(DiffingMethod):
    name = "in_context"
    summary = "base model with misaligned minus aligned examples in context"
    order = 3
    tags = ("in_context",)
    from_diff_run = True

    def find(self, inputs: MethodInputs) -> Candidates:
        return diff_run_candidate(inputs, (f"in_context_L{inputs.layer}",))
