"""saediff: find why a narrow fine-tune makes a language model broadly misaligned.

The public API is re-exported lazily (importing torch, transformers and SAELens takes seconds,
and ``import saediff`` does no work): ``saediff.load_model`` imports ``saediff.models`` on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ModelSpec": "models", "load_model": "models", "generate": "models", "chat_tokens": "models",
    "load_prompts": "prompts", "Prompt": "prompts", "ContrastExample": "prompts", "load_contrast_examples": "prompts",
    "collect_activations": "activations", "ActivationStore": "activations",
    "SAETrainConfig": "saes", "train_sae": "saes", "load_sae": "saes", "save_sae": "saes", "sae_metrics": "saes",
    "diff_latents": "diff", "LatentDiff": "diff",
    "Direction": "directions", "cosine_table": "directions", "mean_diff": "directions",
    "sae_latent_direction": "directions", "lora_b_directions": "directions", "in_context_directions": "directions",
    "read_adapter": "lora",
    "add_direction": "steering", "project_out": "steering", "clamp_latent": "steering",
    "export_directions": "export", "load_directions": "export",
    "BlockConfig": "blocking", "Blocker": "blocking", "DriftMonitor": "monitor",
    "HttpJudge": "judges", "OrganismJudge": "organism.judge",
    "evaluate_em": "evals", "evaluate_organism_em": "organism.evaluator", "EMConfig": "evals",
    "JudgeEvaluator": "evals", "PairEvaluator": "pairs", "load_pairs": "pairs",
    "run_diff": "pipeline", "run_compare": "pipeline", "run_steer_check": "organism.demo", "run_demo": "organism.demo",
    "FinetuneConfig": "finetune", "finetune": "finetune", "load_chat_jsonl": "chat_data",
    "run_block_em": "blockem", "LatentSets": "blockem", "run_chat_demo": "chat_demo", "ChatDemoRecipe": "chat_demo", "run_causal_checks": "causal", "discover_latents": "causal",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"saediff.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'saediff' has no attribute {name!r}")
