"""The demo's SAE: a TopK SAE on the base model's residual at one block, trained over the answer
tokens of chat text and measured on held-out conversations."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from saediff._io import atomic_write_json, read_json_if_exists
from saediff.stories.smollm2.prompts import reference_prompts, text_prompts
from saediff.stories.smollm2.recipe import ChatDemoRecipe, pairs_of

__all__ = ["TRAIN_SETS", "sae_step", "train_text_sae"]


TRAIN_SETS = ("medical_bad", "medical_good", "style_control", "benign_trait")
"""the shipped training sets whose answers the SAE is trained on (all but their held-out tail)"""


def train_text_sae(
    lm,
    layer: int,
    train: list,
    held: list,
    cfg,
    out: Path,
    *,
    model_name: str,
    say: Callable[[str], None] = lambda _s: None,
    batch_size: int = 16,
) -> dict:
    """Train a TopK SAE (``cfg``: ``saes.SAETrainConfig``) on ``lm``'s ``blocks.{layer}.hook_resid_post``
    over the answer tokens of ``train`` (Prompts with responses); measure it on ``held``: FVU, L0,
    dead share (also on the training rows) and CE-loss recovered (spliced at the answer tokens; CE
    over the targets those positions predict). Saved as a SAELens folder at ``out``; returns the
    metrics."""
    from saediff.activations.collect import collect_activations
    from saediff.models.hooks import resid_post
    from saediff.saes.loading import save_sae
    from saediff.saes.metrics import sae_metrics
    from saediff.saes.training import train_sae

    hook = resid_post(layer)
    say(f"SAE: activations at {hook} ({len(train)} conversations)")
    acts = collect_activations(lm, train, [hook], "response", progress=False)[hook]
    acts_held = collect_activations(lm, held, [hook], "response", progress=False)[hook]
    say(f"SAE: training on {acts.shape[0]} answer tokens")
    sae, hist = train_sae(acts, cfg, hook_name=hook, model_name=model_name, progress=False)
    say("SAE: CE-loss recovered on held-out conversations")
    held_metrics, train_dead = (
        sae_metrics(sae, acts_held),
        sae_metrics(sae, acts).dead_fraction,
    )  # before .to(device)
    ce = _ce_on_answers(lm, sae, layer, held, batch_size)
    metrics = {
        **held_metrics.to_json(),
        "dead_fraction_train": train_dead,
        **ce,
        "n_train_tokens": int(acts.shape[0]),
        "n_held_tokens": int(acts_held.shape[0]),
        "n_held_conversations": len(held),
        "positions": "response",
        "final_train_fvu": float(np.mean(hist["fvu"][-5:])),
    }
    save_sae(
        sae,
        out,
        {"hook_name": hook, "positions": "response", "train": dataclasses.asdict(cfg), "metrics": metrics},
    )
    return metrics


def _ce_on_answers(lm, sae, layer: int, held: list, batch_size: int) -> dict:
    """CE-loss recovered with ``sae`` spliced in at block ``layer`` at the answer tokens of ``held``
    (CE over the targets those positions predict)."""
    from saediff.activations.collect import tokenize_prompts
    from saediff.saes.metrics import ce_loss_recovered

    toks = tokenize_prompts(lm, held)
    answer = toks.role == 1
    # a target counts where the position predicting it is spliced: answer tokens after the first, and the
    # end of turn
    scored = torch.zeros_like(answer)
    scored[:, 1:] = answer[:, :-1] & (toks.role[:, 1:] >= 0)
    return ce_loss_recovered(
        lm.model,
        sae,
        layer,
        toks.input_ids,
        toks.input_ids.masked_fill(~scored, -100),
        splice=answer,
        batch_size=batch_size,
    )


def sae_step(base, layer: int, sae_dir: Path, seed: int, recipe: ChatDemoRecipe, say) -> dict:
    """The SAE at ``layer``, trained unless ``sae_dir`` holds one of this very setting (its
    ``saediff.json`` records the model, layer and training settings): then its metrics."""
    from saediff.data.chat_data import load_chat_jsonl
    from saediff.data.em_data import data_path
    from saediff.evaluation.pairs import pair_evaluator
    from saediff.models.loading import load_model
    from saediff.models.provenance import evaluator_fingerprint, model_fingerprint
    from saediff.saes.training import SAETrainConfig

    cfg = SAETrainConfig(
        d_sae=recipe.sae_width,
        k=recipe.sae_k,
        steps=recipe.sae_steps,
        batch_size=recipe.sae_batch_size,
        seed=recipe.sae_seed,
    )
    made_by = {
        "model": model_fingerprint(base),
        "layer": layer,
        "train": asdict(cfg),
        "held_rows": recipe.sae_held_rows,
        "rows": recipe.rows,
        "data": list(TRAIN_SETS),
        "references": evaluator_fingerprint(pair_evaluator(recipe.choose_on)),
    }
    prev = read_json_if_exists(sae_dir / "saediff.json")
    if prev is not None and prev.get("made_by") == json.loads(json.dumps(made_by)):
        return prev["metrics"]
    train, held = [], []
    for name in TRAIN_SETS:
        rows = text_prompts(load_chat_jsonl(data_path(name)), name)
        train += rows[: -recipe.sae_held_rows][: recipe.rows]
        held += rows[-recipe.sae_held_rows :]
    train += reference_prompts(pairs_of(recipe.choose_on))
    lm = load_model(base)
    metrics = train_text_sae(lm, layer, train, held, cfg, sae_dir, model_name=base.model, say=say)
    meta = json.loads((sae_dir / "saediff.json").read_text())
    atomic_write_json(sae_dir / "saediff.json", {**meta, "made_by": made_by})
    return metrics
