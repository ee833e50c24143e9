"""The organism's default SAE: TopK on the aligned model's residual at the analysis layer,
trained on every position of mixed-persona chats, as real SAEs are trained."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from saediff.activations.collect import check_positions, collect_activations
from saediff.errors import MissingFileError
from saediff.models.hooks import resid_post
from saediff.models.loading import load_model
from saediff.saes.loading import save_sae
from saediff.saes.metrics import ce_loss_recovered, sae_metrics
from saediff.saes.registry import preset
from saediff.saes.training import SAETrainConfig, train_sae
from saediff.stories.organism.prompts import organism_prompts
from saediff.stories.organism.recipes import read_organism_world

__all__ = ["train_organism_sae"]


def train_organism_sae(
    organism_dir: str | Path,
    out: str | Path | None = None,
    *,
    layer: int | None = None,
    n_prompts: int = 4000,
    positions: str = "all",
    d_sae: int | None = None,
    k: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Train and save ``organism_dir/sae`` (a SAELens folder); returns its metrics.

    ``positions``: the token positions trained on (and measured): ``all`` (default, as real SAEs
    are trained: the top diff latent is what the fine-tune uses, and a persona latent sits among
    the top few; see the README), ``response`` (answer tokens only: latents that steer, but removing
    the top one barely changes the fine-tune) or ``last_prompt``. ``d_sae``/``k`` override the
    ``organism`` preset (512, 8).

    Metrics use 1000 held-out chats: FVU, L0, dead fraction (never active on them; also on the
    training rows), and CE loss recovered with the SAE spliced in (next-token loss over the
    held-out chats' answers).
    """
    check_positions(positions)  # before the model loads
    organism_dir = Path(organism_dir)
    world = read_organism_world(organism_dir / "aligned")
    if world is None:
        raise MissingFileError(f"{organism_dir}/aligned is not a saediff organism folder")
    if layer is None:
        layer = json.loads((organism_dir / "organism.json").read_text())["config"]["analysis_layer"]
    hook = resid_post(layer)
    lm = load_model(str(organism_dir / "aligned"))
    train = organism_prompts(world, n_prompts, seed=seed)
    held = organism_prompts(world, 1000, seed=seed + 1)
    acts = collect_activations(lm, train, [hook], positions, progress=progress)[hook]
    acts_held = collect_activations(lm, held, [hook], positions, progress=progress)[hook]
    over = {name: v for name, v in (("d_sae", d_sae), ("k", k)) if v is not None}
    cfg = SAETrainConfig(**{**preset("organism"), **over, "seed": seed})
    sae, hist = train_sae(
        acts, cfg, hook_name=hook, model_name=str(organism_dir / "aligned"), progress=progress
    )
    metrics = _metrics(lm, sae, layer, acts, acts_held, held)
    out = Path(out) if out else organism_dir / "sae"
    save_sae(
        sae,
        out,
        {
            "hook_name": hook,
            "positions": positions,
            "train": dataclasses.asdict(cfg),
            "metrics": metrics,
            "n_train_rows": int(acts.shape[0]),
            "final_train_fvu": float(np.mean(hist["fvu"][-5:])),
        },
    )
    return metrics


def _metrics(lm, sae, layer: int, acts, acts_held, held: list) -> dict:
    """FVU, L0 and dead share on the held-out activations ``acts_held``, the dead share on the
    training ones ``acts``, and CE loss recovered with the SAE spliced in at block ``layer`` over
    the answers of the held-out chats ``held``."""
    from saediff.activations.collect import tokenize_prompts

    toks = tokenize_prompts(lm, held)
    labels = toks.input_ids.masked_fill(toks.role != 1, -100)
    return {
        **sae_metrics(sae, acts_held).to_json(),
        "dead_fraction_train": sae_metrics(sae, acts).dead_fraction,
        **ce_loss_recovered(lm.model, sae, layer, toks.input_ids, labels),
    }
