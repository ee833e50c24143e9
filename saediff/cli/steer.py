"""``saediff steer`` and ``saediff discover``: causal checks of a diff run's candidate directions
(steer the base model, project out of and clamp in the fine-tune), and a screen of its top risen and
fallen latents by induce and repair steering.

    saediff steer RUN --judge-url URL --judge-model M
    saediff discover RUN --pairs offdomain
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from saediff.cli.common import _USER_ERRORS, PAIRS_HELP, _fail, _judge_evaluator, _setup
from saediff.cli.organism import organism_evaluator


# long: one typer option per line; the body builds the evaluator and the config and calls run_causal_checks
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
        ) or organism_evaluator(base, samples, seed)
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


# long: one typer option per line; the body builds the evaluator and the config and calls discover_latents
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
        ) or organism_evaluator(info["base"], samples, seed)
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
