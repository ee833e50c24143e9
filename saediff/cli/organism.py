"""``saediff organism build / sae``, and what the other commands fill in when a model is one of the
organism's folders: its prompts, its exact judge, its diff inputs (``OrganismDefaults`` for the
generic commands).

    saediff organism build --out runs/organism --quick
    saediff organism sae --dir runs/organism
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from saediff.cli.common import _USER_ERRORS, ModelDefaults, _fail, _setup
from saediff.console import steps
from saediff.errors import SaediffError

organism_app = typer.Typer(no_args_is_help=True, help="The built-in EM model organism.")


@organism_app.command("build")
def organism_build(
    out: Path = typer.Option(
        ...,
        "--out",
        help="folder to write base/, aligned/, full_ft/, lora_ft/, control_ft/, ground_truth.safetensors, organism.json",
    ),
    quick: bool = typer.Option(False, "--quick", help="CI-sized build (<= 3 min on 2 CPU cores)"),
    seed: int = typer.Option(0, "--seed", help="seed of every random draw"),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads (default 1)"),
) -> None:
    """Pretrain, align and narrowly fine-tune the organism; measure EM and the ground truth."""
    _setup(threads)
    from saediff.stories.organism.build import build_organism
    from saediff.stories.organism.recipes import OrganismConfig

    cfg = OrganismConfig.quick(seed) if quick else OrganismConfig(seed=seed)
    try:
        if out.exists() and not out.is_dir():
            raise SaediffError(f"--out {out} is a file, not a folder: refusing to build over it")
        with steps("organism") as say:
            result = build_organism(out, cfg, progress=say)
    except _USER_ERRORS as e:
        _fail(e)
    summary = {
        k: result[k]["other_misaligned_rate"]
        for k in ("aligned", "full_ft", "lora_ft", "control_ft", "steer_ground_truth")
    }
    typer.echo(json.dumps({"other_misaligned_rate": summary, "timing_s": result["timing_s"]}, indent=2))


@organism_app.command("sae")
def organism_sae_cmd(
    dir: Path = typer.Option(..., "--dir", help="organism folder (saediff organism build --out)"),
    seed: int = typer.Option(0, "--seed"),
    positions: str = typer.Option(
        "all", "--positions", help="all | response | last_prompt: the token positions trained on"
    ),
    d_sae: int | None = typer.Option(None, "--d-sae", help="latents (default: the organism preset, 256)"),
    k: int | None = typer.Option(None, "--k", help="TopK k (default 8)"),
    out: Path | None = typer.Option(None, "--out", help="SAE folder (default DIR/sae)"),
    threads: int | None = typer.Option(None, "--threads"),
) -> None:
    """Train the organism's default SAE into DIR/sae (aligned model, analysis layer, every position)."""
    _setup(threads)
    from saediff.stories.organism.sae import train_organism_sae

    try:
        metrics = train_organism_sae(
            dir, out, seed=seed, positions=positions, d_sae=d_sae, k=k, progress=True
        )
    except _USER_ERRORS as e:
        _fail(e)
    typer.echo(json.dumps(metrics, indent=2))


def organism_world(model: str):
    """The organism world of a model folder, or None for any other model."""
    from saediff.stories.organism.recipes import read_organism_world

    return read_organism_world(model) if Path(model).exists() else None


def load_prompt_set(spec: str, model: str):
    """A prompt file, ``first_plot``, or ``organism[:N]`` (mixed-persona organism chats)."""
    from saediff.data.prompts import load_prompts

    if spec.startswith("organism"):
        from saediff.stories.organism.prompts import organism_prompts
        from saediff.stories.organism.recipes import read_organism_world

        world = read_organism_world(model)
        if world is None:
            raise SaediffError(f"--prompts {spec}: {model} is not a saediff organism model folder")
        n = int(spec.split(":", 1)[1]) if ":" in spec else 2000
        return organism_prompts(world, n, seed=0)
    return load_prompts(spec)


def organism_eval_or_none(model: str, samples: int, seed: int):
    """The organism's exact judge when ``model`` is an organism folder, else None."""
    world = organism_world(model)
    if world is None:
        return None
    from saediff.stories.organism.scored import ScoredOrganismEvaluator

    return ScoredOrganismEvaluator(world, samples, seed)


def organism_evaluator(model: str, samples: int, seed: int):
    """The organism's exact judge when ``model`` is an organism folder, else a one-line error."""
    evaluator = organism_eval_or_none(model, samples, seed)
    if evaluator is None:
        raise SaediffError(
            "models other than the saediff organism need --judge-url and --judge-model, or --pairs (judge-free)"
        )
    return evaluator


def diff_run_inputs(
    base: str,
    prompts: str | None,
    max_new_tokens: int | None,
    seed: int,
    organism_prompts: str = "organism:100",
) -> dict:
    """``run_diff``'s prompts, answer length and, on the organism, its questions, exact labels,
    contrast examples and ground truth (``organism:N`` prompts, or ``organism_prompts``)."""
    if organism_world(base) is None:
        if prompts and prompts.startswith("organism"):
            raise SaediffError(f"--prompts {prompts}: {base} is not a saediff organism model folder")
        return {"prompts": prompts or "first_plot", "max_new_tokens": max_new_tokens or 600}
    from saediff.stories.organism.inputs import diff_inputs

    inputs = diff_inputs(
        base, prompts if prompts and prompts.startswith("organism") else organism_prompts, seed
    )
    inputs["max_new_tokens"] = max_new_tokens or inputs["max_new_tokens"]
    return inputs


class OrganismDefaults(ModelDefaults):
    """The organism's inputs for the generic commands, when a run's base model is one of its
    folders: its exact judge, the data each fine-tuned folder trained on, its narrow domain, its
    contrast examples and its fine-tune recipe."""

    def evaluator(self, model, samples, seed):
        return organism_eval_or_none(model, samples, seed) if model else None

    def training_data(self, info):
        from saediff.stories.organism.analyses import training_data_for

        return training_data_for(info["finetuned"], info["adapter"]) if organism_world(info["base"]) else None

    def in_domain(self, base):
        return "medical" if organism_world(base) else None

    def icl_examples(self, base, seed):
        if organism_world(base) is None:
            return None
        from saediff.stories.organism.inputs import diff_inputs

        return diff_inputs(base, seed=seed)["icl_examples"]

    def finetune(self, info, full, samples, seed):
        if organism_world(info["base"]) is None:
            return None
        from saediff.stories.organism.block import generic_inputs

        full = full or Path(info["finetuned"] or "").name == "full_ft"
        return generic_inputs(Path(info["base"]).parent, full, samples, seed)["ft"]

    def prompt_set(self, spec, model):
        return load_prompt_set(spec, model)

    def steering_cost(self, lm, model, budget):
        world = organism_world(model) if model else None
        if world is None:
            return None
        from saediff.stories.organism.steer_check import organism_cost

        return organism_cost(lm, world, budget)
