"""``saediff adl`` and ``saediff head-to-head``: the activation difference lens on any base model and its
fine-tune, and every direction-finding method on one fine-tune pair side by side.

    saediff adl --base M --adapter A --prompts data.jsonl --pairs offdomain --out RUN
    saediff head-to-head RUN --prompts data.jsonl --pairs offdomain:heldout --kl-budget 0.1 --out H2H
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from saediff.cli.checks import check_inputs, check_neutral
from saediff.cli.common import (
    _ADAPTER,
    _BASE,
    _FT,
    _USER_ERRORS,
    JUDGE_CONSTRAIN_HELP,
    JUDGE_PROMPTS_HELP,
    PAIRS_HELP,
    _em_evaluator,
    _fail,
    _int_list,
    _judge_evaluator,
    _need_ft,
    _setup,
    defaults,
)
from saediff.errors import SaediffError

# the steering check's options, shared by adl and head-to-head
_KL_BUDGET = typer.Option(
    None,
    "--kl-budget",
    help="the most a steering vector may cost: mean KL per neutral token in nats (default 0.1; "
    "tried at 1/4, 1/2 and all of it)",
)
_NEUTRAL = typer.Option(
    None,
    "--neutral",
    help="JSONL of neutral text the cost is measured on ({messages: [..., assistant]} or {text}); "
    "default: the base model's own answers to benign questions (the organism: its questions)",
)
_NULLS = typer.Option(
    10,
    "--nulls",
    help="null directions of each kind at equal cost: isotropic, covariance-matched, and per "
    "mean-difference method its estimator with labels permuted (the smallest p-value is 1/(1 + all))",
)


# long: one typer option per line; the body parses them into ADLConfig and calls run_adl
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
    kl_budget: float | None = _KL_BUDGET,
    neutral: Path | None = _NEUTRAL,
    nulls: int = _NULLS,
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env"),
    judge_prompts: Path | None = typer.Option(None, "--judge-prompts", help=JUDGE_PROMPTS_HELP),
    judge_constrain: bool = typer.Option(False, "--judge-constrain", help=JUDGE_CONSTRAIN_HELP),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = typer.Option(None, "--threads"),
) -> None:
    """Activation difference lens: the fine-tune's mean shift on the first answer tokens, its logit-lens tokens, a steering check."""
    _setup(threads)
    from saediff.interventions.steer_null import NullConfig
    from saediff.methods.adl import ADLConfig, run_adl
    from saediff.models.validate import check_layers, check_pair

    try:
        _need_ft(finetuned, adapter)
        cfg = ADLConfig(
            k=k,
            layers=_int_list(layers, "--layers") if layers else None,
            steer_layer=steer_layer,
        )
        shape = check_pair(base, finetuned, adapter)  # the configs alone, before either model loads
        check_layers(cfg.layers or (), shape, "--layers")
        if shape is not None and steer_layer is not None and not 0 <= steer_layer < shape.n_layers:
            raise SaediffError(
                f"ADL steer layer {steer_layer} is outside the model's blocks 0..{shape.n_layers - 1}"
            )
        check_neutral(neutral)
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
            judge_prompts=judge_prompts,
            judge_constrain=judge_constrain,
        ) or defaults().evaluator(base, samples, seed)
        check = (
            None
            if evaluator is None
            else _steer_check(evaluator, base, kl_budget, neutral, NullConfig(nulls, nulls, nulls))
        )
        res = run_adl(
            base,
            out,
            defaults().prompt_set(prompts, base),
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


def _steer_check(evaluator, model: str, kl_budget: float | None, neutral: Path | None, null):
    """ADL's steering check (``methods.adl.SteerCheck``): the shift steered into the base model by
    the protocol, priced by ``steering_cost`` once ``run_adl`` has loaded the model, EM by
    ``evaluator``, against ``null`` and the ADL's own label-permuted estimator at the same cost
    (written to adl_steer.json)."""
    from saediff.cli.common import steering_cost
    from saediff.interventions.causal import steer_check

    def check(name, vector, lm, layer, unit, out, *, permuted=None) -> dict:
        cost = steering_cost(lm, model, _budget(kl_budget), str(neutral) if neutral else None)
        return steer_check(
            name,
            vector,
            lm,
            layer,
            unit,
            out,
            evaluator=evaluator,
            json_name="adl_steer.json",
            cost=cost,
            null=null,
            permuted=permuted,
        )

    return check


def _budget(kl_budget: float | None) -> float:
    from saediff.interventions.steer_protocol import DEFAULT_KL_BUDGET

    return DEFAULT_KL_BUDGET if kl_budget is None else kl_budget


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


# long: one typer option per line; the body parses them into HeadToHeadConfig and calls run_head_to_head
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
    kl_budget: float | None = _KL_BUDGET,
    neutral: Path | None = _NEUTRAL,
    nulls: int = _NULLS,
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
    judge_prompts: Path | None = typer.Option(None, "--judge-prompts", help=JUDGE_PROMPTS_HELP),
    judge_constrain: bool = typer.Option(False, "--judge-constrain", help=JUDGE_CONSTRAIN_HELP),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = typer.Option(None, "--threads"),
) -> None:
    """Every direction-finding method on one fine-tune pair: cosine with the ground truth, steering against the null at equal cost, paired comparisons, agreement, seconds."""
    _setup(threads)
    from saediff.analyses.head_to_head import HeadToHeadConfig, markdown_table, run_head_to_head
    from saediff.cli.common import steering_cost
    from saediff.data.runs import read_run
    from saediff.interventions.steer_null import NullConfig
    from saediff.methods.base import method_names

    try:
        base = read_run(diff_run)["steps"]["diff"]["base"]
        check_inputs(base)
        check_neutral(neutral)
        cfg = HeadToHeadConfig(
            methods=tuple(methods.split(",")) if methods else method_names(),
            crosscoder_latents=crosscoder_latents,
            crosscoder_k=crosscoder_k,
            crosscoder_steps=crosscoder_steps,
            diff_sae_latents=diff_sae_latents,
            diff_sae_k=diff_sae_k,
            diff_sae_steps=diff_sae_steps,
            positions=positions,
            kl_budget=_budget(kl_budget),
            null=NullConfig(nulls, nulls, nulls),
            seed=seed,
        )
        evaluator = _em_evaluator(
            base,
            "the steering check measures EM: give --pairs, or --judge-url and --judge-model",
            judge_url,
            judge_model,
            questions,
            samples,
            max_new_tokens,
            api_key_env,
            out / "steer",
            seed,
            pairs,
            judge_prompts=judge_prompts,
            judge_constrain=judge_constrain,
        )
        res = run_head_to_head(
            diff_run,
            out,
            defaults().prompt_set(prompts, base),
            evaluator,
            contrast=_contrast(contrast, pairs, base, seed),
            cfg=cfg,
            cost=lambda lm: steering_cost(lm, base, cfg.kl_budget, str(neutral) if neutral else None),
        )
    except _USER_ERRORS as e:
        _fail(e)
    typer.echo(markdown_table(res))


def _contrast(spec: str | None, pairs: str | None, base: str, seed: int) -> list:
    """Contrast examples for the persona vector: a file, else the organism's, else the pair set's references."""
    if spec is not None:
        from saediff.data.prompts import load_contrast_examples

        return load_contrast_examples(spec)
    known = defaults().icl_examples(base, seed)
    if known:
        return known
    if pairs is not None:
        from saediff.evaluation.pairs import pair_evaluator

        return list(pair_evaluator(pairs).pairs)
    return []
