"""What ``saediff block``'s options resolve to: the organism's recipe, the SAE and its block, the
latent sets, the directions of ``--mode project / steer``, the fine-tune config, the drift monitor
and the re-diff of ``--reroute``."""

from __future__ import annotations

from pathlib import Path

from saediff.cli.common import _int_list
from saediff.cli.organism import diff_run_inputs, organism_world
from saediff.errors import SaediffError


def organism_recipe(organism: Path | None, full: bool, samples: int, seed: int) -> dict:
    """``--organism DIR``'s model, data, SAE, judge, fine-tune recipe, monitor and controls ({} without it)."""
    if organism is None:
        return {}
    from saediff.stories.organism.block import generic_inputs

    return generic_inputs(organism, full, samples, seed)


def sae_and_layer(sae: str | None) -> tuple:
    """The SAE (None without one) and the block its hook reads."""
    if not sae:
        return None, None
    from saediff.models.hooks import parse_layer
    from saediff.saes.loading import load_sae

    sae_obj = load_sae(sae)
    return sae_obj, parse_layer(sae_obj.cfg.metadata.hook_name or "")


def block_latents(mode: str, source: str, diff_run, latents_file, latent: list[int], top: int, high: int):
    """The latent sets of saediff block from exactly one of --diff-run, --latents, --latent (none
    for --mode project along a dense direction); ablate removes latents and holds none up."""
    from saediff.interventions.latent_sets import LatentSets, latents_from_diff, read_latents

    if mode not in ("penalty", "ablate", "project", "steer"):
        raise SaediffError(f"--mode must be penalty, ablate, project or steer, got {mode!r}")
    if mode in ("project", "steer") and source != "latents":
        return LatentSets()
    given = [x for x in (diff_run, latents_file, latent or None) if x]
    if len(given) != 1:
        raise SaediffError("choose the latents with exactly one of --diff-run, --latents or --latent")
    if diff_run:
        return latents_from_diff(diff_run, top, high if mode == "penalty" else 0)
    return read_latents(latents_file) if latents_file else LatentSets(tuple(latent))


def directions(source: str, blocks, mode: str, steer_alpha: float, sae, sets, diff_run, recipe: dict) -> dict:
    """``--mode project / steer``: the direction per block (``--steer-alpha`` times it for steer)."""
    from saediff.interventions.block_directions import project_directions

    found = project_directions(
        source, blocks, sae=sae, latents=sets, diff_run=diff_run, named=recipe.get("directions")
    )
    return {L: steer_alpha * d for L, d in found.items()} if mode == "steer" else found


def finetune_config(
    recipe_ft,
    *,
    full: bool,
    lora_rank: int,
    lora_alpha: float | None,
    lora_layers: str | None,
    lora_modules: str,
    rslora: bool,
    seed: int,
    steps: int | None,
    batch_size: int | None,
    lr: float | None,
    **given,
):
    """The fine-tune of every run: the organism's recipe, or a LoRA from the options, with the
    options the user gave on top (``given``: taken as they are)."""
    from dataclasses import replace

    from saediff.interventions.finetune import FinetuneConfig

    base_ft = recipe_ft or FinetuneConfig(
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_modules=tuple(lora_modules.split(",")),
        rslora=rslora,
        seed=seed,
    )
    return replace(
        base_ft,
        method="full" if full else "lora",
        lora_layers=_int_list(lora_layers, "--lora-layers") if lora_layers else base_ft.lora_layers,
        steps=steps or base_ft.steps,
        batch_size=batch_size or base_ft.batch_size,
        lr=lr or base_ft.lr,
        **given,
    )


def monitor_factory(
    recipe: dict, sae, sets, layer: int, diff_run, prompts: str, steps: int, max_new_tokens: int, seed: int
):
    """The drift monitor of every run: the organism's, or one reading the blocked latents' directions
    on held-out ``prompts`` every steps/20 steps (and early)."""
    if "monitor" in recipe:
        return recipe["monitor"](layer)
    from saediff.data.prompts import load_prompts
    from saediff.interventions.sweep_monitor import MonitorFactory, monitor_directions

    return MonitorFactory(
        load_prompts(prompts),
        monitor_directions(sae, sets, layer, diff_run),
        layer,
        every=max(1, steps // 20),
        max_new_tokens=min(max_new_tokens, 128),
        seed=seed,
        early=True,
    )


def rediff(model: str, sae: str, questions: str, max_new_tokens: int, seed: int):
    """The re-diff of ``--reroute``: a trained model (folder or adapter) against ``model`` on its own
    answers to ``questions`` (the organism: its own questions and labels)."""
    from saediff.interventions.rerouting import rediff_against

    # the organism's answers have its language's length; a real model's, the evaluation's
    length = None if organism_world(model) is not None else max_new_tokens
    return rediff_against(
        model, sae, seed, **diff_run_inputs(model, questions, length, seed, organism_prompts="organism:50")
    )
