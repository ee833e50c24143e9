"""``saediff demo``: the whole story, on the organism (build, SAE, diff, compare, steer, export,
BLOCK-EM, report) or on a real chat model (``--model``: its narrow fine-tunes, their judge-free EM,
then the same story), and the table of its findings.

    saediff demo --quick --out runs/demo
    saediff demo --model smollm2-135m --out runs/smollm2
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from saediff.cli.common import _USER_ERRORS, _fail, _int_list, _setup
from saediff.console import steps
from saediff.errors import SaediffError

console = Console(stderr=True)


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
    _organism_demo(out, quick, seed, seeds)


def _organism_demo(out: Path, quick: bool, seed: int, seeds: str | None) -> None:
    """``saediff demo``: the organism demo (``saediff.stories.organism.demo``), its findings printed."""
    from saediff.stories.organism.demo import run_demo, run_demo_seeds

    try:
        seed_list = list(_int_list(seeds, "--seeds")) if seeds else None
        with steps("demo") as say:
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
        with steps("demo") as say:
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
    """The chat demo's findings: the paired difference on the held-out split (95% interval, t) with its
    verdict (holds / fails / inconclusive where the row reads its bar off an interval, else yes / NO),
    the design split beside it (one run), or the held-out figure per seed and their mean."""
    from rich.table import Table

    from saediff.reports.report import format_figure

    def cell(fig, ci, t, holds=None, verdict=None, bar="") -> str:
        mark = _mark(holds, verdict, bar, "")
        return (
            format_figure(fig, ci) + (f" t {t:.1f}" if t is not None else "") + (f" {mark}" if mark else "")
        )

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
                    r["per_seed"][str(k)].get("verdict"),
                    r["bar"],
                )
                for k in seeds
            ] + [format_figure(r["mean"])]
        else:
            d = r["design"] or {}
            cells = [
                cell(r["figure"], r["ci"], r["t"], r["holds"], r.get("verdict"), r["bar"]),
                cell(d.get("figure"), d.get("ci"), d.get("t")),
            ]
        table.add_row(f"{r['phenomenon']} ({r['source']})", *cells, r["bar"])
    Console(width=max(160, Console().width)).print(table)


def _print_headline(rows: list[dict], seeds: list[int] | None) -> None:
    """The demo's findings: phenomenon, figure per seed (95% interval), bar, and the verdict (holds /
    fails / inconclusive) where the row reads its bar off an interval, else yes / NO."""
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
    for row in rows:
        if seeds:
            cells = [
                format_figure(row["per_seed"][k]["figure"], row["per_seed"][k]["ci"])
                + " "
                + _mark(row["per_seed"][k]["holds"], row["per_seed"][k].get("verdict"), row["bar"])
                for k in cols
            ] + [format_figure(row["mean"])]
        else:
            cells = [
                format_figure(row["figure"], row["ci"])
                + " "
                + _mark(row["holds"], row.get("verdict"), row["bar"])
            ]
        table.add_row(row["phenomenon"], *cells, row["bar"])
    Console(width=max(160, Console().width)).print(table)


def _mark(holds: bool | None, verdict: str | None, bar: str, none: str = "-") -> str:
    """A findings cell's mark, as the report's: the verdict word where the row has one (and a bar,
    not a figure merely reported), else yes / NO, else ``none``."""
    if verdict and bar != "report":
        return verdict
    return {True: "yes", False: "NO", None: none}[holds]
