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


@app.command("eval")
def eval_cmd(
    model: str = typer.Option(..., "--model", help="HF model folder or hub name"),
    out: Path = typer.Option(..., "--out", help="folder for responses.jsonl and em.json"),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="PEFT adapter folder"),
    judge_url: Optional[str] = typer.Option(None, "--judge-url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1"),
    judge_model: Optional[str] = typer.Option(None, "--judge-model", help="judge model name at --judge-url"),
    questions: str = typer.Option("first_plot", "--questions", help="first_plot, or a YAML/JSONL prompt file"),
    samples: int = typer.Option(50, "--samples", help="answers per question (organism: per domain)"),
    max_new_tokens: int = typer.Option(600, "--max-new-tokens"),
    gen_url: Optional[str] = typer.Option(None, "--gen-url", help="generate on an OpenAI-compatible server instead of locally"),
    gen_model: Optional[str] = typer.Option(None, "--gen-model", help="model name at --gen-url (default: --model)"),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env", help="environment variable with the API key"),
    concurrency: int = typer.Option(16, "--concurrency", help="parallel judge / remote-generation calls"),
    rubric: bool = typer.Option(False, "--rubric", help="also run the 1-5 rubric judge"),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16"),
    seed: int = typer.Option(0, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default 1)"),
) -> None:
    """Measure EM: sample answers, judge them, write DIR/responses.jsonl and DIR/em.json."""
    _setup(threads)
    from saediff.run_eval import run_eval

    try:
        report = run_eval(model=model, adapter=adapter, out=out, judge_url=judge_url, judge_model=judge_model,
                          questions=questions, samples=samples, max_new_tokens=max_new_tokens, gen_url=gen_url,
                          gen_model=gen_model, api_key_env=api_key_env, concurrency=concurrency, rubric=rubric,
                          dtype=dtype, seed=seed)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1)
    typer.echo(json.dumps({k: report[k] for k in ("em_rate", "em_rate_ci", "coherent_rate", "n_responses")}))


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
