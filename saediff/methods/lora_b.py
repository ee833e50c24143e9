"""The B vector of a rank-1 LoRA adapter on ``down_proj``: where the adapter writes in the residual
stream at its block (read by ``saediff diff`` from the adapter's file; the constructor is
``methods.directions.lora_b_directions``)."""

from __future__ import annotations

from saediff.methods.base import Candidates, DiffingMethod, MethodInputs, diff_run_candidate

__all__ = ["LoraB"]


class LoraB(DiffingMethod):
    name = "lora_b"
    summary = "the rank-1 adapter's B vector at its block"
    order = 4
    tags = ("lora_b",)
    from_diff_run = True

    def find(self, inputs: MethodInputs) -> Candidates:
        found = inputs.diff_directions.items()
        return diff_run_candidate(
            inputs, tuple(n for n, d in found if d.method == "lora_b" and d.hook == inputs.hook)
        )
