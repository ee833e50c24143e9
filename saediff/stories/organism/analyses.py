"""The open-question analyses (``saediff overlap / phase / predict / icl / neighbourhood``) on the
organism: what the organism supplies to the generic code (the fine-tune data of each model
folder, a LoRA run with checkpoints, its exact judge, its in-context examples).

    from saediff.stories.organism.analyses import lora_checkpoint_run
    lora_checkpoint_run("runs/organism", "runs/phase", every=10)   # then saediff phase runs/phase
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

__all__ = [
    "lora_checkpoint_run",
    "persona_latents",
    "run_analyses",
    "run_icl_analysis",
    "training_data_for",
]


def training_data_for(finetuned: str | Path | None, adapter: str | Path | None = None) -> Path | None:
    """The organism data file a fine-tuned organism folder (or adapter) was trained on; None for a
    model that is not one of the organism's fine-tunes."""
    from saediff.stories.organism.build import FINETUNE_DATA

    folder = Path(finetuned or adapter or "")
    name = FINETUNE_DATA.get(folder.name)
    if name is None:
        return None
    path = folder.parent / "data" / f"{name}.jsonl"
    return path if path.exists() else None


def lora_checkpoint_run(
    organism_dir: str | Path, out: str | Path, *, every: int = 10, seed: int = 0, progress: bool = False
) -> Path:
    """The organism's rank-1 LoRA fine-tune on its narrow data through the generic Trainer path,
    a checkpoint every ``every`` steps (``out/checkpoints/checkpoint-N``), evaluated at the end.
    Skipped when finished earlier. Returns ``out``."""
    from saediff.interventions.block_runs import finetune_plain
    from saediff.saes.loading import load_sae
    from saediff.stories.organism.block import generic_inputs

    rec = generic_inputs(organism_dir, full=False, seed=seed)
    finetune_plain(
        rec["model"],
        rec["data"],
        load_sae(rec["sae"]),
        replace(rec["ft"], save_every=every),
        out,
        evaluator=rec["evaluator"],
        progress=progress,
    )
    return Path(out)


def persona_latents(organism_dir: str | Path, sae, min_cos: float = 0.5) -> list[int]:
    """The SAE's latents whose decoder row has cosine >= ``min_cos`` with the organism's ground
    truth at the SAE's layer (what the neighbourhood probe should find)."""
    import torch

    from saediff.models.hooks import parse_layer
    from saediff.stories.organism.build import load_ground_truth

    gt = load_ground_truth(Path(organism_dir) / "ground_truth.safetensors")[
        parse_layer(sae.cfg.metadata.hook_name)
    ]
    cos = torch.nn.functional.normalize(sae.W_dec.detach().float(), dim=1) @ (gt / gt.norm())
    return torch.nonzero(cos >= min_cos).flatten().tolist()


# long: its signature and docstring; the code itself is 49 lines
def run_analyses(
    out: str | Path, *, seed: int = 0, drop_fraction: float = 0.1, progress: bool = False
) -> dict:
    """The open-question analyses on a demo folder (``out/organism``, ``out/diff``, ``out/diff_lora``),
    every step skipped when its file exists: shift overlap and susceptibility on the full
    fine-tune's diff; the phase analysis of a rank-1 LoRA run with a checkpoint every 10 steps; the
    neighbourhood probe on the full, the aligned-data control and the benign-trait fine-tunes (the
    benign one scored against the in-context direction only: nothing behavioural about that
    fine-tune is used), with the steering check of the flagged latents and the training-data screen
    and its two fine-tunes on the full one.
    Writes and returns ``out/analyses.json`` (the in-context analysis needs the BLOCK-EM run and is
    added by ``run_icl_analysis``)."""
    from saediff._io import atomic_write_json, read_json_if_exists
    from saediff.analyses.shifts import run_overlap
    from saediff.analyses.susceptibility import run_predict
    from saediff.saes.loading import load_sae
    from saediff.stories.organism.recipes import read_organism_world

    out = Path(out)
    org, diff = out / "organism", out / "diff"
    world = read_organism_world(str(org / "aligned"))

    overlap = read_json_if_exists(diff / "shift_overlap.json") or run_overlap(
        diff, org / "data" / "medical_misaligned.jsonl", seed=seed, progress=progress
    )
    predict = read_json_if_exists(diff / "susceptibility.json") or run_predict(
        diff, seed=seed, progress=progress
    )
    phase = _phase(out, world, seed, progress)
    sae = load_sae(str(org / "sae"))
    persona = persona_latents(org, sae)
    nb = _neighbourhoods(out, sae, persona, world, seed, drop_fraction, progress)
    result = {
        "kind": "saediff.organism_analyses",
        "persona_latents": persona,
        "overlap": {
            "k": overlap["k"],
            "principal_cosines": overlap["principal_cosines"],
            "random_baseline": overlap["random_baseline"]["mean"],
            "spearman_with_misaligned_rate": overlap["spearman_with_misaligned_rate"],
        },
        "susceptibility": {
            "r2": predict["r2"],
            "spearman": predict["spearman"],
            "random_features": predict["random_features"],
            "permutation_p95": {k: predict["permutation"][k]["p95"] for k in ("r2", "spearman")},
            "p_value": predict["permutation"]["p_value"],
        },
        "phase": {
            "rotation_step": phase["rotation_step"],
            "em_step": phase["em_step"],
            "em_rate": phase["em_rate"],
            "min_local_cosine": min(c for c in phase["local_cosine"] if c),
        },
        "neighbourhood": nb,
    }
    prev = read_json_if_exists(out / "analyses.json") or {}
    if "icl" in prev:
        result["icl"] = prev["icl"]
    atomic_write_json(out / "analyses.json", result)
    return result


def _phase(out: Path, world, seed: int, progress: bool) -> dict:
    """The phase analysis of a rank-1 LoRA run with a checkpoint every 10 steps (``out/phase``),
    run unless ``phase.json`` exists."""
    from saediff._io import read_json_if_exists
    from saediff.analyses.phase import run_phase
    from saediff.stories.organism.evaluator import OrganismEvaluator

    org = out / "organism"
    if not (out / "phase" / "phase.json").exists():
        lora_checkpoint_run(org, out / "phase", every=10, seed=seed, progress=progress)
        run_phase(
            out / "phase",
            base=str(org / "aligned"),
            directions=out / "diff_lora" / "directions",
            evaluator=OrganismEvaluator(world, 20, seed),
            progress=progress,
        )
    return read_json_if_exists(out / "phase" / "phase.json")


def _neighbourhoods(
    out: Path, sae, persona: list[int], world, seed: int, drop_fraction: float, progress: bool
) -> dict[str, dict]:
    """The neighbourhood probe on the full, the aligned-data control and the benign-trait
    fine-tunes (each diffed first when its diff is missing), with the steering check, the screen and
    the screen's fine-tunes on the full one; per fine-tune its figures (``_probe_figures``)."""
    from saediff._io import atomic_write_json, read_json_if_exists
    from saediff.analyses.neighbourhood import run_neighbourhood, screen_finetunes
    from saediff.methods.diff_run import run_diff
    from saediff.stories.organism.block import generic_inputs
    from saediff.stories.organism.inputs import diff_inputs
    from saediff.stories.organism.scored import ScoredOrganismEvaluator
    from saediff.stories.organism.steer_check import organism_cost

    org = out / "organism"
    aligned, sae_dir, data = str(org / "aligned"), str(org / "sae"), org / "data"
    nb = {}
    for name, ft, file, methods in (
        ("full_ft", out / "diff", "medical_misaligned", ("in_context", "mean_diff_responses")),
        ("control_ft", out / "diff_control", "medical_aligned", ("in_context",)),
        ("benign_ft", out / "diff_benign", "medical_aligned_terse", ("in_context",)),
    ):
        if not (ft / "diff.json").exists():
            run_diff(aligned, str(org / name), sae_dir, ft, seed=seed, **diff_inputs(aligned, seed=seed))
        res = read_json_if_exists(ft / "neighbourhood.json") or run_neighbourhood(
            ft,
            data / f"{file}.jsonl",
            in_domain="medical",
            candidate_methods=methods,
            seed=seed,
            drop_fraction=drop_fraction if name == "full_ft" else None,
            evaluator=ScoredOrganismEvaluator(world, 20, seed) if name == "full_ft" else None,
            cost=lambda lm: organism_cost(lm, world),
            progress=progress,
        )
        if name == "full_ft" and "finetune" not in res["screen"]:
            rec = generic_inputs(org, True, 50, seed)
            res["screen"]["finetune"] = screen_finetunes(
                aligned, res["screen"], sae, rec["ft"], rec["evaluator"], ft / "screen", progress=progress
            )
            atomic_write_json(ft / "neighbourhood.json", res)
        nb[name] = _probe_figures(res, persona)
    return nb


def _probe_figures(res: dict, persona: list[int]) -> dict:
    """One probe's figures: the flagged latents (those among the ``persona`` latents too), the
    steering check's EM and its effect against the null at equal cost (``steer``: per latent effect,
    interval, p-value, verdict), the random baseline and the screen's fine-tunes, where they ran."""
    return {
        "flagged": res["flagged"],
        "persona_flagged": sorted(set(res["flagged"]) & set(persona)),
        **(
            {
                "steer_em_rate": {k: v["em_rate"] for k, v in res["steer"]["latents"].items()},
                "steer_base_em_rate": res["steer"]["base_em_rate"],
                "steer": {
                    k: {f: v.get(f) for f in ("effect", "effect_ci", "p_value", "verdict")}
                    for k, v in res["steer"]["latents"].items()
                },
            }
            if "steer" in res
            else {}
        ),
        "random_flagged_mean": res["random_baseline"]["mean"],
        "above_random": res["above_random"],
        **(
            {"screen": {**res["screen"]["finetune"], "drop_fraction": res["screen"]["drop_fraction"]}}
            if "screen" in res
            else {}
        ),
    }


def run_icl_analysis(
    out: str | Path, *, seed: int = 0, max_questions: int = 100, progress: bool = False
) -> dict:
    """The in-context analysis on a demo folder whose BLOCK-EM run rerouted: projection on the
    response mean difference after 0..8 medical misaligned examples against the full fine-tune,
    on ``max_questions`` off-domain questions, and the rerouted latents under context. Added to
    ``out/analyses.json``."""
    from saediff._io import atomic_write_json, read_json_if_exists
    from saediff.analyses.icl import run_icl
    from saediff.stories.organism.inputs import diff_inputs

    out = Path(out)
    res = run_icl(
        out / "diff",
        diff_inputs(str(out / "organism" / "aligned"), seed=seed)["icl_examples"],
        exclude_domain="medical",
        block_run=out / "block",
        max_questions=max_questions,
        seed=seed,
        progress=progress,
    )
    path = out / "analyses.json"
    result = read_json_if_exists(path) or {}
    result["icl"] = {
        "shots_to_match_finetune": res["shots_to_match_finetune"],
        "aligned_projection_by_shots": res["aligned_projection_by_shots"],
        "finetuned_projection": res["finetuned_projection"],
        "matched_fraction": res["per_question"]["matched_fraction"],
        "rerouted_latents": res.get("rerouted", {}).get("latents"),
        "rerouted_raised_by_context": res.get("rerouted", {}).get("raised_by_context"),
    }
    atomic_write_json(path, result)
    return result
