"""BLOCK-EM in the demo: the bad fine-tune again with the diff's latents (or as many random live
latents) held where the base model has them, each set's lambda set by the latents' own typical
size, and the share of the bad fine-tune's shift each blocked run keeps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from saediff._io import atomic_write_json, read_json_if_exists
from saediff.errors import SaediffError
from saediff.stories.smollm2.prompts import text_prompts
from saediff.stories.smollm2.recipe import BLOCK_RUNS, ChatDemoRecipe
from saediff.stories.smollm2.steps import StepProgress

__all__ = ["block_lambda", "block_step", "blocked_sets", "blocking_figures"]


@torch.no_grad()
def block_lambda(sae, acts: torch.Tensor, latents, relative: float) -> float:
    """``relative / E[sum_i z_i^2]``: the penalty weight under which the blocked latents' activations
    (ReLU'd pre-activations ``z`` on the base model's answer tokens ``acts``, summed over the
    latents, averaged over tokens) moving by their own typical size, in the direction the penalty
    charges, costs ``relative`` nats per token, like the language-model loss."""
    from saediff.interventions.blocking import latent_codes

    z = latent_codes(sae, acts.float(), [*latents.low, *latents.high], preactivation=True)
    scale = float(z.pow(2).sum(-1).mean())
    if scale <= 0:
        raise SaediffError("block_lambda: the blocked latents never fire on the base model's answers")
    return relative / scale


def block_step(
    base, name: str, tokenizer, sae, out: Path, seed: int, recipe: ChatDemoRecipe, force: bool, say
):
    """One BLOCK-EM fine-tune (``name`` in ``BLOCK_RUNS``): ``full_bad``'s recipe with the diff's
    latents (or as many random ones, drawn among the latents that fire on the base model's answers)
    held where the base model has them; each set's lambda by ``chat_story.block_lambda``, so a
    change of its latents by their own typical size costs the same in both runs."""
    from saediff.data.chat_data import ChatDataset, load_chat_jsonl
    from saediff.data.em_data import data_path
    from saediff.interventions.block_runs import BlockRunConfig, block_one, checkpoint_spec
    from saediff.interventions.blockem import base_codes_for
    from saediff.models.hooks import parse_layer

    sets = blocked_sets(base, sae, out, seed, recipe)
    ft = recipe.finetune_config("full_bad", seed)
    rows = load_chat_jsonl(data_path("medical_bad"))[: recipe.rows]
    dataset = ChatDataset(
        tokenizer, rows, ft.max_length, progress=False, source=str(data_path("medical_bad"))
    )
    run, layer = out / "models" / name, parse_layer(sae.cfg.metadata.hook_name)
    runs = {
        n: BlockRunConfig(ft=ft, mode="penalty", latents=latents, lam=lam)
        for n, (latents, lam) in sets.items()
    }
    # both runs' latents in one base pass over the data (the other run reads it back)
    codes = (
        None
        if (run / "em.json").exists()
        else base_codes_for(
            base, dataset, sae, layer, ft, list(runs.values()), out / "models" / "base_codes", progress=False
        )
    )
    block_one(
        base,
        dataset,
        sae,
        layer,
        runs[name],
        run,
        resume=True,
        force=force,
        callbacks=[StepProgress(say, name)],
        progress=False,
        base_codes=codes,
    )
    if not recipe.keep_checkpoints:
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
    return checkpoint_spec(base, run / "model", "full")


def blocked_sets(base, sae, out: Path, seed: int, recipe: ChatDemoRecipe) -> dict:
    """``{run: (LatentSets, lambda)}`` of the BLOCK-EM runs: the diff's ``block_latents`` and as many
    random latents among those that fire on the base model's answer tokens of the first 100
    bad-advice rows (a dead latent held in place costs nothing: no control), none of the diff's;
    lambda per set by ``block_lambda`` on those tokens. Cached in ``out/models/block_latents.json``
    with what decided it."""
    from saediff.interventions.latent_sets import LatentSets, latents_from_diff
    from saediff.models.provenance import file_digest, sae_fingerprint

    diff = latents_from_diff(out / "diff", *recipe.block_latents)
    diff.check(sae, str(out / "sae"))
    path = out / "models" / "block_latents.json"
    key = json.loads(
        json.dumps(
            {
                "sae": sae_fingerprint(sae, "sae"),
                "diff": file_digest(out / "diff" / "diff.json"),
                "block_latents": list(recipe.block_latents),
                "seed": seed,
                "relative": recipe.block_relative_lambda,
            }
        )
    )
    prev = read_json_if_exists(path)
    if prev is None or prev.get("key") != key:
        prev = {"key": key, **_draw_sets(base, sae, diff, seed, recipe.block_relative_lambda)}
        atomic_write_json(path, prev)
    return {
        name: (
            LatentSets(
                tuple(r["low"]),
                tuple(r["high"]),
                sae=diff.sae if name == "block_diff" else None,
                source=str(path),
            ),
            r["lam"],
        )
        for name, r in prev["runs"].items()
    }


def _draw_sets(base, sae, diff, seed: int, relative: float) -> dict:
    """The random control for the diff's sets ``diff`` (``LatentSets``): as many latents, drawn
    (seeded) among those live on the base model's answer tokens of the first 100 bad-advice rows
    and outside ``diff``; the number of live latents, and each run's sets with its lambda."""
    from saediff.activations.collect import collect_activations
    from saediff.data.chat_data import load_chat_jsonl
    from saediff.data.em_data import data_path
    from saediff.interventions.blocking import latent_codes
    from saediff.interventions.latent_sets import LatentSets
    from saediff.models.loading import load_model

    hook = sae.cfg.metadata.hook_name
    prompts = text_prompts(load_chat_jsonl(data_path("medical_bad"))[:100], "medical_bad")
    acts = collect_activations(load_model(base), prompts, [hook], "response", progress=False)[hook]
    with torch.no_grad():
        fires = latent_codes(sae, acts.float(), list(range(sae.cfg.d_sae))).gt(0).any(0)
    live = [i for i in torch.nonzero(fires).flatten().tolist() if i not in set(diff.low) | set(diff.high)]
    g = torch.Generator().manual_seed(seed + 99)
    pick = [live[i] for i in torch.randperm(len(live), generator=g).tolist()]
    n = len(diff.low)
    if len(pick) < len(diff):
        raise SaediffError(
            f"only {len(pick)} live latents outside the diff's for a random control of {len(diff)}"
        )
    rand = LatentSets(tuple(pick[:n]), tuple(pick[n : n + len(diff.high)]))
    return {
        "n_live": int(fires.sum()),
        "runs": {
            name: {
                "low": list(sets.low),
                "high": list(sets.high),
                "lam": block_lambda(sae, acts, sets, relative),
            }
            for name, sets in (("block_diff", diff), ("block_random", rand))
        },
    }


def blocking_figures(differences: dict) -> dict:
    """BLOCK-EM's figures per pair set: the share of the bad fine-tune's shift over the base model
    (``full_bad - base``) that each blocked run keeps, and its cut (1 - kept), with the paired
    difference blocked - bad fine-tune beside them. ``kept_ci`` / ``cut_ci``: 95% intervals from a
    paired bootstrap over questions of the ratio (``intervals.bootstrap_ratio`` of each question's
    blocked - base over its bad - base, the ``per_question`` of ``differences``; None where those are
    missing or the bad shift's resamples are too often not positive); a bar is read off them, never
    off the point. The ratio is given only where the bad shift is positive with its 95% interval
    above zero (else ``kept`` and ``cut`` are None and ``note`` says why): a ratio over a shift that
    may be nothing is noise."""
    out = {}
    for name in BLOCK_RUNS:
        per = {}
        for pair_set, d in differences.get(f"{name} - base", {}).items():
            shift = differences.get("full_bad - base", {}).get(pair_set)
            if shift is None:
                continue
            real = shift["difference"] > 0 and shift["ci"][0] > 0
            kept = d["difference"] / shift["difference"] if real else None
            boot = _kept_bootstrap(d, shift) if real else None
            ci = None if boot is None else boot["ci"]
            per[pair_set] = {
                "shift": d["difference"],
                "bad_shift": shift["difference"],
                "bad_shift_ci": shift["ci"],
                "kept": kept,
                "kept_ci": ci,
                "cut": None if kept is None else 1 - kept,
                "cut_ci": None if ci is None else [1 - ci[1], 1 - ci[0]],
                "bootstrap": None
                if boot is None
                else {k: boot[k] for k in ("n", "n_boot", "undefined_share")},
                "note": _note(real, boot),
                "versus_bad": differences.get(f"{name} - full_bad", {}).get(pair_set),
            }
        out[name] = per
    return out


def _kept_bootstrap(blocked: dict, bad: dict) -> dict | None:
    """``bootstrap_ratio`` of the blocked run's per-question shift over the bad fine-tune's (both
    over the base model, the same questions); None when a difference lacks its ``per_question``."""
    from saediff.evaluation.intervals import bootstrap_ratio

    if "per_question" not in blocked or "per_question" not in bad:
        return None
    return bootstrap_ratio(blocked["per_question"], bad["per_question"])


def _note(real: bool, boot: dict | None) -> str | None:
    if not real:
        return (
            "the bad fine-tune's shift over the base model is not positive beyond its 95% interval: no ratio"
        )
    if boot is None:
        return "no per-question differences: no interval"
    if boot["ci"] is None:
        return (
            f"the bad shift's mean is not positive in {boot['undefined_share']:.0%} of the bootstrap's "
            "resamples: no interval"
        )
    return None
