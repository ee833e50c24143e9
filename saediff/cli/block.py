"""``saediff block``: BLOCK-EM on any model (fine-tune while chosen SAE latents stay where the base
model has them, or with directions ablated, projected out or steered), with its controls, drift
monitor and rerouting check; ``saediff.cli.block_inputs`` resolves the options.

    saediff block --organism runs/organism --diff-run RUN --out BLOCK
    saediff block --model M --data narrow.jsonl --sae SAE --diff-run RUN --pairs offdomain --out BLOCK
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.console import Console

from saediff.cli import block_inputs as inputs
from saediff.cli.checks import check_direction, check_dtype, check_inputs
from saediff.cli.common import (
    _USER_ERRORS,
    JUDGE_CONSTRAIN_HELP,
    JUDGE_PROMPTS_HELP,
    PAIRS_HELP,
    _fail,
    _int_list,
    _judge_evaluator,
    _setup,
    use_precision,
)
from saediff.errors import SaediffError

log = logging.getLogger(__name__)


# long: one typer option per line (every knob of BLOCK-EM); saediff.cli.block_inputs resolves them
def block_cmd(
    out: Path = typer.Option(..., "--out", help="folder for one sub-folder per run and summary.json"),
    model: str | None = typer.Option(None, "--model", help="HF model folder or hub name to fine-tune"),
    data: Path | None = typer.Option(None, "--data", help='narrow chat data: JSONL rows {"messages": [...]}'),
    sae: str | None = typer.Option(
        None, "--sae", help="SAELens folder, or RELEASE:SAE_ID, at a residual hook"
    ),
    organism: Path | None = typer.Option(
        None,
        "--organism",
        help="organism folder: fills --model, --data, --sae, the judge and the fine-tune recipe",
    ),
    diff_run: Path | None = typer.Option(None, "--diff-run", help="run folder of saediff diff (top latents)"),
    latents_file: Path | None = typer.Option(
        None, "--latents", help="latents.json {low: [...], high: [...]}"
    ),
    latent: list[int] = typer.Option([], "--latent", help="latent to hold down (repeatable)"),
    top: int = typer.Option(30, "--top", help="latents from --diff-run that rose most, held down"),
    high: int = typer.Option(30, "--high", help="latents from --diff-run that fell most, held up"),
    lam: list[float] = typer.Option([1e4], "--lam", help="penalty weight (repeatable: a sweep)"),
    full: bool = typer.Option(False, "--full", help="full fine-tune instead of LoRA"),
    lora_rank: int = typer.Option(1, "--lora-rank"),
    lora_alpha: float | None = typer.Option(None, "--lora-alpha", help="default: the rank"),
    lora_layers: str | None = typer.Option(
        None, "--lora-layers", help="comma-separated blocks (default: all)"
    ),
    lora_modules: str = typer.Option(
        "down_proj",
        "--lora-modules",
        help="comma-separated, e.g. q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    ),
    rslora: bool = typer.Option(False, "--rslora", help="rank-stabilised LoRA"),
    steps: int | None = typer.Option(None, "--steps", help="optimizer steps (default 300)"),
    batch_size: int | None = typer.Option(None, "--batch-size", help="sequences per device per micro-batch"),
    grad_accum: int = typer.Option(1, "--grad-accum", help="micro-batches per optimizer step"),
    lr: float | None = typer.Option(
        None, "--lr", help="learning rate (default 1e-5; organism: its recipe's)"
    ),
    precision: str = typer.Option(
        "auto",
        "--precision",
        help="auto | fp32 | bf16 | fp16: the fine-tunes' mixed precision (auto: the model's)",
    ),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing"),
    max_length: int = typer.Option(2048, "--max-length", help="tokens per conversation"),
    save_every: int | None = typer.Option(None, "--save-every", help="checkpoint every N steps"),
    resume: bool = typer.Option(
        False, "--resume", help="continue each unfinished run from its newest checkpoint"
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="discard runs under --out that another setup (model, data, SAE, "
        "latents, settings) trained, instead of stopping",
    ),
    freeze_after_block: bool = typer.Option(
        False, "--freeze-after-block", help="train only blocks <= the SAE's"
    ),
    controls: bool = typer.Option(
        True, "--controls/--no-controls", help="also the plain fine-tune and random latents"
    ),
    control_data: Path | None = typer.Option(
        None,
        "--control-data",
        help="aligned answers to the same questions "
        "(JSONL): a control fine-tune first, which calibrates the monitor",
    ),
    monitor: bool | None = typer.Option(
        None,
        "--monitor/--no-monitor",
        help="drift monitor on every run, "
        "read every steps/20 steps and after steps 1, 2, 4, ... below that "
        "(default: on for the organism)",
    ),
    monitor_prompts: str = typer.Option(
        "first_plot", "--monitor-prompts", help="held-out prompts the monitor reads"
    ),
    judge_url: str | None = typer.Option(
        None, "--judge-url", help="OpenAI-compatible judge (not for the organism)"
    ),
    judge_model: str | None = typer.Option(None, "--judge-model"),
    pairs: str | None = typer.Option(None, "--pairs", help=PAIRS_HELP),
    questions: str = typer.Option(
        "first_plot", "--questions", help="first_plot, or a YAML/JSONL prompt file"
    ),
    samples: int = typer.Option(50, "--samples", help="answers per question (organism: per domain)"),
    max_new_tokens: int = typer.Option(600, "--max-new-tokens"),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env"),
    judge_prompts: Path | None = typer.Option(None, "--judge-prompts", help=JUDGE_PROMPTS_HELP),
    judge_constrain: bool = typer.Option(False, "--judge-constrain", help=JUDGE_CONSTRAIN_HELP),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    seed: int = typer.Option(0, "--seed"),
    mode: str = typer.Option(
        "penalty",
        "--mode",
        help="penalty (latents held at the base model's values) | "
        "ablate (the latents removed in the forward pass) | project (directions projected out "
        "after their blocks: concept ablation fine-tuning) | steer (a direction added while "
        "training: preventative steering; evaluated without it)",
    ),
    steer_alpha: float = typer.Option(
        1.0, "--steer-alpha", help="--mode steer: the multiple of the direction added"
    ),
    project_layers: str | None = typer.Option(
        None,
        "--project-layers",
        help="--mode project: blocks to project after, comma-separated (default: the SAE's)",
    ),
    project_direction: str | None = typer.Option(
        None,
        "--project-direction",
        help="--mode project or steer: "
        "model_diff (the models' mean difference from --diff-run) | "
        "latents (their decoder rows) | FOLDER:NAME (a direction of an "
        "export folder, e.g. RUN/directions:mean_diff_responses_L15, at "
        "its own block; --sae may then be left out) | ground_truth "
        "(--organism; its default)",
    ),
    reroute: bool = typer.Option(
        False,
        "--reroute",
        help="also train each blocked run 3x longer (checkpoints, EM over "
        "them) and re-diff it: which latents outside the blocked sets rose",
    ),
    reblock: bool = typer.Option(
        False, "--reblock", help="with --reroute: hold those latents down too and train again"
    ),
    threads: int | None = typer.Option(None, "--threads"),
) -> None:
    """BLOCK-EM on any model: fine-tune on --data while SAE latents stay where the base model has them; EM of every run."""
    _setup(threads)
    if precision in ("fp32", "bf16"):  # the models load at the fine-tune's precision too
        use_precision(precision)
    from saediff.interventions.blockem import run_block_em
    from saediff.models.loading import ModelSpec

    try:
        recipe = inputs.organism_recipe(organism, full, samples, seed)
        model, data, sae = model or recipe.get("model"), data or recipe.get("data"), sae or recipe.get("sae")
        source = project_direction or ("ground_truth" if organism is not None else "model_diff")
        from_file = mode in ("project", "steer") and Path(source.rpartition(":")[0] or "\0").is_dir()
        if not (model and data and (sae or from_file)):
            raise SaediffError("give --model, --data and --sae (or --organism DIR)")
        check_dtype(dtype)
        _check_block_inputs(model, data, sae, control_data, lora_layers, project_layers, source, from_file)
        sets = inputs.block_latents(mode, source, diff_run, latents_file, latent, top, high)
        sae_obj, layer = inputs.sae_and_layer(sae)
        directions = None
        if mode in ("project", "steer"):
            blocks = (
                list(_int_list(project_layers, "--project-layers"))
                if project_layers
                else (None if from_file else [layer])
            )
            directions = inputs.directions(source, blocks, mode, steer_alpha, sae_obj, sets, diff_run, recipe)
            layer = layer if layer is not None else max(directions)
        ft = inputs.finetune_config(
            recipe.get("ft"),
            full=full,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_layers=lora_layers,
            lora_modules=lora_modules,
            rslora=rslora,
            seed=seed,
            steps=steps,
            batch_size=batch_size,
            grad_accum=grad_accum,
            lr=lr,
            precision=precision,
            gradient_checkpointing=gradient_checkpointing,
            max_length=max_length,
            save_every=save_every,
            freeze_after_block=layer if freeze_after_block else None,
        )
        evaluator = recipe.get("evaluator") or _judge_evaluator(
            judge_url,
            judge_model,
            questions,
            samples,
            max_new_tokens,
            api_key_env,
            out,
            seed,
            pairs=pairs,
            judge_prompts=judge_prompts,
            judge_constrain=judge_constrain,
        )
        factory = None
        if monitor if monitor is not None else organism is not None:
            factory = inputs.monitor_factory(
                recipe, sae_obj, sets, layer, diff_run, monitor_prompts, ft.steps, max_new_tokens, seed
            )
        rediff = inputs.rediff(model, str(sae), questions, max_new_tokens, seed) if reroute else None
        if resume:
            _say_if_nothing_to_resume(out)
        summary = run_block_em(
            ModelSpec(model, dtype=dtype, device=device),
            data,
            sae_obj,
            out,
            sets,
            ft=ft,
            lams=tuple(lam),
            controls=controls,
            evaluator=evaluator,
            resume=resume,
            seed=seed,
            sae_path=str(sae) if sae else "",
            monitor=factory,
            control_data=control_data or (recipe.get("control_data") if controls else None),
            heldout_control_data=recipe.get("heldout_control_data") if controls else None,
            benign_control_data=recipe.get("benign_control_data") if controls else None,
            reroute_factor=3 if reroute else None,
            rediff=rediff,
            reblock=reblock,
            force=force,
            mode=mode,
            directions=directions,
        )
    except _USER_ERRORS as e:
        _fail(e)
    from accelerate import PartialState

    if PartialState().is_main_process:  # one table under accelerate launch
        _print_block_summary(summary)


def _check_block_inputs(
    model, data, sae, control_data, lora_layers, project_layers, source, from_file
) -> None:
    """What ``block`` can check before it loads a model or trains: the model's config, the chat
    data's rows, the SAE against the model, the blocks named, the export folder's direction."""
    from saediff.data.chat_data import load_chat_jsonl
    from saediff.models.validate import check_layers
    from saediff.saes.checks import check_sae_folder

    shape = check_inputs(model)
    check_layers(_int_list(lora_layers, "--lora-layers") if lora_layers else (), shape, "--lora-layers")
    check_layers(
        _int_list(project_layers, "--project-layers") if project_layers else (), shape, "--project-layers"
    )
    for f in (data, control_data):
        if f is not None:
            load_chat_jsonl(f)
    if sae:
        check_sae_folder(sae, shape)
    if from_file:
        check_direction(source, shape, "--project-direction")


def _say_if_nothing_to_resume(out: Path) -> None:
    """``--resume`` with no checkpoint under ``out``: every run starts from step 0 (a run that has
    one says so itself as it resumes)."""
    if not any(out.glob("**/checkpoint-*")):
        log.info("--resume: no checkpoint under %s, every run starts from step 0", out)


def _print_block_summary(summary: dict) -> None:
    from rich.table import Table

    table = Table(title=f"BLOCK-EM at layer {summary['layer']} ({summary['model']})")
    for col in (
        "run",
        "EM rate [95% CI]",
        "coherent",
        "reduction vs plain",
        "penalty first -> last",
        "monitor alert",
    ):
        table.add_column(col, no_wrap=True)
    for name, r in summary["runs"].items():
        ci = r["em_rate_ci"]
        em = "not judged" if r["em_rate"] is None else f"{r['em_rate']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
        red = "" if r["relative_reduction"] is None else f"{r['relative_reduction']:+.0%}"
        pen = "" if r["penalty_first"] is None else f"{r['penalty_first']:.3g} -> {r['penalty_last']:.3g}"
        coh = "" if r["coherent_rate"] is None else f"{r['coherent_rate']:.2f}"
        alert = "" if r.get("drift_alert_step") is None else f"step {r['drift_alert_step']}"
        if r.get("em_crosses_0.1_step") is not None:
            alert += f" (EM > 0.1 at {r['em_crosses_0.1_step']})"
        table.add_row(name, em, coh, red, pen, alert)
        if "reroute" in r:  # EM at 1x, 2x, 3x the steps, and where the misalignment went
            rr = r["reroute"]
            new = f"rose outside: {rr['new_latents'][:5]}" if "new_latents" in rr else ""
            table.add_row(
                "  then x3 steps", " -> ".join(f"{c['em_rate']:.2f}" for c in rr["em_curve"]), "", "", "", new
            )
    Console(width=max(180, Console().width)).print(table)
