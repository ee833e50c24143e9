"""``saediff diff``, ``compare`` and ``export``: SAE model diffing with every candidate direction, the
cosine table and per-layer curves of a diff run, and its directions exported steering-ready.

    saediff diff --base M --finetuned FT --sae SAE --out RUN
    saediff compare RUN
    saediff export RUN --out DIRS --format saediff,gguf
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from saediff.cli.common import (
    _USER_ERRORS,
    JUDGE_CONSTRAIN_HELP,
    JUDGE_PROMPTS_HELP,
    _fail,
    _int_list,
    _setup,
)
from saediff.cli.organism import diff_run_inputs
from saediff.errors import SaediffError


# long: one typer option per line; the body parses them into run_diff's arguments
def diff_cmd(
    base: str = typer.Option(..., "--base", help="base (aligned) model folder or hub name"),
    sae: str = typer.Option(..., "--sae", help="SAELens SAE folder at one of the model's residual hooks"),
    out: Path = typer.Option(..., "--out", help="run folder"),
    finetuned: str | None = typer.Option(
        None, "--finetuned", help="fine-tuned model (omit with --adapter: base + adapter)"
    ),
    adapter: str | None = typer.Option(None, "--adapter", help="PEFT adapter folder on --base"),
    prompts: str | None = typer.Option(
        None,
        "--prompts",
        help="prompt file or first_plot (default); on the "
        "organism organism:N, N questions per domain (default 100)",
    ),
    top_n: int = typer.Option(10, "--top", help="SAE latents to keep as candidate directions"),
    ranking: str = typer.Option("delta", "--ranking", help="delta | abs_delta | effect_size | freq_delta"),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens"),
    icl_examples: str | None = typer.Option(
        None,
        "--icl-examples",
        help="JSONL/YAML rows question/misaligned/aligned: "
        "the in-context-induced direction (automatic on the organism)",
    ),
    n_shots: int = typer.Option(3, "--n-shots", help="in-context examples before each question"),
    judge_url: str | None = typer.Option(
        None,
        "--judge-url",
        help="OpenAI-compatible judge that labels the answers for the response mean difference",
    ),
    judge_model: str | None = typer.Option(None, "--judge-model"),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env"),
    judge_prompts: Path | None = typer.Option(None, "--judge-prompts", help=JUDGE_PROMPTS_HELP),
    judge_constrain: bool = typer.Option(False, "--judge-constrain", help=JUDGE_CONSTRAIN_HELP),
    responses: Path | None = typer.Option(
        None,
        "--responses",
        help="saediff eval's responses.jsonl: diff on these "
        "scored answers instead of generating (the response mean difference "
        "is then taken within each question and averaged)",
    ),
    samples: int = typer.Option(
        1,
        "--samples",
        help="answers per prompt from the fine-tuned model (seeded), all "
        "streamed through the diff; with more than one, each question without a domain "
        "is its own group for the response mean difference",
    ),
    batch_size: int | None = typer.Option(
        None,
        "--batch-size",
        help="prompts per generation batch and rows per streamed forward (default 64 and 32)",
    ),
    layers: str = typer.Option(
        "all",
        "--layers",
        help="blocks for the per-layer mean differences and in-context "
        "directions (saediff compare's curves): all (default), sae (the SAE's block only: "
        "both models run up to it and are hooked there alone), or indices like 4,8,12 (the "
        "SAE's block is always included)",
    ),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = typer.Option(None, "--threads"),
) -> None:
    """SAE model diffing plus every candidate direction (mean diffs, in-context, LoRA B, ground truth)."""
    _setup(threads)
    from saediff.methods.diff_run import run_diff

    if finetuned is None and adapter is None:
        _fail(ValueError("give --finetuned or --adapter"))
    try:
        judge = _labelling_judge(judge_url, judge_model, api_key_env, out, judge_prompts, judge_constrain)
        inputs = diff_run_inputs(base, prompts, max_new_tokens, seed)
        if icl_examples is not None:
            inputs["icl_examples"] = icl_examples
        blocks = layers if layers in ("sae", "all") else _int_list(layers, "--layers")
        _check_diff_inputs(base, finetuned, adapter, sae, ranking, blocks, responses, icl_examples)
        sizes = {} if batch_size is None else {"batch_size": batch_size, "gen_batch_size": batch_size}
        summary = run_diff(
            base,
            finetuned,
            sae,
            out,
            adapter=adapter,
            top_n=top_n,
            ranking=ranking,
            n_shots=n_shots,
            seed=seed,
            judge=judge,
            responses=str(responses) if responses else None,
            samples=samples,
            layers=blocks,
            **sizes,
            **inputs,
        )
    except _USER_ERRORS as e:
        _fail(e)
    typer.echo(json.dumps(summary, indent=2))


def _check_diff_inputs(base, finetuned, adapter, sae, ranking, blocks, responses, icl_examples) -> None:
    """What ``diff`` can check before it loads either model: the files it reads, the ranking, the
    pair, the SAE against the base's blocks and width, the blocks."""
    from typing import get_args

    from saediff.data.prompts import load_contrast_examples
    from saediff.methods.sae_diff import Ranking
    from saediff.models.validate import check_layers, check_pair
    from saediff.saes.checks import check_sae_folder

    if icl_examples is not None:
        load_contrast_examples(icl_examples)
    if ranking not in get_args(Ranking):
        raise SaediffError(f"--ranking must be one of {', '.join(get_args(Ranking))}, got {ranking!r}")
    shape = check_pair(base, finetuned, adapter)
    check_sae_folder(sae, shape)
    if not isinstance(blocks, str):
        check_layers(blocks, shape, "--layers")
    if responses is not None:
        from saediff.methods.answers import judged_responses

        judged_responses(responses)


def _labelling_judge(
    judge_url: str | None, judge_model: str | None, api_key_env: str, out: Path, prompts=None, constrain=False
):
    """The (aligned, coherent) judges that label the answers for the response mean difference, or None."""
    if judge_url is None:
        return None
    if judge_model is None:
        raise SaediffError("--judge-url needs --judge-model")
    from saediff.evaluation.run_eval import judge_set

    judges = judge_set(judge_url, judge_model, api_key_env, out, prompts=prompts, constrain=constrain)
    return judges["aligned"], judges["coherent"]


def compare_cmd(
    run_dir: Path = typer.Argument(..., help="run folder written by saediff diff"),
    downstream: bool = typer.Option(
        True, "--downstream/--no-downstream", help="adapter effect at later layers"
    ),
) -> None:
    """Cosine table at the SAE hook (with the random baseline) and per-layer / downstream curves."""
    from saediff.methods.diff_run import run_compare

    try:
        res = run_compare(run_dir, downstream=downstream)
    except _USER_ERRORS as e:
        _fail(e)
    from rich.table import Table

    cos = res["cosines"]
    table = Table(
        title=f"cosines at {cos['hook']} (random |cos| p95 {cos['random_baseline']['p95_abs']:.2f})"
    )
    table.add_column("")
    for n in cos["names"]:
        table.add_column(n[:14], justify="right")
    for n, row in zip(cos["names"], cos["matrix"]):
        table.add_row(n, *[f"{v:.2f}" for v in row])
    Console().print(table)


def export_cmd(
    run_dir: Path = typer.Argument(..., help="run folder written by saediff diff"),
    out: Path = typer.Option(..., "--out", help="export folder (directions.safetensors + manifest.json)"),
    top: int = typer.Option(3, "--top", help="SAE latents to export (by the run's ranking)"),
    formats: str = typer.Option(
        "saediff",
        "--format",
        help="comma-separated: saediff (always written), gguf "
        "(llama.cpp control vectors, OUT/gguf/), steering-vectors (OUT/steering_vectors/)",
    ),
) -> None:
    """Export the top SAE latents and every non-SAE direction, steering-ready (also as llama.cpp control vectors or steering-vectors)."""
    from saediff.methods.export import export_run

    try:
        res = export_run(run_dir, out, top, {f.strip() for f in formats.split(",") if f.strip()})
    except _USER_ERRORS as e:
        _fail(e)
    typer.echo(json.dumps(res))
