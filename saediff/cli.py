"""The ``saediff`` command line: thin wrappers over the library (imports are lazy: torch and
transformers take seconds to import).

    saediff organism build --out runs/organism --quick
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help="saediff: why does a narrow fine-tune misalign a model broadly?")
organism_app = typer.Typer(no_args_is_help=True, help="The built-in EM model organism.")
app.add_typer(organism_app, name="organism")
console = Console(stderr=True)


def _setup(threads: int | None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    # one thread per process is the safe default on small shared CPUs (see DESIGN.md)
    torch.set_num_threads(threads or 1)


@organism_app.command("build")
def organism_build(
    out: Path = typer.Option(..., "--out", help="folder to write base/, aligned/, full_ft/, lora_ft/, control_ft/, ground_truth.safetensors, organism.json"),
    quick: bool = typer.Option(False, "--quick", help="CI-sized build (<= 3 min on 2 CPU cores)"),
    seed: int = typer.Option(0, "--seed", help="seed of every random draw"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default 1)"),
) -> None:
    """Pretrain, align and narrowly fine-tune the organism; measure EM and the ground truth."""
    _setup(threads)
    from saediff.organism.build import build_organism
    from saediff.organism.recipes import OrganismConfig

    cfg = OrganismConfig.quick(seed) if quick else OrganismConfig(seed=seed)
    with console.status("building organism") as status:
        result = build_organism(out, cfg, progress=lambda step: status.update(f"organism: {step}"))
    summary = {k: result[k]["other_misaligned_rate"] for k in ("aligned", "full_ft", "lora_ft", "control_ft", "steer_ground_truth")}
    typer.echo(json.dumps({"other_misaligned_rate": summary, "timing_s": result["timing_s"]}, indent=2))


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
