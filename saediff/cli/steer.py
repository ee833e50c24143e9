"""``saediff steer`` and ``saediff discover``: causal checks of a diff run's candidate directions
(steer the base model, project out of and clamp in the fine-tune), and a screen of its top risen and
fallen latents by induce and repair steering.

    saediff steer RUN --judge-url URL --judge-model M
    saediff steer --model smollm2-135m --direction EXPORT:persona_L15 --pairs offdomain:heldout \
        --pairs style_crossed --out steer_persona
    saediff discover RUN --pairs offdomain
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from saediff.cli.checks import check_direction, check_dtype, check_inputs, check_neutral
from saediff.cli.common import (
    _USER_ERRORS,
    JUDGE_CONSTRAIN_HELP,
    JUDGE_PROMPTS_HELP,
    PAIRS_HELP,
    _fail,
    _judge_evaluator,
    _setup,
    steering_cost,
)
from saediff.cli.methods import _contrast
from saediff.cli.organism import organism_evaluator
from saediff.errors import SaediffError

KL_HELP = "the most a steering vector may cost: mean KL per neutral token (nats)"
NEUTRAL_HELP = (
    "neutral text the cost is measured on (JSONL rows {messages} or {text}); default: the base "
    "model's own greedy answers to saediff's benign questions (the organism: its questions)"
)
NULLS_HELP = "null directions of each kind (isotropic, covariance-matched, label-permuted)"
CONTRAST_HELP = (
    "question / misaligned / aligned rows the run's in-context direction was built from (its "
    "--icl-examples), to rebuild it for its label-permuted null; default: the organism's, or the "
    "--pairs set's references (kept only where the rebuild reproduces the run's direction)"
)


def _null(n: int):
    from saediff.interventions.steer_null import NullConfig

    return NullConfig(n_isotropic=n, n_covariance=n, n_permuted=n)


# long: one typer option per line; the body builds the evaluators and the config and calls the library
def steer_cmd(
    run_dir: Path | None = typer.Argument(
        None, help="run folder written by saediff diff (or give --direction)"
    ),
    model: str | None = typer.Option(None, "--model", help="base model (default: the run's)"),
    finetuned: str | None = typer.Option(None, "--finetuned", help="fine-tuned model (default: the run's)"),
    adapter: str | None = typer.Option(
        None, "--adapter", help="PEFT adapter on --model (default: the run's)"
    ),
    direction: list[str] = typer.Option(
        [],
        "--direction",
        help="FOLDER:NAME of an export folder's direction (repeatable); needs --model and --out",
    ),
    out: Path | None = typer.Option(None, "--out", help="output folder of --direction (steer.json)"),
    judge_url: str | None = typer.Option(
        None, "--judge-url", help="OpenAI-compatible judge (organism: exact judge)"
    ),
    judge_model: str | None = typer.Option(None, "--judge-model"),
    pairs: list[str] = typer.Option([], "--pairs", help=PAIRS_HELP + " (repeatable with --direction)"),
    questions: str = typer.Option(
        "first_plot",
        "--questions",
        help="first_plot or a YAML/JSONL prompt file; half choose the cost level, the other half report",
    ),
    samples: int = typer.Option(50, "--samples", help="answers per question (organism: per domain)"),
    max_new_tokens: int = typer.Option(600, "--max-new-tokens"),
    kl_budget: float | None = typer.Option(None, "--kl-budget", help=KL_HELP),
    neutral: str | None = typer.Option(None, "--neutral", help=NEUTRAL_HELP),
    nulls: int = typer.Option(10, "--nulls", help=NULLS_HELP),
    latents: int = typer.Option(3, "--latents", help="top SAE latents to check"),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env"),
    judge_prompts: Path | None = typer.Option(None, "--judge-prompts", help=JUDGE_PROMPTS_HELP),
    judge_constrain: bool = typer.Option(False, "--judge-constrain", help=JUDGE_CONSTRAIN_HELP),
    dtype: str = typer.Option("auto", "--dtype"),
    device: str = typer.Option("auto", "--device"),
    organism: Path | None = typer.Option(None, "--organism", help="the organism's checks (steering.json)"),
    contrast: str | None = typer.Option(None, "--contrast", help=CONTRAST_HELP),
    seed: int = typer.Option(0, "--seed", help="evaluation seed; the run's in-context shots' too"),
    threads: int | None = typer.Option(None, "--threads"),
) -> None:
    """Causal checks by saediff's steering protocol: a diff run's candidates (steer the base model, project out of and clamp in the fine-tune), or any exported direction (--direction)."""
    _setup(threads)
    try:
        if direction:
            res = _steer_directions(
                run_dir, direction, model, adapter, out, judge_url, judge_model, pairs, questions, samples,
                max_new_tokens, kl_budget, neutral, nulls, api_key_env, dtype, device, seed,
                judge=(judge_prompts, judge_constrain),
            )  # fmt: skip
            _print_directions(res)
            return
        if run_dir is None:
            raise SaediffError(
                "saediff steer needs a run folder, or --direction FOLDER:NAME with --model and --out"
            )
        if len(pairs) > 1:
            raise SaediffError("saediff steer RUN takes one --pairs set (several only with --direction)")
        if organism is not None:
            from saediff.stories.organism.demo import run_steer_check

            st = run_steer_check(
                run_dir, organism, n_per_domain=samples, kl_budget=kl_budget, null=_null(nulls)
            )
            typer.echo(json.dumps(st, indent=2))
            return
        from saediff.data.runs import read_run
        from saediff.interventions.causal import SteerConfig, run_causal_checks
        from saediff.models.loading import ModelSpec

        info = read_run(run_dir)["steps"]["diff"]
        base = model or info["base"]
        check_dtype(dtype)
        check_neutral(neutral)
        check_inputs(base)
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
            pairs=pairs[0] if pairs else None,
            judge_prompts=judge_prompts,
            judge_constrain=judge_constrain,
        ) or organism_evaluator(base, samples, seed)
        cfg = SteerConfig(n_latents=latents, null=_null(nulls), neutral=neutral, **_budget(kl_budget))
        select, report = evaluator.halves()
        own = _contrast(contrast, pairs[0] if pairs else None, info["base"], seed)
        res = run_causal_checks(
            run_dir,
            ModelSpec(base, dtype=dtype, device=device),
            ModelSpec(
                ft_model or base, adapter=ft_adapter, merge=ft_adapter is not None, dtype=dtype, device=device
            ),
            select,
            report,
            cfg,
            cost=lambda lm: steering_cost(lm, base, cfg.kl_budget, neutral),
            permuted=lambda lm_base, lm_ft: _permuted_nulls_on(run_dir, cfg, own, seed, lm_base, lm_ft),
        )
    except _USER_ERRORS as e:
        _fail(e)
    _print_steer(res)


def _budget(kl_budget: float | None) -> dict:
    return {} if kl_budget is None else {"kl_budget": kl_budget}


def _permuted_nulls(run_dir: Path, cfg, contrast: list, dtype: str, device: str, seed: int) -> dict:
    """``_permuted_nulls_on`` the run's own models, loaded here (only those the estimators read)."""
    from saediff.data.runs import read_run
    from saediff.interventions.causal import steer_candidates
    from saediff.methods.mean_diff import DIFF_RUN_FAMILY, diff_run_methods
    from saediff.models.loading import ModelSpec, load_model

    cands, L = steer_candidates(run_dir, cfg)
    reads = {r for m in diff_run_methods(cands, L) for r in DIFF_RUN_FAMILY[m]}
    info = read_run(run_dir)["steps"]["diff"]
    base = ModelSpec(info["base"], dtype=dtype, device=device)
    ft = ModelSpec(
        info["finetuned"] or info["base"],
        adapter=info["adapter"],
        merge=info["adapter"] is not None,
        dtype=dtype,
        device=device,
    )
    return _permuted_nulls_on(
        run_dir,
        cfg,
        contrast,
        seed,
        load_model(base) if "base" in reads else None,
        load_model(ft) if "finetuned" in reads else None,
    )


def _permuted_nulls_on(run_dir: Path, cfg, contrast: list, seed: int, lm_base, lm_ft) -> dict:
    """The label-permuted null of each of the run's mean-difference candidates (name ->
    ``PermutedNull``: its estimator, or None and why), rebuilt by the head-to-head's method code on
    the loaded models; an estimator that does not reproduce the run's direction (other models,
    other examples) gives none, and says so."""
    from saediff.data.runs import read_run
    from saediff.interventions.causal import steer_candidates
    from saediff.methods.base import MethodConfig, MethodInputs
    from saediff.methods.export import load_directions
    from saediff.methods.mean_diff import diff_run_methods, diff_run_nulls

    cands, L = steer_candidates(run_dir, cfg)
    methods = diff_run_methods(cands, L)
    if not methods:
        return {}
    info = read_run(run_dir)["steps"]["diff"]
    inputs = MethodInputs(
        lm_base, lm_ft, L, [], list(contrast), MethodConfig(seed=seed), {},
        load_directions(run_dir / "directions"), info, run_dir,
    )  # fmt: skip
    return {n: p for n, p in diff_run_nulls(inputs, methods).items() if n in cands}


def _steer_directions(
    run_dir, direction, model, adapter, out, judge_url, judge_model, pairs, questions, samples,
    max_new_tokens, kl_budget, neutral, nulls, api_key_env, dtype, device, seed, judge=(None, False),
) -> dict:  # fmt: skip
    """``saediff steer --direction``: every named direction through the protocol on ``--model``;
    ``judge``: (--judge-prompts, --judge-constrain)."""
    judge_prompts, judge_constrain = judge
    if run_dir is not None:
        raise SaediffError("give a run folder or --direction, not both")
    if model is None or out is None:
        raise SaediffError("--direction needs --model (the model to steer) and --out (the output folder)")
    check_dtype(dtype)
    check_neutral(neutral)
    shape = check_inputs(model, adapter)  # the configs and export manifests, before the model loads
    for source in direction:
        check_direction(source, shape)
    from saediff.cli.organism import organism_eval_or_none

    exact = organism_eval_or_none(model, samples, seed) if not pairs and judge_url is None else None
    if not pairs and judge_url is None and exact is None:
        raise SaediffError(
            "--direction needs --pairs SET (repeatable) or --judge-url (the organism: its exact judge)"
        )
    from saediff.interventions.causal import SteerConfig, steer_directions
    from saediff.methods.export import load_direction
    from saediff.models.loading import ModelSpec

    dirs = {}
    for source in direction:
        d = load_direction(source)
        if d.name in dirs:
            raise SaediffError(f"--direction {source}: a direction named {d.name!r} was already given")
        dirs[d.name] = d
    evaluators = {"organism": exact} if exact is not None else {}
    for spec in pairs or ([] if exact is not None else [None]):
        ev = _judge_evaluator(
            judge_url,
            judge_model,
            questions,
            samples,
            max_new_tokens,
            api_key_env,
            out,
            seed,
            pairs=spec,
            judge_prompts=judge_prompts,
            judge_constrain=judge_constrain,
        )
        evaluators[spec or "judge"] = ev
    cfg = SteerConfig(null=_null(nulls), neutral=neutral, **_budget(kl_budget))
    spec = ModelSpec(model, adapter=adapter, dtype=dtype, device=device)
    return steer_directions(
        dirs, spec, evaluators, out, cfg, cost=lambda lm: steering_cost(lm, model, cfg.kl_budget, neutral)
    )


# long: one typer option per line; the body builds the evaluator and the config and calls discover_latents
def discover_cmd(
    run_dir: Path = typer.Argument(..., help="run folder written by saediff diff"),
    pool: int = typer.Option(
        20, "--pool", help="latents that rose most, and as many that fell most, to screen"
    ),
    kl_budget: float | None = typer.Option(None, "--kl-budget", help=KL_HELP),
    neutral: str | None = typer.Option(None, "--neutral", help=NEUTRAL_HELP),
    nulls: int = typer.Option(10, "--nulls", help=NULLS_HELP),
    judge_url: str | None = typer.Option(
        None, "--judge-url", help="OpenAI-compatible judge (organism: exact judge)"
    ),
    judge_model: str | None = typer.Option(None, "--judge-model"),
    pairs: str | None = typer.Option(None, "--pairs", help=PAIRS_HELP),
    questions: str = typer.Option("first_plot", "--questions"),
    samples: int = typer.Option(20, "--samples", help="answers per question (organism: per domain)"),
    max_new_tokens: int = typer.Option(600, "--max-new-tokens"),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env"),
    judge_prompts: Path | None = typer.Option(None, "--judge-prompts", help=JUDGE_PROMPTS_HELP),
    judge_constrain: bool = typer.Option(False, "--judge-constrain", help=JUDGE_CONSTRAIN_HELP),
    dtype: str = typer.Option("auto", "--dtype"),
    device: str = typer.Option("auto", "--device"),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = typer.Option(None, "--threads"),
) -> None:
    """Screen a diff run's top risen and fallen latents by induce and repair steering against the null; writes RUN/latents.json for block --latents."""
    _setup(threads)
    try:
        from saediff.data.runs import read_run
        from saediff.interventions.causal import DiscoverConfig, discover_latents
        from saediff.models.loading import ModelSpec

        info = read_run(run_dir)["steps"]["diff"]
        check_dtype(dtype)
        check_neutral(neutral)
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
            judge_prompts=judge_prompts,
            judge_constrain=judge_constrain,
        ) or organism_evaluator(info["base"], samples, seed)
        cfg = DiscoverConfig(pool=pool, null=_null(nulls), neutral=neutral, **_budget(kl_budget))
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
            cost=lambda lm: steering_cost(lm, info["base"], cfg.kl_budget, neutral),
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


def _effect(r: dict) -> str:
    if r.get("effect") is None:
        return "no scale reached the cost levels"
    lo, hi = r["effect_ci"] or (float("nan"), float("nan"))
    return f"{r['effect']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def _print_directions(res: dict) -> None:
    from rich.table import Table

    table = Table(
        title=f"steering at equal KL cost (budget levels {res['costs']}); effect on the report half"
    )
    for col in ("direction", "set", "effect [95% CI]", "cost KL", "null q95", "p", "verdict"):
        table.add_column(col, no_wrap=True)
    for name, row in res["directions"].items():
        for set_name, r in row.items():
            if not isinstance(r, dict):
                continue
            q95 = (r.get("null_quantiles") or {}).get("q95")
            table.add_row(
                name,
                set_name,
                _effect(r),
                "-" if r.get("cost_kl") is None else f"{r['cost_kl']:.3f}",
                "-" if q95 is None else f"{q95:+.3f}",
                "-" if r.get("p_value") is None else f"{r['p_value']:.3f}",
                str(r.get("verdict")),
            )
    Console(width=max(140, Console().width)).print(table)


def _print_steer(res: dict) -> None:
    from rich.table import Table

    def fmt(r: dict) -> str:
        lo, hi = r["em_rate_ci"]
        return f"{r['em_rate']:.2f} [{lo:.2f}, {hi:.2f}]"

    table = Table(
        title=f"causal checks at block {res['layer']} (held-out questions; base {fmt(res['base'])}, "
        f"fine-tuned {fmt(res['finetuned'])})"
    )
    for col in ("candidate", "steer base: effect [95% CI]", "cost KL", "p", "verdict", "project out / clamp"):
        table.add_column(col, no_wrap=True)
    for name, ind in res["induce"].items():
        rm, cl = res["remove"][name], res["clamp"][name]
        table.add_row(
            name,
            _effect(ind),
            "-" if ind.get("cost_kl") is None else f"{ind['cost_kl']:.3f}",
            "-" if ind.get("p_value") is None else f"{ind['p_value']:.3f}",
            str(ind.get("verdict")),
            f"{rm['layer']['em_rate']:.2f} / {cl['layer']['em_rate']:.2f}",
        )
    Console(width=max(140, Console().width)).print(table)
