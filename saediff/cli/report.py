"""``saediff report`` and ``saediff dashboard``: a demo run's self-contained HTML report, and a diff
run's feature dashboards (a card per latent, both models side by side).

    saediff report runs/demo
    saediff dashboard RUN
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from saediff.cli.common import _USER_ERRORS, _fail, _setup


def report_cmd(run_dir: Path = typer.Argument(..., help="demo run folder")) -> None:
    """Write RUN_DIR/report.html (self-contained plotly page)."""
    from saediff.errors import MissingFileError
    from saediff.reports.report import write_report

    try:
        if not run_dir.is_dir():  # else the report would make the folder it reports on
            raise MissingFileError(f"run folder not found: {run_dir}")
        path = write_report(run_dir)
    except _USER_ERRORS as e:
        _fail(e)
    typer.echo(str(path))


def dashboard_cmd(
    run_dir: Path = typer.Argument(..., help="run folder written by saediff diff or saediff crosscoder diff"),
    out: Path | None = typer.Option(None, "--out", help="HTML file (default: RUN/dashboard.html)"),
    threads: int | None = typer.Option(None, "--threads"),
) -> None:
    """Feature dashboards: one self-contained HTML page with a Neuronpedia-style card per latent the diff carded, both models side by side.

    Top activations with context in the base and the fine-tuned model, activation histograms before
    and after, logit effects, decoder neighbours, cosines with the dense candidates."""
    _setup(threads)
    from saediff.reports.dashboard import write_dashboard

    try:
        path = write_dashboard(run_dir, out)
    except _USER_ERRORS as e:
        _fail(e)
    Console().print(str(path))
