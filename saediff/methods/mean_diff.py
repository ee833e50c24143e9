"""Mean differences, the dense counterparts of SAE diffing (computed by ``saediff diff`` in the same
pass; the constructor is ``methods.directions.mean_diff``).

- ``mean_diff_models``: the fine-tune's mean residual minus the base model's on the same tokens
  (for a PEFT adapter the run names it ``lora_downstream``: the adapter's effect on that block);
- ``mean_diff_responses``: the mean residual over misaligned answers minus aligned ones (one
  model, answers labelled by the judge).
"""

from __future__ import annotations

from saediff.methods.base import Candidates, DiffingMethod, MethodInputs, diff_run_candidate

__all__ = ["MeanDiffModels", "MeanDiffResponses"]


class MeanDiffModels(DiffingMethod):
    name = "mean_diff_models"
    summary = "mean residual of the fine-tune minus the base model on the same tokens"
    order = 1
    tags = ("mean_diff_models", "lora_downstream")
    from_diff_run = True

    def find(self, inputs: MethodInputs) -> Candidates:
        L = inputs.layer
        return diff_run_candidate(inputs, (f"mean_diff_models_L{L}", f"lora_downstream_L{L}"))


class MeanDiffResponses(DiffingMethod):
    name = "mean_diff_responses"
    summary = "mean residual over misaligned answers minus aligned ones"
    order = 2
    tags = ("mean_diff_responses",)
    from_diff_run = True

    def find(self, inputs: MethodInputs) -> Candidates:
        return diff_run_candidate(inputs, (f"mean_diff_responses_L{inputs.layer}",))
