"""The directions a BLOCK-EM run projects out (concept ablation fine-tuning, ``mode="project"``)
or adds while it trains (preventative steering, ``mode="steer"``), their random controls, and a
diff run's mean difference between the models, block by block."""

from __future__ import annotations

from pathlib import Path

import torch

from saediff.errors import SaediffError
from saediff.interventions.latent_sets import LatentSets

__all__ = ["model_difference", "norm_matched_random", "project_directions", "random_directions"]


def project_directions(
    source: str,
    layers: list[int] | None,
    *,
    sae=None,
    latents: LatentSets | None = None,
    diff_run: str | Path | None = None,
    named: dict[str, dict[int, torch.Tensor]] | None = None,
) -> dict[int, torch.Tensor]:
    """{block: (k, d)} for concept ablation fine-tuning (``mode="project"``): ``latents``: the
    decoder rows of ``latents.low`` at the SAE's block; ``model_diff``: the diff run's mean
    difference between the models at each block (``mean_diff_models_L{block}``); or a name in
    ``named`` ({name: {block: (d,)}}, e.g. the organism's ``ground_truth``); or ``FOLDER:NAME``, a
    direction of a saediff export folder (a diff run's ``directions/``, ``saediff adl``'s, a persona
    vector) at its own block (``layers`` None, or that block alone)."""
    folder = source.rpartition(":")[0]
    if folder and Path(folder).is_dir():
        from saediff.methods.export import load_direction
        from saediff.models.hooks import parse_layer

        d = load_direction(source)
        at = parse_layer(d.hook)
        if layers not in (None, [at]):
            raise SaediffError(f"direction {source} lives at block {at}, not at blocks {layers}")
        return {at: d.vector.float()[None]}
    if layers is None:
        raise SaediffError(f"project direction {source!r} needs its blocks")
    if source == "latents":
        from saediff.models.hooks import parse_layer

        if sae is None or latents is None or not latents.low:
            raise SaediffError("project direction 'latents' needs an SAE and latents to hold down")
        at = parse_layer(sae.cfg.metadata.hook_name)
        if layers != [at]:
            raise SaediffError(f"latent directions live at the SAE's block {at}, not at blocks {layers}")
        return {at: torch.stack([sae.W_dec[i].detach().float() for i in latents.low])}
    if source == "model_diff":
        if diff_run is None:
            raise SaediffError("project direction 'model_diff' needs --diff-run")
        return {L: v[None] for L, v in model_difference(diff_run, layers).items()}
    if named and source in named:
        missing = [L for L in layers if L not in named[source]]
        if missing:
            raise SaediffError(
                f"project direction {source!r} has no block {missing[0]} (it has {sorted(named[source])})"
            )
        return {L: named[source][L][None].float() for L in layers}
    known = ["latents", "model_diff", *sorted(named or {})]
    raise SaediffError(f"unknown project direction {source!r}; choose from {', '.join(known)}")


def random_directions(like: dict[int, torch.Tensor], seed: int) -> dict[int, torch.Tensor]:
    """As many seeded random directions per block as ``like`` has (the concept-ablation control;
    a projection does not depend on their norm)."""
    g = torch.Generator().manual_seed(seed + 99)
    return {L: torch.randn(d.shape, generator=g).to(d.dtype) for L, d in sorted(like.items())}


def norm_matched_random(like: dict[int, torch.Tensor], seed: int) -> dict[int, torch.Tensor]:
    """``random_directions`` with each row at the norm of ``like``'s (the preventative-steering
    control: what is added matters by its size)."""
    rnd = random_directions(like, seed)
    return {L: r / r.norm(dim=-1, keepdim=True) * like[L].norm(dim=-1, keepdim=True) for L, r in rnd.items()}


def model_difference(
    diff_run: str | Path, layers: list[int], required: bool = True
) -> dict[int, torch.Tensor]:
    """{block: (d,)} the diff run's mean difference between the models at each block: fine-tuned
    minus base (``mean_diff_models_L``), or for a base-plus-adapter diff the adapter's downstream
    effect (``lora_downstream_L``), the same quantity. ``required``: a missing block raises."""
    from saediff.methods.export import load_directions

    found = load_directions(Path(diff_run) / "directions")
    out = {}
    for L in layers:
        name = next((n for n in (f"mean_diff_models_L{L}", f"lora_downstream_L{L}") if n in found), None)
        if name is not None:
            out[L] = found[name].vector.float()
        elif required:
            raise SaediffError(
                f"{diff_run}/directions has no mean_diff_models_L{L} or lora_downstream_L{L} (diff "
                f"with --layers covering block {L})"
            )
    return out
