"""The B vector of a rank-1 LoRA adapter on ``down_proj``: where the adapter writes in the residual
stream at its block (read by ``saediff diff`` from the adapter's file; the constructor is
``methods.directions.lora_b_directions``)."""

from __future__ import annotations

from saediff.methods.base import Candidates, DiffingMethod, MethodInputs

__all__ = ["LoraB"]


class LoraB(DiffingMethod):
    name = "lora_b"
    summary = "the rank-1 adapter's B vector at its block"
    order = 4
    tags = ("lora_b",)
    from_diff_run = True

    def find(self, inputs: MethodInputs) -> Candidates:
        hits = [d for d in inputs.diff_directions.values() if d.method == "lora_b" and d.hook == inputs.hook]
        if not hits:
            return Candidates((), None, {"note": "not in the diff run"})
        return Candidates((hits[0],), inputs.diff_info.get("seconds"))
