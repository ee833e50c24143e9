"""``saediff phase``: phase transitions in a fine-tune, over a folder of adapter checkpoints: when
the LoRA B vector rotates vs when EM appears.

    saediff phase RUNS/plain --directions RUN/directions --judge-url URL --judge-model M
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from saediff.cli.checks import check_export_folder, check_inputs
from saediff.cli.common import (
    _USER_ERRORS,
    JUDGE_CONSTRAIN_HELP,
    JUDGE_PROMPTS_HELP,
    PAIRS_HELP,
    _em_evaluator,
    _fail,
    _fmt,
    _setup,
)


def phase_cmd(
    checkpoints_dir: Path = typer.Argument(
        ..., help="folder of checkpoint-N adapter folders (or a run folder with checkpoints/)"
    ),
    base: str | None = typer.Option(
        None, "--base", help="model the adapters apply to (default: the adapter's)"
    ),
    directions: Path | None = typer.Option(
        None, "--directions", help="a diff run's directions/ (persona candidates)"
    ),
    module: str | None = typer.Option(
        None,
        "--module",
        help="adapted module, e.g. model.layers.21.mlp.down_proj (default: the first down_proj)",
    ),
    em: bool = typer.Option(
        True, "--em/--no-em", help="EM at every checkpoint (judge, or the organism's exact one)"
    ),
    judge_url: str | None = typer.Option(None, "--judge-url"),
    judge_model: str | None = typer.Option(None, "--judge-model"),
    pairs: str | None = typer.Option(None, "--pairs", help=PAIRS_HELP),
    questions: str = typer.Option("first_plot", "--questions"),
    samples: int = typer.Option(20, "--samples", help="answers per question (organism: per domain)"),
    max_new_tokens: int = typer.Option(600, "--max-new-tokens"),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env"),
    judge_prompts: Path | None = typer.Option(None, "--judge-prompts", help=JUDGE_PROMPTS_HELP),
    judge_constrain: bool = typer.Option(False, "--judge-constrain", help=JUDGE_CONSTRAIN_HELP),
    out: Path | None = typer.Option(None, "--out", help="where phase.json goes (default: CHECKPOINTS_DIR)"),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = typer.Option(None, "--threads"),
) -> None:
    """Phase transitions: when the LoRA B vector rotates vs when EM appears, over a folder of adapter checkpoints.

    Per checkpoint: local cosine, cosine with the persona candidates, norms of A and B, EM;
    writes phase.json."""
    _setup(threads)
    from saediff.analyses.phase import run_phase

    try:
        if directions is not None:
            check_export_folder(directions, "--directions")
        check_inputs(base)
        evaluator, model = None, base
        if em:
            model = base or _adapter_base(checkpoints_dir)
            evaluator = _em_evaluator(
                model,
                "EM per checkpoint needs --judge-url and --judge-model, or --pairs (or --no-em)",
                judge_url,
                judge_model,
                questions,
                samples,
                max_new_tokens,
                api_key_env,
                Path(out or checkpoints_dir),
                seed,
                pairs,
                judge_prompts=judge_prompts,
                judge_constrain=judge_constrain,
            )
        res = run_phase(
            checkpoints_dir, base=model, directions=directions, evaluator=evaluator, module=module, out=out
        )
    except _USER_ERRORS as e:
        _fail(e)
    _print_phase(res)


def _adapter_base(checkpoints_dir: Path) -> str | None:
    """The model the first checkpoint's adapter was trained on (its adapter config's)."""
    from saediff.analyses.phase import adapter_checkpoints
    from saediff.models.lora import read_adapter

    return read_adapter(adapter_checkpoints(checkpoints_dir)[0][1]).config.get("base_model_name_or_path")


def _print_phase(res: dict) -> None:
    """Per checkpoint: local cosine, cosine with each candidate, norms of A and B, EM."""
    from rich.table import Table

    table = Table(
        title=f"{res['module']}: rotation at step {res['rotation_step']}, EM at step {res['em_step']}"
    )
    names = list(res["candidate_cosine"])
    for col in ("step", "local cos", *[f"cos {n}" for n in names], "|A|", "|B|", "EM"):
        table.add_column(col, justify="right")
    for i, step in enumerate(res["steps"]):
        table.add_row(
            str(step),
            _fmt(res["local_cosine"][i], 3),
            *[_fmt(res["candidate_cosine"][n][i]) for n in names],
            _fmt(res["norm_A"][i]),
            _fmt(res["norm_B"][i], 3),
            _fmt(res["em_rate"][i]),
        )
    Console(width=max(120, Console().width)).print(table)
