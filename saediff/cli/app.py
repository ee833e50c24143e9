"""The ``saediff`` command line: the typer ``app``, its global options, and every command, each a thin
wrapper over the library in the module of its group (imports are lazy: torch and transformers take
seconds to import).

    saediff organism build --out runs/organism --quick
    saediff --verbose eval --model M --pairs offdomain --out EVAL

Every model-side command takes ``--precision auto|fp32|bf16`` (``common.with_precision``).
"""

from __future__ import annotations

import os

import typer

from saediff.cli import (
    block,
    crosscoder,
    demo,
    diff,
    evaluate,
    methods,
    organism,
    phase,
    questions,
    report,
    sae,
    screen,
    steer,
)
from saediff.cli.common import is_verbose, quiet_third_party, use_defaults, with_precision

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="saediff: why does a narrow fine-tune misalign a model broadly?",
)


@app.callback()
def _global_options(
    verbose: bool = typer.Option(
        False,
        "--verbose",
        help="also show other libraries' progress bars, warnings and logs (or set SAEDIFF_VERBOSE=1)",
    ),
) -> None:
    if verbose:
        os.environ["SAEDIFF_VERBOSE"] = "1"  # the demos' worker processes inherit it
    if not is_verbose():
        quiet_third_party()


# the generic commands (questions, screen, methods, crosscoder) fill in the organism's inputs when a
# run's model is one of its folders, without importing it themselves
use_defaults(organism.OrganismDefaults())

app.add_typer(organism.organism_app, name="organism")
app.add_typer(sae.sae_app, name="sae")
app.command("eval")(with_precision(evaluate.eval_cmd))
app.command("cache")(with_precision(evaluate.cache_cmd))
app.command("diff")(with_precision(diff.diff_cmd))
app.command("compare")(diff.compare_cmd)
app.command("steer")(with_precision(steer.steer_cmd))
app.command("discover")(with_precision(steer.discover_cmd))
app.command("export")(diff.export_cmd)
app.command("block")(block.block_cmd)
app.command("demo")(with_precision(demo.demo_cmd))
app.command("report")(report.report_cmd)
# the open questions of the EM literature, on a diff run
app.command("overlap")(with_precision(questions.overlap_cmd))
app.command("predict")(with_precision(questions.predict_cmd))
app.command("phase")(with_precision(phase.phase_cmd))
app.command("icl")(with_precision(questions.icl_cmd))
app.command("neighbourhood")(screen.neighbourhood_cmd)
app.command("dashboard")(report.dashboard_cmd)
# the diffing-toolkit's and persona vectors' methods, on any base model and its fine-tune
app.add_typer(crosscoder.crosscoder_app, name="crosscoder")
app.command("adl")(with_precision(methods.adl_cmd))
app.command("flag")(with_precision(screen.flag_cmd))
app.command("head-to-head")(with_precision(methods.head_to_head_cmd))


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
