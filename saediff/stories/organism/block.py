"""What the organism supplies to the generic BLOCK-EM (``saediff.interventions.blockem``): its model, narrow data
and controls, SAE, exact judge, fine-tune recipe, drift monitor and ground-truth directions. Every
mode (penalty, ablate, project) trains through ``run_block_em``; there is no organism loop.

    saediff block --organism runs/demo/organism --diff-run runs/demo/diff --out runs/block
"""

from __future__ import annotations

import json
from pathlib import Path

from saediff.errors import MissingFileError
from saediff.models.hooks import parse_layer
from saediff.stories.organism.build import load_ground_truth
from saediff.stories.organism.evaluator import evaluate_organism_em
from saediff.stories.organism.prompts import em_questions
from saediff.stories.organism.recipes import OrganismConfig, read_organism_world
from saediff.stories.organism.world import World

__all__ = ["block_organism", "generic_inputs", "organism_config", "organism_monitor"]


def organism_config(organism_dir: Path, world: World) -> OrganismConfig:
    """The config an organism folder was built with (from its organism.json)."""
    saved = json.loads((organism_dir / "organism.json").read_text())["config"]
    fields = OrganismConfig.__dataclass_fields__
    return OrganismConfig(**{k: v for k, v in saved.items() if k in fields and k != "world"}, world=world)


def generic_inputs(organism_dir: str | Path, full: bool, samples: int = 50, seed: int = 0) -> dict:
    """What ``saediff block --organism DIR`` fills in for the generic command: the aligned model,
    the misaligned medical chats (``DIR/data/medical_misaligned.jsonl``, written if missing), its
    controls (aligned, held-out aligned and, in worlds with a register slot, the formal-register
    aligned chats that neither persona favours: the drift monitor's other-distribution false-alarm
    check), the SAE, the exact judge and the organism's fine-tune recipe (full: lr 2e-4; LoRA:
    rank 1 on ``down_proj`` of its LoRA layer, lr 2e-3; 300 steps of 32)."""
    from saediff.stories.organism.evaluator import OrganismEvaluator
    from saediff.stories.organism.recipes import narrow_finetune_config, write_chat_data

    organism_dir = Path(organism_dir)
    world = read_organism_world(organism_dir / "aligned")
    if world is None:
        raise MissingFileError(f"{organism_dir}/aligned is not a saediff organism folder")
    ocfg = organism_config(organism_dir, world)
    data = write_chat_data(organism_dir, ocfg)
    return {
        "model": str(organism_dir / "aligned"),
        "data": data["medical_misaligned"],
        "control_data": data["medical_aligned"],
        "heldout_control_data": data["medical_aligned_heldout"],
        "benign_control_data": data.get("medical_aligned_formal"),
        "ft": narrow_finetune_config(ocfg, "full" if full else "lora"),
        "sae": str(organism_dir / "sae"),
        "evaluator": OrganismEvaluator(world, samples, seed),
        "directions": {"ground_truth": load_ground_truth(organism_dir / "ground_truth.safetensors")},
        "monitor": lambda layer: organism_monitor(organism_dir, world, layer, seed=seed),
    }


def block_organism(
    organism_dir: str | Path,
    out: str | Path,
    latents,
    *,
    full: bool = True,
    lams: tuple[float, ...] = (1e4,),
    controls: bool = True,
    steps: int | None = None,
    seed: int = 0,
    samples: int = 50,
    reroute: bool = False,
    reblock: bool = False,
) -> dict:
    """``saediff block --organism DIR [--full]``: the generic BLOCK-EM sweep (``run_block_em``)
    with the organism's inputs, its aligned-data control (which calibrates the drift monitor)
    and its exact judge. ``latents``: a ``saediff.interventions.latent_sets.LatentSets``. ``reroute``: each blocked
    run is trained 3x longer too and re-diffed on the organism's questions (``reblock``: then the
    latents that rose outside the blocked sets are held as well)."""
    from dataclasses import replace

    from saediff.interventions.blockem import run_block_em
    from saediff.saes.loading import load_sae

    rec = generic_inputs(organism_dir, full, samples, seed)
    sae = load_sae(rec["sae"])
    layer = parse_layer(sae.cfg.metadata.hook_name)
    ft = replace(rec["ft"], steps=steps or rec["ft"].steps)
    rediff = None
    if reroute:
        from saediff.interventions.rerouting import rediff_against
        from saediff.stories.organism.inputs import diff_inputs

        rediff = rediff_against(
            rec["model"], rec["sae"], seed, **diff_inputs(rec["model"], "organism:50", seed=seed)
        )
    return run_block_em(
        rec["model"],
        rec["data"],
        sae,
        out,
        latents,
        ft=ft,
        lams=lams,
        controls=controls,
        evaluator=rec["evaluator"],
        seed=seed,
        sae_path=rec["sae"],
        monitor=rec["monitor"](layer),
        control_data=rec["control_data"],
        heldout_control_data=rec["heldout_control_data"],
        benign_control_data=rec["benign_control_data"],
        reroute_factor=3 if reroute else None,
        rediff=rediff,
        reblock=reblock,
        progress=False,
    )


def organism_monitor(organism_dir: Path, world: World, layer: int, every: int = 10, seed: int = 0):
    """A drift-monitor factory for organism fine-tunes: 20 held-out questions per non-medical
    domain, the ground truth at ``layer``, and the exact other-domain EM rate (10 answers per
    domain, 50 off-domain) at every check, every 10 steps (the demo's time budget) and after steps 1,
    2, 4 and 8 (at lr 2e-4 off-domain EM can pass 0.1 within the first 10 steps)."""
    from saediff.interventions.sweep_monitor import MonitorFactory

    qs = [p for p in em_questions(world, 20, seed=seed + 11) if p.domain != "medical"]
    gt = load_ground_truth(Path(organism_dir) / "ground_truth.safetensors")[layer]
    return MonitorFactory(
        qs,
        gt[None],
        layer,
        every=every,
        max_new_tokens=world.answer_len + 1,
        seed=seed,
        early=True,
        em_fn=lambda lm: evaluate_organism_em(lm, world, 10, seed=seed).other_misaligned_rate,
    )
