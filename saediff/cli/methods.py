"""``saediff crosscoder train / diff``: the diffing-toolkit's and persona vectors' methods as
commands on any base model and its fine-tune (``register`` adds them to the main app; thin
wrappers over the library).

    saediff crosscoder train --base M --adapter A --prompts data.jsonl --hook blocks.15.hook_resid_post --out CC
    saediff crosscoder diff CC --base M --adapter A --prompts data.jsonl --out RUN
    saediff adl --base M --adapter A --prompts data.jsonl --pairs offdomain --out RUN
    saediff flag --model M --data train.jsonl --direction RUN/directions:mean_diff_responses_L15 --out FLAG
    saediff head-to-head RUN --prompts data.jsonl --pairs offdomain:heldout --out H2H
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from saediff.cli.common import (
    _USER_ERRORS,
    PAIRS_HELP,
    ModelDefaults,
    _fail,
    _int_list,
    _judge_evaluator,
    _setup,
)
from saediff.errors import SaediffError

_defaults = ModelDefaults()
crosscoder_app = typer.Typer(
    no_args_is_help=True, help="Crosscoders over a base model and its fine-tune (BatchTopK, latent scaling)."
)

_BASE = typer.Option(..., "--base", help="base (aligned) model folder, hub name or GGUF")
_FT = typer.Option(None, "--finetuned", help="fine-tuned model (or --adapter)")
_ADAPTER = typer.Option(None, "--adapter", help="PEFT adapter folder on --base")
_PROMPTS = typer.Option(
    ...,
    "--prompts",
    help="prompt file (chat JSONL; rows with an answer are read teacher-forced), "
    "first_plot, or organism[:N] on the organism",
)
_POSITIONS = typer.Option("response", "--positions", help="all | response | last_prompt: the tokens read")


def _need_ft(finetuned, adapter) -> None:
    if finetuned is None and adapter is None:
        raise SaediffError("give --finetuned or --adapter")


@crosscoder_app.command("train")
def crosscoder_train_cmd(
    base: str = _BASE,
    finetuned: str | None = _FT,
    adapter: str | None = _ADAPTER,
    prompts: str = _PROMPTS,
    hook: str = typer.Option(
        ..., "--hook", help="residual hook read in both models, e.g. blocks.15.hook_resid_post"
    ),
    out: Path = typer.Option(
        ..., "--out", help="crosscoder folder to write (cfg.json + crosscoder.safetensors)"
    ),
    positions: str = _POSITIONS,
    d_sae: int = typer.Option(
        1024, "--d-sae", help="latents (the diffing-toolkit's EM crosscoder: 32 x d_model)"
    ),
    k: int = typer.Option(32, "--k", help="active latents per token at the end (BatchTopK)"),
    k_start: int | None = typer.Option(None, "--k-start", help="anneal k down from this value"),
    anneal_steps: int = typer.Option(0, "--anneal-steps", help="steps over which k anneals to --k"),
    steps: int = typer.Option(3000, "--steps"),
    batch_size: int = typer.Option(1024, "--batch-size"),
    lr: float = typer.Option(1e-3, "--lr"),
    buffer_rows: int = typer.Option(65536, "--buffer-rows", help="rows in the shuffling buffer"),
    device: str = typer.Option("auto", "--device"),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = typer.Option(None, "--threads"),
) -> None:
    """Train a BatchTopK crosscoder on a base model and its fine-tune, read live on the same tokens."""
    _setup(threads)
    from saediff.activations.collect import check_positions
    from saediff.saes.crosscoder import CrosscoderConfig, crosscoder_from_models

    try:
        _need_ft(finetuned, adapter)
        check_positions(positions)
        cfg = CrosscoderConfig(
            d_sae=d_sae,
            k=k,
            k_start=k_start,
            anneal_steps=anneal_steps,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            device=device,
            seed=seed,
        )
        res = crosscoder_from_models(
            base,
            out,
            cfg,
            _defaults.prompt_set(prompts, base),
            hook,
            finetuned=finetuned,
            adapter=adapter,
            positions=positions,
            buffer_rows=buffer_rows,
            prompts_name=prompts,
        )
    except _USER_ERRORS as e:
        _fail(e)
    typer.echo(json.dumps(res, indent=2))


@crosscoder_app.command("diff")
def crosscoder_diff_cmd(
    crosscoder: Path = typer.Argument(..., help="crosscoder folder (saediff crosscoder train --out)"),
    base: str = _BASE,
    finetuned: str | None = _FT,
    adapter: str | None = _ADAPTER,
    prompts: str = _PROMPTS,
    out: Path = typer.Option(..., "--out", help="run folder: crosscoder_diff.json, cards.json, directions/"),
    positions: str = _POSITIONS,
    top: int = typer.Option(10, "--top", help="fine-tune-only latents to card and export as directions"),
    threads: int | None = typer.Option(None, "--threads"),
) -> None:
    """The crosscoder's latents: fine-tune-only, base-only and shared, with decoder-norm ratios and latent scaling."""
    _setup(threads)
    from saediff.activations.collect import check_positions
    from saediff.methods.crosscoder import run_crosscoder_diff

    try:
        _need_ft(finetuned, adapter)
        check_positions(positions)
        res = run_crosscoder_diff(
            crosscoder,
            base,
            out,
            _defaults.prompt_set(prompts, base),
            finetuned=finetuned,
            adapter=adapter,
            positions=positions,
            top=top,
            prompts_name=prompts,
        )
    except _USER_ERRORS as e:
        _fail(e)
    _print_crosscoder(out)
    typer.echo(json.dumps(res, indent=2))


def _print_crosscoder(out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    data = json.loads((out / "crosscoder_diff.json").read_text())
    by = {r["latent"]: r for r in data["latents"]}
    t = Table(title=f"fine-tune-only latents ({data['summary']['classes']})")
    for col in ("latent", "rel_norm", "freq", "nu_r", "nu_eps", "cosine"):
        t.add_column(col)
    fmt = lambda v: "n/a" if v is None else f"{v:.3g}"
    for j in data["summary"]["ft_only_ranked"]:
        r = by[j]
        t.add_row(str(j), *(fmt(r[c]) for c in ("rel_norm", "freq", "nu_r", "nu_eps", "cosine")))
    Console(stderr=True).print(t)


def adl_cmd(
    base: str = _BASE,
    finetuned: str | None = _FT,
    adapter: str | None = _ADAPTER,
    prompts: str = typer.Option(
        ...,
        "--prompts",
        help="prompts whose first answer tokens are read: a chat JSONL "
        "with answers (teacher-forced), first_plot (the generation prompt's last tokens), or "
        "organism[:N]",
    ),
    out: Path = typer.Option(..., "--out", help="run folder: adl.json, directions/, adl_steer.json, steer/"),
    k: int = typer.Option(5, "--k", help="answer positions read"),
    layers: str | None = typer.Option(None, "--layers", help="blocks to read, e.g. 4,8,12 (default all)"),
    steer_layer: int | None = typer.Option(
        None, "--steer-layer", help="block steered with (default the middle one)"
    ),
    pairs: str | None = typer.Option(None, "--pairs", help=PAIRS_HELP),
    judge_url: str | None = typer.Option(
        None, "--judge-url", help="OpenAI-compatible judge for sampled answers"
    ),
    judge_model: str | None = typer.Option(None, "--judge-model"),
    questions: str = typer.Option(
        "first_plot", "--questions", help="with --judge-url: questions, halved into select and report"
    ),
    samples: int = typer.Option(20, "--samples", help="with --judge-url: answers per question"),
    max_new_tokens: int = typer.Option(200, "--max-new-tokens"),
    scales: str = typer.Option(
        "0.25,0.5,1,2", "--scales", help="steering scales, x the base residual norm there"
    ),
    n_random: int = typer.Option(3, "--random", help="random directions of equal norm"),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env"),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = typer.Option(None, "--threads"),
) -> None:
    """Activation difference lens: the fine-tune's mean shift on the first answer tokens, its logit-lens tokens, a steering check."""
    _setup(threads)
    from functools import partial

    from saediff.interventions.causal import steer_check
    from saediff.methods.adl import ADLConfig, run_adl

    try:
        _need_ft(finetuned, adapter)
        cfg = ADLConfig(
            k=k,
            layers=_int_list(layers, "--layers") if layers else None,
            steer_layer=steer_layer,
            scales=tuple(float(x) for x in scales.split(",")),
            n_random=n_random,
            seed=seed,
        )
        evaluator = _judge_evaluator(
            judge_url,
            judge_model,
            questions,
            samples,
            max_new_tokens,
            api_key_env,
            out / "steer",
            seed,
            pairs=pairs,
        ) or _defaults.evaluator(base, samples, seed)
        check = (
            None
            if evaluator is None
            else partial(
                steer_check,
                evaluator=evaluator,
                json_name="adl_steer.json",
                scales=cfg.scales,
                n_random=cfg.n_random,
                coherence_budget=cfg.coherence_budget,
                seed=cfg.seed,
            )
        )
        res = run_adl(
            base,
            out,
            _defaults.prompt_set(prompts, base),
            cfg,
            finetuned=finetuned,
            adapter=adapter,
            check=check,
            prompts_name=prompts,
        )
    except _USER_ERRORS as e:
        _fail(e)
    _print_adl(res)
    typer.echo(
        json.dumps({key: v for key, v in res.items() if key not in ("layers", "provenance")}, indent=2)
    )


def _print_adl(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"ADL: mean fine-tune - base shift on the first {res['k']} answer tokens")
    for col in ("block", "|shift| / |resid|", "promoted (logit lens)"):
        t.add_column(col)
    for L, row in res["layers"].items():
        t.add_row(
            L,
            f"{row['relative_norm']:.3f}",
            " ".join(repr(tok) for tok, _ in row["logit_lens"]["mean"]["promoted"][:6]),
        )
    Console(stderr=True).print(t)


def flag_cmd(
    model: str = typer.Option(..., "--model", help="the base model, before fine-tuning"),
    data: Path = typer.Option(
        ..., "--data", help="the training file (chat JSONL rows ending in an assistant answer)"
    ),
    direction: str = typer.Option(
        ...,
        "--direction",
        help="FOLDER:NAME: a trait direction of an export folder "
        "(a diff run's directions/, saediff adl's, a persona vector)",
    ),
    out: Path = typer.Option(
        ..., "--out", help="folder: flag.jsonl, flag.json, base_answers.jsonl, screened.jsonl"
    ),
    drop_fraction: float | None = typer.Option(
        None,
        "--drop-fraction",
        help="write screened.jsonl without the "
        "highest-scoring rows and random_dropped.jsonl without as many "
        "random ones",
    ),
    finetune: bool = typer.Option(
        False, "--finetune", help="with --drop-fraction: fine-tune on both and compare EM"
    ),
    max_new_tokens: int = typer.Option(
        200, "--max-new-tokens", help="length of the base model's own answers"
    ),
    n_random: int = typer.Option(3, "--random", help="random directions scored beside it"),
    pairs: str | None = typer.Option(None, "--pairs", help=PAIRS_HELP),
    judge_url: str | None = typer.Option(None, "--judge-url"),
    judge_model: str | None = typer.Option(None, "--judge-model"),
    questions: str = typer.Option("first_plot", "--questions"),
    samples: int = typer.Option(20, "--samples"),
    full: bool = typer.Option(False, "--full", help="--finetune: full fine-tune instead of a rank-1 LoRA"),
    steps: int = typer.Option(300, "--steps", help="--finetune: optimizer steps"),
    lr: float | None = typer.Option(None, "--lr", help="--finetune: learning rate"),
    batch_size: int = typer.Option(
        16, "--batch-size", help="generation batch; --finetune: sequences per step"
    ),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env"),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = typer.Option(None, "--threads"),
) -> None:
    """Persona-vector data flagging: each training row's projection difference along a trait direction, beside random ones."""
    _setup(threads)
    from saediff.methods.persona import flag_rows

    try:
        if finetune and drop_fraction is None:
            raise SaediffError("--finetune compares screened data with random dropping: give --drop-fraction")
        evaluator = None
        if finetune:
            evaluator = _judge_evaluator(
                judge_url,
                judge_model,
                questions,
                samples,
                max_new_tokens,
                api_key_env,
                out / "screen",
                seed,
                pairs=pairs,
            ) or _defaults.evaluator(model, samples, seed)
            if evaluator is None:
                raise SaediffError("--finetune measures EM: give --pairs, or --judge-url and --judge-model")
        res = flag_rows(
            model,
            data,
            direction,
            out,
            drop_fraction=drop_fraction,
            max_new_tokens=max_new_tokens,
            n_random=n_random,
            batch_size=batch_size,
            seed=seed,
        )
        if finetune:
            from saediff.analyses.neighbourhood import screen_finetunes
            from saediff.interventions.finetune import FinetuneConfig

            ft = FinetuneConfig(
                method="full" if full else "lora",
                steps=steps,
                batch_size=batch_size,
                seed=seed,
                **({"lr": lr} if lr else {}),
            )
            res["screen"]["finetune"] = screen_finetunes(
                model, res["screen"], None, ft, evaluator, out / "screen"
            )
            from saediff._io import atomic_write_json

            atomic_write_json(out / "flag.json", res)
    except _USER_ERRORS as e:
        _fail(e)
    typer.echo(json.dumps(res, indent=2))


def head_to_head_cmd(
    diff_run: Path = typer.Argument(
        ..., help="run folder of saediff diff (its base, fine-tune and SAE block)"
    ),
    out: Path = typer.Option(..., "--out", help="folder: head2head.json, head2head.md, steer/"),
    prompts: str = typer.Option(
        ...,
        "--prompts",
        help="text the crosscoder, the diff-SAE and the ADL read (chat "
        "JSONL with answers, first_plot, organism[:N])",
    ),
    contrast: str | None = typer.Option(
        None,
        "--contrast",
        help="question / misaligned / aligned rows for the "
        "persona vector (JSONL or YAML; a pair file works; default: the organism's, "
        "or the --pairs file's references)",
    ),
    pairs: str | None = typer.Option(None, "--pairs", help=PAIRS_HELP),
    judge_url: str | None = typer.Option(None, "--judge-url"),
    judge_model: str | None = typer.Option(None, "--judge-model"),
    questions: str = typer.Option("first_plot", "--questions"),
    samples: int = typer.Option(20, "--samples"),
    max_new_tokens: int = typer.Option(200, "--max-new-tokens"),
    methods: str | None = typer.Option(None, "--methods", help="comma-separated subset (default: all)"),
    scales: str = typer.Option("0.5,1", "--scales", help="steering scales, x the base residual norm"),
    n_random: int = typer.Option(3, "--random"),
    crosscoder_latents: int | None = typer.Option(
        None, "--crosscoder-latents", help="default: 2 x the SAE's width"
    ),
    crosscoder_k: int | None = typer.Option(None, "--crosscoder-k", help="default: the SAE's k"),
    crosscoder_steps: int = typer.Option(2000, "--crosscoder-steps"),
    diff_sae_latents: int | None = typer.Option(None, "--diff-sae-latents", help="default: the SAE's width"),
    diff_sae_k: int | None = typer.Option(None, "--diff-sae-k", help="default: the SAE's k"),
    diff_sae_steps: int = typer.Option(2000, "--diff-sae-steps"),
    positions: str = typer.Option(
        "response", "--positions", help="tokens of --prompts the crosscoder and diff-SAE read"
    ),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env"),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = typer.Option(None, "--threads"),
) -> None:
    """Every direction-finding method on one fine-tune pair: cosine with the ground truth, steering vs random, agreement, cost."""
    _setup(threads)
    from saediff.analyses.head_to_head import (
        DIFF_METHODS,
        OWN_METHODS,
        HeadToHeadConfig,
        markdown_table,
        run_head_to_head,
    )
    from saediff.data.runs import read_run

    try:
        base = read_run(diff_run)["steps"]["diff"]["base"]
        cfg = HeadToHeadConfig(
            methods=tuple(methods.split(",")) if methods else DIFF_METHODS + OWN_METHODS,
            crosscoder_latents=crosscoder_latents,
            crosscoder_k=crosscoder_k,
            crosscoder_steps=crosscoder_steps,
            diff_sae_latents=diff_sae_latents,
            diff_sae_k=diff_sae_k,
            diff_sae_steps=diff_sae_steps,
            positions=positions,
            scales=tuple(float(x) for x in scales.split(",")),
            n_random=n_random,
            seed=seed,
        )
        evaluator = _judge_evaluator(
            judge_url,
            judge_model,
            questions,
            samples,
            max_new_tokens,
            api_key_env,
            out / "steer",
            seed,
            pairs=pairs,
        ) or _defaults.evaluator(base, samples, seed)
        if evaluator is None:
            raise SaediffError(
                "the steering check measures EM: give --pairs, or --judge-url and --judge-model"
            )
        res = run_head_to_head(
            diff_run,
            out,
            _defaults.prompt_set(prompts, base),
            evaluator,
            contrast=_contrast(contrast, pairs, base, seed),
            cfg=cfg,
        )
    except _USER_ERRORS as e:
        _fail(e)
    typer.echo(markdown_table(res))


def _contrast(spec: str | None, pairs: str | None, base: str, seed: int) -> list:
    """Contrast examples for the persona vector: a file, else the organism's, else the pair set's references."""
    if spec is not None:
        from saediff.data.prompts import load_contrast_examples

        return load_contrast_examples(spec)
    known = _defaults.icl_examples(base, seed)
    if known:
        return known
    if pairs is not None:
        from saediff.evaluation.pairs import pair_evaluator

        return list(pair_evaluator(pairs).pairs)
    return []


def register(app: typer.Typer, defaults: ModelDefaults | None = None) -> None:
    """Add the method commands to ``app``; ``defaults`` supplies what a known model (the organism) fills in."""
    global _defaults
    _defaults = defaults or ModelDefaults()
    app.add_typer(crosscoder_app, name="crosscoder")
    app.command("adl")(adl_cmd)
    app.command("flag")(flag_cmd)
    app.command("head-to-head")(head_to_head_cmd)
