"""``saediff eval`` and ``saediff cache``: EM of one model (judged samples or judge-free pairs), and
its activations collected into an on-disk store.

    saediff eval --model M --out EVAL --pairs offdomain
    saediff cache --model M --prompts first_plot --hook blocks.1.hook_resid_post --out STORE
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from saediff.cli.checks import DTYPES, check_dtype, check_inputs
from saediff.cli.common import (
    _USER_ERRORS,
    JUDGE_CONSTRAIN_HELP,
    JUDGE_PROMPTS_HELP,
    _fail,
    _setup,
)
from saediff.cli.organism import load_prompt_set, organism_eval_or_none


# long: one typer option per line; the body is one library call
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
    judge_prompts: Path | None = typer.Option(None, "--judge-prompts", help=JUDGE_PROMPTS_HELP),
    judge_constrain: bool = typer.Option(False, "--judge-constrain", help=JUDGE_CONSTRAIN_HELP),
    temperature: float = typer.Option(
        1.0, "--temperature", help="sampling temperature (0: greedy), locally and on --gen-url"
    ),
    top_p: float = typer.Option(1.0, "--top-p", help="nucleus sampling's p"),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16"),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads (default 1)"),
) -> None:
    """Measure EM: sample answers, judge them, write DIR/responses.jsonl and DIR/em.json; or, with
    --pairs, the model's preference for misaligned over aligned reference answers (no judge)."""
    _setup(threads)
    from saediff.evaluation.run_eval import run_eval

    try:
        check_dtype(dtype)
        if gen_url is None:  # else --model may be a name the server knows
            check_inputs(model, adapter)
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
            temperature=temperature,
            top_p=top_p,
            judge_prompts=judge_prompts,
            judge_constrain=judge_constrain,
            evaluator=None if judge_url or pairs else organism_eval_or_none(model, samples, seed),
        )
    except _USER_ERRORS as e:
        _fail(e)
    keys = ("em_rate", "em_rate_ci", "coherent_rate", "n_responses")
    if pairs is not None:  # em_rate is the MC1 share here: show the preference it comes from
        keys = ("preference", "preference_ci", "t", "n", "mc1", "mc1_ci", "mc2", "coherence")
    typer.echo(json.dumps({k: report[k] for k in keys}))


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
        check_dtype(shard_dtype, "--shard-dtype", DTYPES[1:])
        check_inputs(model, adapter, hooks=hook)
        prompt_set = load_prompt_set(prompts, model)
        lm = load_model(ModelSpec(model, adapter=adapter, merge=adapter is not None))
        import torch

        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        store = collect_activations(
            lm,
            prompt_set,
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
