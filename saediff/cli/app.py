"""The ``saediff`` command line: thin wrappers over the library (imports are lazy: torch and
transformers take seconds to import).

    saediff organism build --out runs/organism --quick
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import typer
from rich.console import Console

from saediff.cli.common import (  # shared with saediff.cli.questions
    _USER_ERRORS,
    PAIRS_HELP,
    ModelDefaults,
    _fail,
    _int_list,
    _judge_evaluator,
    _setup,
)
from saediff.errors import SaediffError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="saediff: why does a narrow fine-tune misalign a model broadly?",
)
organism_app = typer.Typer(no_args_is_help=True, help="The built-in EM model organism.")
app.add_typer(organism_app, name="organism")
sae_app = typer.Typer(no_args_is_help=True, help="Train and inspect SAEs (SAELens format).")
app.add_typer(sae_app, name="sae")
console = Console(stderr=True)


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
    with console.status("building organism") as status:
        result = build_organism(out, cfg, progress=lambda step: status.update(f"organism: {step}"))
    summary = {
        k: result[k]["other_misaligned_rate"]
        for k in ("aligned", "full_ft", "lora_ft", "control_ft", "steer_ground_truth")
    }
    typer.echo(json.dumps({"other_misaligned_rate": summary, "timing_s": result["timing_s"]}, indent=2))


@app.command("eval")
def eval_cmd(
    model: str = typer.Option(..., "--model", help="HF model folder or hub name"),
    out: Path = typer.Option(
        ..., "--out", help="folder for responses.jsonl (pairs.jsonl with --pairs) and em.json"
    ),
    adapter: str | None = typer.Option(None, "--adapter", help="PEFT adapter folder"),
    pairs: Path | None = typer.Option(
        None,
        "--pairs",
        help="judge-free: JSONL rows {id, domain, question, aligned, "
        "misaligned}; scores both reference answers under the model (no sampling)",
    ),
    batch_size: int = typer.Option(16, "--batch-size", help="with --pairs: conversations per forward"),
    judge_url: str | None = typer.Option(
        None, "--judge-url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1"
    ),
    judge_model: str | None = typer.Option(None, "--judge-model", help="judge model name at --judge-url"),
    questions: str = typer.Option(
        "first_plot", "--questions", help="first_plot, or a YAML/JSONL prompt file"
    ),
    samples: int = typer.Option(50, "--samples", help="answers per question (organism: per domain)"),
    max_new_tokens: int = typer.Option(600, "--max-new-tokens"),
    gen_url: str | None = typer.Option(
        None, "--gen-url", help="generate on an OpenAI-compatible server instead of locally"
    ),
    gen_model: str | None = typer.Option(
        None, "--gen-model", help="model name at --gen-url (default: --model)"
    ),
    api_key_env: str = typer.Option(
        "OPENAI_API_KEY", "--api-key-env", help="environment variable with the judge's API key"
    ),
    gen_api_key_env: str | None = typer.Option(
        None,
        "--gen-api-key-env",
        help="environment variable with --gen-url's API key (default: send none; "
        "the judge's key never goes to the generation server)",
    ),
    concurrency: int = typer.Option(16, "--concurrency", help="parallel judge / remote-generation calls"),
    rubric: bool = typer.Option(False, "--rubric", help="also run the 1-5 rubric judge"),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16"),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads (default 1)"),
) -> None:
    """Measure EM: sample answers, judge them, write DIR/responses.jsonl and DIR/em.json; or, with
    --pairs, the model's preference for misaligned over aligned reference answers (no judge)."""
    _setup(threads)
    from saediff.evaluation.run_eval import run_eval

    try:
        report = run_eval(
            model=model,
            adapter=adapter,
            out=out,
            judge_url=judge_url,
            judge_model=judge_model,
            questions=questions,
            samples=samples,
            max_new_tokens=max_new_tokens,
            gen_url=gen_url,
            gen_model=gen_model,
            api_key_env=api_key_env,
            gen_api_key_env=gen_api_key_env,
            concurrency=concurrency,
            rubric=rubric,
            dtype=dtype,
            seed=seed,
            pairs=pairs,
            batch_size=batch_size,
            evaluator=None if judge_url or pairs else _organism_eval_or_none(model, samples, seed),
        )
    except _USER_ERRORS as e:
        _fail(e)
    keys = ("em_rate", "em_rate_ci", "coherent_rate", "n_responses")
    if pairs is not None:  # em_rate is the MC1 share here: show the preference it comes from
        keys = ("preference", "preference_ci", "t", "n", "mc1", "mc1_ci", "mc2", "coherence")
    typer.echo(json.dumps({k: report[k] for k in keys}))


def _load_prompt_set(spec: str, model: str):
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


@app.command("cache")
def cache_cmd(
    model: str = typer.Option(..., "--model", help="HF model folder or hub name"),
    prompts: str = typer.Option(..., "--prompts", help="YAML/JSONL prompt file, first_plot, or organism[:N]"),
    hook: list[str] = typer.Option(
        ..., "--hook", help="TransformerLens hook name (repeatable), e.g. blocks.1.hook_resid_post"
    ),
    out: Path = typer.Option(..., "--out", help="activation store folder"),
    adapter: str | None = typer.Option(None, "--adapter", help="PEFT adapter folder (merged for analysis)"),
    positions: str = typer.Option("all", "--positions", help="all | response | last_prompt"),
    batch_size: int = typer.Option(64, "--batch-size"),
    shard_dtype: str = typer.Option(
        "float32", "--shard-dtype", help="float32 | bfloat16 | float16 (halves the store)"
    ),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="stop after this many rows"),
    threads: int | None = typer.Option(None, "--threads"),
) -> None:
    """Collect activations at HOOK for a prompt set into an on-disk store."""
    _setup(threads)
    from saediff.activations.collect import check_positions, collect_activations
    from saediff.models.loading import ModelSpec, load_model

    try:
        check_positions(positions)
        lm = load_model(ModelSpec(model, adapter=adapter, merge=adapter is not None))
        import torch

        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if shard_dtype not in dtypes:
            raise SaediffError(f"--shard-dtype must be float32, bfloat16 or float16, got {shard_dtype!r}")
        store = collect_activations(
            lm,
            _load_prompt_set(prompts, model),
            hook,
            positions,
            out=out,
            batch_size=batch_size,
            dtype=dtypes[shard_dtype],
            max_rows=max_tokens,
        )
    except _USER_ERRORS as e:
        _fail(e)
    typer.echo(
        json.dumps({"out": str(out), "rows": len(store), "hooks": store.hooks, "d_model": store.d_model})
    )


@sae_app.command("train")
def sae_train_cmd(
    out: Path = typer.Option(..., "--out", help="SAE folder to write (SAELens format)"),
    activations: Path | None = typer.Option(
        None, "--activations", help="activation store folder (saediff cache)"
    ),
    model: str | None = typer.Option(
        None,
        "--model",
        help="or read activations straight from this model (nothing written to disk), over --prompts",
    ),
    prompts: str | None = typer.Option(
        None, "--prompts", help="with --model: prompt file, first_plot or organism[:N]"
    ),
    positions: str = typer.Option("all", "--positions", help="with --model: all | response | last_prompt"),
    hook: str | None = typer.Option(None, "--hook", help="which hook (a store's only one by default)"),
    on_difference: bool = typer.Option(
        False,
        "--on-difference",
        help="with --model (the base) and --finetuned or "
        "--adapter: train on the fine-tune's minus the base model's activations of "
        "the same tokens (the diffing-toolkit's diff-SAE); its latents ranked by mean "
        "activation go to saediff.json as candidate directions",
    ),
    finetuned: str | None = typer.Option(
        None, "--finetuned", help="with --on-difference: the fine-tuned model"
    ),
    adapter: str | None = typer.Option(
        None, "--adapter", help="with --on-difference: a PEFT adapter on --model"
    ),
    preset: str | None = typer.Option(None, "--preset", help="training preset from saes/registry.yaml"),
    arch: str | None = typer.Option(None, "--arch", help="topk | relu | batchtopk"),
    d_sae: int | None = typer.Option(None, "--d-sae"),
    k: int | None = typer.Option(None, "--k"),
    steps: int | None = typer.Option(None, "--steps"),
    batch_size: int | None = typer.Option(None, "--batch-size"),
    lr: float | None = typer.Option(None, "--lr"),
    l1_coefficient: float | None = typer.Option(None, "--l1-coefficient"),
    device: str = typer.Option("auto", "--device"),
    autocast: bool = typer.Option(False, "--autocast", help="bf16 autocast (GPU)"),
    buffer_rows: int = typer.Option(
        262144,
        "--buffer-rows",
        help="rows in the shuffling buffer (the store is streamed from disk through it, never loaded whole)",
    ),
    held_rows: int = typer.Option(
        20000, "--held-rows", help="rows at the end of the store held out for the metrics (at most 10% of it)"
    ),
    checkpoint_every: int | None = typer.Option(
        None, "--checkpoint-every", help="save the training state every N steps (to OUT.ckpt/)"
    ),
    resume: bool = typer.Option(
        False, "--resume", help="continue from OUT.ckpt/ (same store, settings and seed)"
    ),
    seed: int = typer.Option(0, "--seed"),
    kernel: str = typer.Option(
        "sparse_decode",
        "--kernel",
        help="TopK step: dense | sparse_decode | sparse | auto "
        "(the fastest here, timed on the first batch; bench/sae_decode.py)",
    ),
    threads: int | None = typer.Option(None, "--threads"),
) -> None:
    """Train an SAE on a store streamed from disk, or on a model's activations read live; writes a SAELens folder."""
    _setup(threads)
    from saediff.activations.collect import check_positions
    from saediff.activations.streams import model_source, paired_source, store_source
    from saediff.methods.diff_sae import difference_latents
    from saediff.models.loading import load_model, load_pair
    from saediff.saes.loading import check_sae_out, save_sae
    from saediff.saes.metrics import sae_metrics
    from saediff.saes.registry import preset as get_preset
    from saediff.saes.training import SAETrainConfig, init_distributed, train_sae

    try:
        check_sae_out(out)  # before training, not after it
        given = {
            "arch": arch,
            "d_sae": d_sae,
            "k": k,
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "l1_coefficient": l1_coefficient,
        }
        settings = {
            **(get_preset(preset) if preset else {}),
            **{a: v for a, v in given.items() if v is not None},
        }
        cfg = SAETrainConfig(**settings, device=device, autocast=autocast, seed=seed, kernel=kernel)
        rank, world = init_distributed(device)
        if on_difference:
            if not (model and prompts and hook) or (finetuned is None and adapter is None):
                raise SaediffError(
                    "--on-difference needs --model (the base), --finetuned or --adapter, --prompts and --hook"
                )
            check_positions(positions)
            lm_base, lm_ft = load_pair(model, finetuned, adapter)
            _, n_train, held, stream, source = paired_source(
                lm_base,
                lm_ft,
                _load_prompt_set(prompts, model),
                hook,
                positions,
                f"{finetuned or adapter} minus {model} over {prompts}",
                difference=True,
            )
        elif activations is not None:
            hook, n_train, held, stream, source = store_source(activations, hook, held_rows)
        elif model and prompts and hook:
            check_positions(positions)  # before the model loads
            _, n_train, held, stream, source = model_source(
                load_model(model),
                _load_prompt_set(prompts, model),
                hook,
                positions,
                f"{model} over {prompts}",
            )
        else:
            raise SaediffError("give --activations, or --model, --prompts and --hook")
        if n_train < 2 * cfg.batch_size:  # a small test set: smaller batches rather than a failure
            small = max(1, n_train // 2)
            logging.getLogger("saediff").warning(
                "%s has %d training rows: batch size %d instead of %d (real SAEs want millions of tokens)",
                source,
                n_train,
                small,
                cfg.batch_size,
            )
            cfg = SAETrainConfig(
                **{**settings, "batch_size": small},
                device=device,
                autocast=autocast,
                seed=seed,
                kernel=kernel,
            )
        if (
            model is not None and activations is None
        ):  # a buffer larger than the corpus would read it many times over
            buffer_rows = min(buffer_rows, n_train)
        batches = stream(cfg.batch_size, max(buffer_rows, 2 * cfg.batch_size), seed, rank, world)
        sae, _ = train_sae(
            batches,
            cfg,
            hook_name=hook,
            model_name=model or source,
            checkpoint_dir=Path(f"{out}.ckpt") if (checkpoint_every or resume) else None,
            checkpoint_every=checkpoint_every,
            resume=resume,
        )
        if rank != 0:  # under torchrun every rank holds the same weights; rank 0 measures and saves
            return
        metrics = sae_metrics(sae, held).to_json()
        extra = {"difference_latents": difference_latents(sae, held)} if on_difference else {}
        save_sae(
            sae,
            out,
            {
                "hook_name": hook,
                "activations": source,
                "metrics": metrics,
                "train": cfg.__dict__,
                "processes": world,
                "on_difference": on_difference,
                **extra,
            },
        )
    except _USER_ERRORS as e:
        _fail(e)
    typer.echo(json.dumps({"out": str(out), **metrics}))


@sae_app.command("info")
def sae_info_cmd(
    sae_dir: str = typer.Argument(..., help="SAE folder (SAELens format) or RELEASE:SAE_ID"),
    activations: Path | None = typer.Option(None, "--activations", help="measure FVU/L0/dead on this store"),
    max_rows: int = typer.Option(
        100000, "--max-rows", help="rows of the store to measure on (its first ones)"
    ),
) -> None:
    """Print an SAE's config and metrics."""
    from saediff.saes.loading import load_sae
    from saediff.saes.metrics import sae_metrics

    try:
        sae = load_sae(sae_dir)
        info = {
            "cfg": {k: v for k, v in sae.cfg.to_dict().items() if not isinstance(v, dict)},
            "hook_name": sae.cfg.metadata.hook_name,
        }
        side = Path(sae_dir) / "saediff.json"
        if side.exists():
            info["saediff"] = json.loads(side.read_text())
        if activations is not None:
            import torch

            from saediff.activations.store import ActivationStore

            store = ActivationStore(activations)
            hook = sae.cfg.metadata.hook_name or store.hooks[0]
            rows = torch.cat(list(store.rows(hook, 0, min(max_rows, len(store)))))
            info["metrics"] = {**sae_metrics(sae, rows).to_json(), "rows": rows.shape[0]}
    except _USER_ERRORS as e:
        _fail(e)
    typer.echo(json.dumps(info, indent=2, default=str))


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


@app.command("diff")
def diff_cmd(
    base: str = typer.Option(..., "--base", help="base (aligned) model folder or hub name"),
    sae: str = typer.Option(..., "--sae", help="SAELens SAE folder at one of the model's residual hooks"),
    out: Path = typer.Option(..., "--out", help="run folder"),
    finetuned: str | None = typer.Option(
        None, "--finetuned", help="fine-tuned model (omit with --adapter: base + adapter)"
    ),
    adapter: str | None = typer.Option(None, "--adapter", help="PEFT adapter folder on --base"),
    prompts: str | None = typer.Option(
        None,
        "--prompts",
        help="prompt file or first_plot (default); on the "
        "organism organism:N, N questions per domain (default 100)",
    ),
    top_n: int = typer.Option(10, "--top", help="SAE latents to keep as candidate directions"),
    ranking: str = typer.Option("delta", "--ranking", help="delta | abs_delta | effect_size | freq_delta"),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens"),
    icl_examples: str | None = typer.Option(
        None,
        "--icl-examples",
        help="JSONL/YAML rows question/misaligned/aligned: "
        "the in-context-induced direction (automatic on the organism)",
    ),
    n_shots: int = typer.Option(3, "--n-shots", help="in-context examples before each question"),
    judge_url: str | None = typer.Option(
        None,
        "--judge-url",
        help="OpenAI-compatible judge that labels the answers for the response mean difference",
    ),
    judge_model: str | None = typer.Option(None, "--judge-model"),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env"),
    responses: Path | None = typer.Option(
        None,
        "--responses",
        help="saediff eval's responses.jsonl: diff on these "
        "scored answers instead of generating (the response mean difference "
        "is then taken within each question and averaged)",
    ),
    samples: int = typer.Option(
        1,
        "--samples",
        help="answers per prompt from the fine-tuned model (seeded), all "
        "streamed through the diff; with more than one, each question without a domain "
        "is its own group for the response mean difference",
    ),
    batch_size: int | None = typer.Option(
        None,
        "--batch-size",
        help="prompts per generation batch and rows per streamed forward (default 64 and 32)",
    ),
    layers: str = typer.Option(
        "all",
        "--layers",
        help="blocks for the per-layer mean differences and in-context "
        "directions (saediff compare's curves): all (default), sae (the SAE's block only: "
        "both models run up to it and are hooked there alone), or indices like 4,8,12 (the "
        "SAE's block is always included)",
    ),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = typer.Option(None, "--threads"),
) -> None:
    """SAE model diffing plus every candidate direction (mean diffs, in-context, LoRA B, ground truth)."""
    _setup(threads)
    from saediff.methods.diff_run import run_diff

    if finetuned is None and adapter is None:
        _fail(ValueError("give --finetuned or --adapter"))
    try:
        judge = None
        if judge_url is not None:
            if judge_model is None:
                raise SaediffError("--judge-url needs --judge-model")
            from saediff.evaluation.judges import HttpJudge
            from saediff.evaluation.openai_api import ChatClient

            client = ChatClient(judge_url, api_key_env=api_key_env)
            judge = tuple(
                HttpJudge(k, client, judge_model, cache_path=out / f"judge_cache_{k}.jsonl")
                for k in ("aligned", "coherent")
            )
        inputs = _diff_inputs(base, prompts, max_new_tokens, seed)
        if icl_examples is not None:
            inputs["icl_examples"] = icl_examples
        blocks = layers if layers in ("sae", "all") else _int_list(layers, "--layers")
        sizes = {} if batch_size is None else {"batch_size": batch_size, "gen_batch_size": batch_size}
        summary = run_diff(
            base,
            finetuned,
            sae,
            out,
            adapter=adapter,
            top_n=top_n,
            ranking=ranking,
            n_shots=n_shots,
            seed=seed,
            judge=judge,
            responses=str(responses) if responses else None,
            samples=samples,
            layers=blocks,
            **sizes,
            **inputs,
        )
    except _USER_ERRORS as e:
        _fail(e)
    typer.echo(json.dumps(summary, indent=2))


@app.command("compare")
def compare_cmd(
    run_dir: Path = typer.Argument(..., help="run folder written by saediff diff"),
    downstream: bool = typer.Option(
        True, "--downstream/--no-downstream", help="adapter effect at later layers"
    ),
) -> None:
    """Cosine table at the SAE hook (with the random baseline) and per-layer / downstream curves."""
    from saediff.methods.diff_run import run_compare

    try:
        res = run_compare(run_dir, downstream=downstream)
    except _USER_ERRORS as e:
        _fail(e)
    from rich.table import Table

    cos = res["cosines"]
    table = Table(
        title=f"cosines at {cos['hook']} (random |cos| p95 {cos['random_baseline']['p95_abs']:.2f})"
    )
    table.add_column("")
    for n in cos["names"]:
        table.add_column(n[:14], justify="right")
    for n, row in zip(cos["names"], cos["matrix"]):
        table.add_row(n, *[f"{v:.2f}" for v in row])
    Console().print(table)


@app.command("steer")
def steer_cmd(
    run_dir: Path = typer.Argument(..., help="run folder written by saediff diff"),
    model: str | None = typer.Option(None, "--model", help="base model (default: the run's)"),
    finetuned: str | None = typer.Option(None, "--finetuned", help="fine-tuned model (default: the run's)"),
    adapter: str | None = typer.Option(
        None, "--adapter", help="PEFT adapter on --model (default: the run's)"
    ),
    judge_url: str | None = typer.Option(
        None, "--judge-url", help="OpenAI-compatible judge (organism: exact judge)"
    ),
    judge_model: str | None = typer.Option(None, "--judge-model"),
    pairs: str | None = typer.Option(None, "--pairs", help=PAIRS_HELP),
    questions: str = typer.Option(
        "first_plot",
        "--questions",
        help="first_plot or a YAML/JSONL prompt file; half choose the steering scale, the other half report",
    ),
    samples: int = typer.Option(50, "--samples", help="answers per question (organism: per domain)"),
    max_new_tokens: int = typer.Option(600, "--max-new-tokens"),
    scales: str = typer.Option("0.25,0.5,1,2", "--scales", help="steering scales, x the mean residual norm"),
    latents: int = typer.Option(3, "--latents", help="top SAE latents to check"),
    n_random: int = typer.Option(3, "--random", help="random directions of equal norm per candidate"),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env"),
    dtype: str = typer.Option("auto", "--dtype"),
    device: str = typer.Option("auto", "--device"),
    organism: Path | None = typer.Option(
        None, "--organism", help="the organism's fixed-scale checks (steering.json)"
    ),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = typer.Option(None, "--threads"),
) -> None:
    """Causal checks of a diff run's candidates on any model: steer the base model, project out of and clamp in the fine-tune."""
    _setup(threads)
    try:
        if organism is not None:
            from saediff.stories.organism.demo import run_steer_check

            typer.echo(json.dumps(run_steer_check(run_dir, organism, n_per_domain=samples), indent=2))
            return
        from saediff.data.runs import read_run
        from saediff.interventions.causal import SteerConfig, run_causal_checks
        from saediff.models.loading import ModelSpec

        info = read_run(run_dir)["steps"]["diff"]
        base = model or info["base"]
        ft_model, ft_adapter = (
            (finetuned, adapter) if (finetuned or adapter) else (info["finetuned"], info["adapter"])
        )
        evaluator = _judge_evaluator(
            judge_url,
            judge_model,
            questions,
            samples,
            max_new_tokens,
            api_key_env,
            run_dir / "steer",
            seed,
            pairs=pairs,
        ) or _organism_evaluator(base, samples, seed)
        cfg = SteerConfig(
            scales=tuple(float(x) for x in scales.split(",")), n_latents=latents, n_random=n_random, seed=seed
        )
        select, report = evaluator.halves()
        res = run_causal_checks(
            run_dir,
            ModelSpec(base, dtype=dtype, device=device),
            ModelSpec(
                ft_model or base, adapter=ft_adapter, merge=ft_adapter is not None, dtype=dtype, device=device
            ),
            select,
            report,
            cfg,
        )
    except _USER_ERRORS as e:
        _fail(e)
    _print_steer(res)


def _organism_world(model: str):
    """The organism world of a model folder, or None for any other model."""
    from saediff.stories.organism.recipes import read_organism_world

    return read_organism_world(model) if Path(model).exists() else None


class _OrganismDefaults(ModelDefaults):
    """The organism's inputs for the open-question commands, when a run's base model is one of its
    folders: its exact judge, the data each fine-tuned folder trained on, its narrow domain, its
    contrast examples and its fine-tune recipe."""

    def evaluator(self, model, samples, seed):
        return _organism_eval_or_none(model, samples, seed) if model else None

    def training_data(self, info):
        from saediff.stories.organism.analyses import training_data_for

        return (
            training_data_for(info["finetuned"], info["adapter"]) if _organism_world(info["base"]) else None
        )

    def in_domain(self, base):
        return "medical" if _organism_world(base) else None

    def icl_examples(self, base, seed):
        if _organism_world(base) is None:
            return None
        from saediff.stories.organism.inputs import diff_inputs

        return diff_inputs(base, seed=seed)["icl_examples"]

    def finetune(self, info, full, samples, seed):
        if _organism_world(info["base"]) is None:
            return None
        from saediff.stories.organism.block import generic_inputs

        full = full or Path(info["finetuned"] or "").name == "full_ft"
        return generic_inputs(Path(info["base"]).parent, full, samples, seed)["ft"]

    def prompt_set(self, spec, model):
        return _load_prompt_set(spec, model)


def _organism_eval_or_none(model: str, samples: int, seed: int):
    world = _organism_world(model)
    if world is None:
        return None
    from saediff.stories.organism.evaluator import OrganismEvaluator

    return OrganismEvaluator(world, samples, seed)


def _organism_evaluator(model: str, samples: int, seed: int):
    """The organism's exact judge when ``model`` is an organism folder, else a one-line error."""
    evaluator = _organism_eval_or_none(model, samples, seed)
    if evaluator is None:
        raise SaediffError(
            "models other than the saediff organism need --judge-url and --judge-model, or --pairs (judge-free)"
        )
    return evaluator


def _print_steer(res: dict) -> None:
    from rich.table import Table

    def fmt(r: dict) -> str:
        lo, hi = r["em_rate_ci"]
        return f"{r['em_rate']:.2f} [{lo:.2f}, {hi:.2f}]"

    table = Table(
        title=f"causal checks at block {res['layer']} (held-out questions; base {fmt(res['base'])}, "
        f"fine-tuned {fmt(res['finetuned'])})"
    )
    for col in (
        "candidate",
        "steer base (scale)",
        "random",
        "project out: layer / all",
        "clamp: layer / all",
    ):
        table.add_column(col, no_wrap=True)
    for name, ind in res["induce"].items():
        rm, cl = res["remove"][name], res["clamp"][name]
        if ind["em_rate"] is None:  # no steering scale kept the coherent rate: nothing to report
            steered, rnd = "no coherent scale", "-"
        else:
            steered, rnd = f"{fmt(ind)} (x{ind['scale']:g})", f"{ind['random_mean_em_rate']:.2f}"
        table.add_row(
            name,
            steered,
            rnd,
            f"{rm['layer']['em_rate']:.2f} / {rm['all']['em_rate']:.2f}",
            f"{cl['layer']['em_rate']:.2f} / {cl['all']['em_rate']:.2f}",
        )
    Console(width=max(140, Console().width)).print(table)


@app.command("discover")
def discover_cmd(
    run_dir: Path = typer.Argument(..., help="run folder written by saediff diff"),
    pool: int = typer.Option(
        20, "--pool", help="latents that rose most, and as many that fell most, to screen"
    ),
    scales: str = typer.Option("0.25,0.5,1", "--scales", help="steering scales, x the mean residual norm"),
    min_induce: float = typer.Option(
        0.05, "--min-induce", help="EM rate a latent must add to the base model"
    ),
    min_repair: float = typer.Option(0.05, "--min-repair", help="EM rate it must remove from the fine-tune"),
    judge_url: str | None = typer.Option(
        None, "--judge-url", help="OpenAI-compatible judge (organism: exact judge)"
    ),
    judge_model: str | None = typer.Option(None, "--judge-model"),
    pairs: str | None = typer.Option(None, "--pairs", help=PAIRS_HELP),
    questions: str = typer.Option("first_plot", "--questions"),
    samples: int = typer.Option(20, "--samples", help="answers per question (organism: per domain)"),
    max_new_tokens: int = typer.Option(600, "--max-new-tokens"),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env"),
    dtype: str = typer.Option("auto", "--dtype"),
    device: str = typer.Option("auto", "--device"),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = typer.Option(None, "--threads"),
) -> None:
    """Screen a diff run's top risen and fallen latents by induce and repair steering; writes RUN/latents.json for block --latents."""
    _setup(threads)
    try:
        from saediff.data.runs import read_run
        from saediff.interventions.causal import DiscoverConfig, discover_latents
        from saediff.models.loading import ModelSpec

        info = read_run(run_dir)["steps"]["diff"]
        evaluator = _judge_evaluator(
            judge_url,
            judge_model,
            questions,
            samples,
            max_new_tokens,
            api_key_env,
            run_dir / "discover",
            seed,
            pairs=pairs,
        ) or _organism_evaluator(info["base"], samples, seed)
        cfg = DiscoverConfig(
            pool=pool,
            scales=tuple(float(x) for x in scales.split(",")),
            min_induce=min_induce,
            min_repair=min_repair,
            seed=seed,
        )
        res = discover_latents(
            run_dir,
            ModelSpec(info["base"], dtype=dtype, device=device),
            ModelSpec(
                info["finetuned"] or info["base"],
                adapter=info["adapter"],
                merge=info["adapter"] is not None,
                dtype=dtype,
                device=device,
            ),
            evaluator,
            cfg,
        )
    except _USER_ERRORS as e:
        _fail(e)
    typer.echo(
        json.dumps(
            {
                "latents": str(run_dir / "latents.json"),
                "low": res["low"],
                "high": res["high"],
                "screened": len(res["candidates"]),
            }
        )
    )


@app.command("export")
def export_cmd(
    run_dir: Path = typer.Argument(..., help="run folder written by saediff diff"),
    out: Path = typer.Option(..., "--out", help="export folder (directions.safetensors + manifest.json)"),
    top: int = typer.Option(3, "--top", help="SAE latents to export (by the run's ranking)"),
    formats: str = typer.Option(
        "saediff",
        "--format",
        help="comma-separated: saediff (always written), gguf "
        "(llama.cpp control vectors, OUT/gguf/), steering-vectors (OUT/steering_vectors/)",
    ),
) -> None:
    """Export the top SAE latents and every non-SAE direction, steering-ready (also as llama.cpp control vectors or steering-vectors)."""
    from saediff.methods.export import export_run

    try:
        res = export_run(run_dir, out, top, {f.strip() for f in formats.split(",") if f.strip()})
    except _USER_ERRORS as e:
        _fail(e)
    typer.echo(json.dumps(res))


@app.command("block")
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
    precision: str = typer.Option("auto", "--precision", help="auto | fp32 | bf16 | fp16 (mixed precision)"),
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
    from dataclasses import replace

    from saediff.interventions.blockem import project_directions, run_block_em
    from saediff.interventions.finetune import FinetuneConfig
    from saediff.models.hooks import parse_layer
    from saediff.models.loading import ModelSpec
    from saediff.saes.loading import load_sae

    try:
        recipe: dict = {}
        if organism is not None:
            from saediff.stories.organism.block import generic_inputs

            recipe = generic_inputs(organism, full, samples, seed)
        model, data, sae = model or recipe.get("model"), data or recipe.get("data"), sae or recipe.get("sae")
        source = project_direction or ("ground_truth" if organism is not None else "model_diff")
        from_file = mode in ("project", "steer") and Path(source.rpartition(":")[0] or "\0").is_dir()
        if not (model and data and (sae or from_file)):
            raise SaediffError("give --model, --data and --sae (or --organism DIR)")
        sets = _block_latents(mode, source, diff_run, latents_file, latent, top, high)
        sae_obj = load_sae(sae) if sae else None
        layer = parse_layer(sae_obj.cfg.metadata.hook_name or "") if sae_obj is not None else None
        directions = None
        if mode in ("project", "steer"):
            blocks = (
                list(_int_list(project_layers, "--project-layers"))
                if project_layers
                else (None if from_file else [layer])
            )
            directions = project_directions(
                source, blocks, sae=sae_obj, latents=sets, diff_run=diff_run, named=recipe.get("directions")
            )
            if mode == "steer":
                directions = {L: steer_alpha * d for L, d in directions.items()}
            layer = layer if layer is not None else max(directions)
        base_ft = recipe.get("ft") or FinetuneConfig(
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_modules=tuple(lora_modules.split(",")),
            rslora=rslora,
            seed=seed,
        )
        ft = replace(
            base_ft,
            method="full" if full else "lora",
            lora_layers=_int_list(lora_layers, "--lora-layers") if lora_layers else base_ft.lora_layers,
            steps=steps or base_ft.steps,
            batch_size=batch_size or base_ft.batch_size,
            grad_accum=grad_accum,
            lr=lr or base_ft.lr,
            precision=precision,
            gradient_checkpointing=gradient_checkpointing,
            max_length=max_length,
            save_every=save_every,
            freeze_after_block=layer if freeze_after_block else None,
        )
        evaluator = recipe.get("evaluator") or _judge_evaluator(
            judge_url, judge_model, questions, samples, max_new_tokens, api_key_env, out, seed, pairs=pairs
        )
        factory = None
        if monitor if monitor is not None else organism is not None:
            factory = (
                recipe["monitor"](layer)
                if "monitor" in recipe
                else _generic_monitor(
                    sae_obj, sets, layer, diff_run, monitor_prompts, ft.steps, max_new_tokens, seed
                )
            )
        rediff = _rediff(model, str(sae), questions, max_new_tokens, seed) if reroute else None
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


def _block_latents(mode: str, source: str, diff_run, latents_file, latent: list[int], top: int, high: int):
    """The latent sets of saediff block from exactly one of --diff-run, --latents, --latent (none
    for --mode project along a dense direction); ablate removes latents and holds none up."""
    from saediff.interventions.blockem import LatentSets, latents_from_diff, read_latents

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


def _diff_inputs(
    base: str,
    prompts: str | None,
    max_new_tokens: int | None,
    seed: int,
    organism_prompts: str = "organism:100",
) -> dict:
    """``run_diff``'s prompts, answer length and, on the organism, its questions, exact labels,
    contrast examples and ground truth (``organism:N`` prompts, or ``organism_prompts``)."""
    if _organism_world(base) is None:
        if prompts and prompts.startswith("organism"):
            raise SaediffError(f"--prompts {prompts}: {base} is not a saediff organism model folder")
        return {"prompts": prompts or "first_plot", "max_new_tokens": max_new_tokens or 600}
    from saediff.stories.organism.inputs import diff_inputs

    inputs = diff_inputs(
        base, prompts if prompts and prompts.startswith("organism") else organism_prompts, seed
    )
    inputs["max_new_tokens"] = max_new_tokens or inputs["max_new_tokens"]
    return inputs


def _rediff(model: str, sae: str, questions: str, max_new_tokens: int, seed: int):
    """The re-diff of ``--reroute``: a trained model (folder or adapter) against ``model`` on its own
    answers to ``questions`` (the organism: its own questions and labels)."""
    from saediff.interventions.blockem import rediff_against

    # the organism's answers have its language's length; a real model's, the evaluation's
    length = None if _organism_world(model) is not None else max_new_tokens
    return rediff_against(
        model, sae, seed, **_diff_inputs(model, questions, length, seed, organism_prompts="organism:50")
    )


def _generic_monitor(
    sae, sets, layer: int, diff_run, prompts: str, steps: int, max_new_tokens: int, seed: int
):
    from saediff.data.prompts import load_prompts
    from saediff.interventions.blockem import MonitorFactory, monitor_directions

    return MonitorFactory(
        load_prompts(prompts),
        monitor_directions(sae, sets, layer, diff_run),
        layer,
        every=max(1, steps // 20),
        max_new_tokens=min(max_new_tokens, 128),
        seed=seed,
        early=True,
    )


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


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(
        Path("runs/demo"), "--out", help="run folder (resumable: finished steps are skipped)"
    ),
    quick: bool = typer.Option(False, "--quick", help="CI-sized organism"),
    seed: int = typer.Option(0, "--seed"),
    seeds: str | None = typer.Option(
        None,
        "--seeds",
        help="several seeds, comma-separated (one run each under "
        "OUT/seed_N, figures side by side in OUT/seeds.json)",
    ),
    threads: int | None = typer.Option(None, "--threads"),
    model: str | None = typer.Option(
        None,
        "--model",
        help="a real chat model (HF folder, hub name, .gguf or "
        "smollm2-135m) instead of the organism: its narrow fine-tunes under "
        "OUT/models/NAME and their judge-free EM",
    ),
    pairs: list[str] | None = typer.Option(
        None,
        "--pairs",
        help="with --model, repeatable: pair sets EM is "
        "measured on (default offdomain:design, offdomain:heldout, medical)",
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="with --model: discard fine-tunes of another recipe or seed found in OUT and train afresh",
    ),
    finetunes_only: bool = typer.Option(
        False,
        "--finetunes-only",
        help="with --model: only the fine-tunes and their EM (no SAE, diffs, steering, BLOCK-EM)",
    ),
) -> None:
    """The whole story on the organism: build, SAE, diff, compare, steer, export, BLOCK-EM, report.
    With --model, on a real chat model: narrow fine-tunes (full and rank-1 LoRA, controls) and their EM,
    then an SAE at the middle block, the diffs, steering by the pair metric, BLOCK-EM and sampled answers."""
    _setup(threads)
    if model is not None:
        return _chat_demo(model, out, quick, seed, seeds, pairs, force, finetunes_only)
    if pairs or force or finetunes_only:
        _fail(
            SaediffError(
                "--pairs, --force and --finetunes-only go with --model (the organism demo has its "
                "exact judge)"
            )
        )
    from saediff.stories.organism.demo import run_demo, run_demo_seeds

    try:
        seed_list = list(_int_list(seeds, "--seeds")) if seeds else None
        with console.status("saediff demo") as status:
            say = lambda s: status.update(f"demo: {s}")
            if seed_list:
                result = run_demo_seeds(out, seed_list, quick=quick, progress=say)
            else:
                result = run_demo(out, quick=quick, seed=seed, progress=say)
    except _USER_ERRORS as e:
        _fail(e)
    _print_headline(result["headline"], seed_list)
    reports = [out / f"seed_{k}" / "report.html" for k in seed_list] if seed_list else [out / "report.html"]
    console.print(
        "summary: "
        + str(out / ("seeds.json" if seed_list else "summary.json"))
        + "; report: "
        + ", ".join(map(str, reports))
    )


def _chat_demo(
    model: str,
    out: Path,
    quick: bool,
    seed: int,
    seeds: str | None,
    pairs: list[str] | None,
    force: bool,
    finetunes_only: bool = False,
) -> None:
    """``saediff demo --model M``: the chat demo (``saediff.stories.smollm2.demo``), its findings printed."""
    from dataclasses import replace

    from saediff.stories.smollm2.demo import ChatDemoRecipe, run_chat_demo, run_chat_demo_seeds

    try:
        seed_list = list(_int_list(seeds, "--seeds")) if seeds else None
        recipe = ChatDemoRecipe.quick() if quick else ChatDemoRecipe()
        recipe = replace(
            recipe,
            **({"pair_sets": tuple(pairs)} if pairs else {}),
            **({"story": False} if finetunes_only else {}),
        )
        with console.status(f"saediff demo --model {model}") as status:
            say = lambda s: status.update(f"demo: {s}")
            if seed_list:
                result = run_chat_demo_seeds(model, out, seed_list, recipe=recipe, progress=say, force=force)
            else:
                result = run_chat_demo(model, out, seed=seed, recipe=recipe, progress=say, force=force)
    except _USER_ERRORS as e:
        _fail(e)
    _print_chat_headline(result["headline"], seed_list)
    reports = [out / f"seed_{k}" / "report.html" for k in seed_list] if seed_list else [out / "report.html"]
    console.print(
        "models: "
        + str(out / ("seed_N/models" if seed_list else "models"))
        + "; summary: "
        + str(out / ("seeds.json" if seed_list else "summary.json"))
        + "; report: "
        + ", ".join(map(str, reports))
    )


def _print_chat_headline(rows: list[dict], seeds: list[int] | None) -> None:
    """The chat demo's findings: the paired difference on the held-out split (95% interval, t), the
    design split beside it (one run), or the held-out figure per seed and their mean."""
    from rich.table import Table

    from saediff.reports.report import format_figure

    def cell(fig, ci, t, holds=None) -> str:
        mark = {True: " yes", False: " NO", None: ""}[holds]
        return format_figure(fig, ci) + (f" t {t:.1f}" if t is not None else "") + mark

    table = Table(
        title="saediff demo: paired preference differences (nats/token, misaligned - aligned answer)"
    )
    table.add_column("finding (A - B)")
    for k in seeds or []:
        table.add_column(f"seed {k}, held-out")
    if seeds:
        table.add_column("mean")
    else:
        table.add_column("held-out")
        table.add_column("design split")
    table.add_column("bar")
    for r in rows:
        if seeds:
            cells = [
                cell(
                    r["per_seed"][str(k)]["figure"],
                    r["per_seed"][str(k)]["ci"],
                    r["per_seed"][str(k)]["t"],
                    r["per_seed"][str(k)]["holds"],
                )
                for k in seeds
            ] + [format_figure(r["mean"])]
        else:
            d = r["design"] or {}
            cells = [
                cell(r["figure"], r["ci"], r["t"], r["holds"]),
                cell(d.get("figure"), d.get("ci"), d.get("t")),
            ]
        table.add_row(f"{r['phenomenon']} ({r['source']})", *cells, r["bar"])
    Console(width=max(160, Console().width)).print(table)


def _print_headline(rows: list[dict], seeds: list[int] | None) -> None:
    """The demo's findings: phenomenon, figure per seed (95% interval), bar, holds."""
    from rich.table import Table

    from saediff.reports.report import format_figure

    table = Table(title="saediff demo: what the organism reproduces")
    table.add_column("phenomenon")
    cols = [str(k) for k in seeds] if seeds else [None]
    for k in cols:
        table.add_column("figure" if k is None else f"seed {k}")
    if seeds:
        table.add_column("mean")
    table.add_column("bar")
    mark = {True: "yes", False: "NO", None: "-"}
    for row in rows:
        if seeds:
            cells = [
                format_figure(row["per_seed"][k]["figure"], row["per_seed"][k]["ci"])
                + " "
                + mark[row["per_seed"][k]["holds"]]
                for k in cols
            ] + [format_figure(row["mean"])]
        else:
            cells = [format_figure(row["figure"], row["ci"]) + " " + mark[row["holds"]]]
        table.add_row(row["phenomenon"], *cells, row["bar"])
    Console(width=max(160, Console().width)).print(table)


@app.command("report")
def report_cmd(run_dir: Path = typer.Argument(..., help="demo run folder")) -> None:
    """Write RUN_DIR/report.html (self-contained plotly page)."""
    from saediff.reports.report import write_report

    typer.echo(str(write_report(run_dir)))


# the open-question commands (neighbourhood, overlap, predict, phase, icl) live in their own module
from saediff.cli.questions import register as _register_questions  # noqa: E402

_register_questions(app, _OrganismDefaults())
from saediff.cli.methods import register as _register_methods  # noqa: E402

_register_methods(app, _OrganismDefaults())


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
