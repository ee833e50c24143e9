"""saediff: find why a narrow fine-tune makes a language model broadly misaligned.

The public API is re-exported lazily (importing torch, transformers and SAELens takes seconds,
and ``import saediff`` does no work): ``saediff.load_model`` imports ``saediff.models.loading`` on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

LAYERS = (
    "core",
    "models",
    "data",
    "activations",
    "saes",
    "evaluation",
    "methods",
    "interventions",
    "analyses",
    "reports",
    "stories",
    "cli",
)
"""The subpackages in the order of the flow, lowest first ("core": the top-level modules). Each may
import only those before it (``tests/test_layering.py``; ``docs/architecture.md``)."""

_EXPORTS = {
    "ModelSpec": "models.loading",
    "load_model": "models.loading",
    "generate": "models.loading",
    "chat_tokens": "models.loading",
    "load_prompts": "data.prompts",
    "Prompt": "data.prompts",
    "ContrastExample": "data.prompts",
    "load_contrast_examples": "data.prompts",
    "collect_activations": "activations.collect",
    "ActivationStore": "activations.store",
    "SAETrainConfig": "saes.training",
    "train_sae": "saes.training",
    "load_sae": "saes.loading",
    "save_sae": "saes.loading",
    "sae_metrics": "saes.metrics",
    "diff_latents": "methods.sae_diff",
    "LatentDiff": "methods.sae_diff",
    "Direction": "methods.directions",
    "cosine_table": "methods.directions",
    "mean_diff": "methods.directions",
    "sae_latent_direction": "methods.directions",
    "lora_b_directions": "methods.directions",
    "in_context_directions": "methods.directions",
    "read_adapter": "models.lora",
    "add_direction": "interventions.steering",
    "project_out": "interventions.steering",
    "clamp_latent": "interventions.steering",
    "export_directions": "methods.export",
    "load_directions": "methods.export",
    "BlockConfig": "interventions.blocking",
    "Blocker": "interventions.blocking",
    "DriftMonitor": "interventions.monitor",
    "HttpJudge": "evaluation.judges",
    "OrganismJudge": "stories.organism.judge",
    "evaluate_em": "evaluation.evals",
    "evaluate_organism_em": "stories.organism.evaluator",
    "EMConfig": "evaluation.evals",
    "JudgeEvaluator": "evaluation.evals",
    "PairEvaluator": "evaluation.pairs",
    "load_pairs": "evaluation.pairs",
    "run_diff": "methods.diff_run",
    "run_compare": "methods.diff_run",
    "run_steer_check": "stories.organism.steer_check",
    "run_demo": "stories.organism.demo",
    "FinetuneConfig": "interventions.finetune",
    "finetune": "interventions.finetune",
    "load_chat_jsonl": "data.chat_data",
    "run_block_em": "interventions.blockem",
    "LatentSets": "interventions.latent_sets",
    "run_chat_demo": "stories.smollm2.demo",
    "ChatDemoRecipe": "stories.smollm2.recipe",
    "run_causal_checks": "interventions.causal",
    "discover_latents": "interventions.causal",
}
__all__ = ["LAYERS", "__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"saediff.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'saediff' has no attribute {name!r}")
