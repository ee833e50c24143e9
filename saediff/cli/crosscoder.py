"""``saediff crosscoder train / diff``: the diffing-toolkit's BatchTopK crosscoder over a base model and
its fine-tune, read live on the same tokens, and its fine-tune-only, base-only and shared latents.

    saediff crosscoder train --base M --adapter A --prompts data.jsonl --hook blocks.15.hook_resid_post --out CC
    saediff crosscoder diff CC --base M --adapter A --prompts data.jsonl --out RUN
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from saediff.cli.common import (
    _ADAPTER,
    _BASE,
    _FT,
    _POSITIONS,
    _PROMPTS,
    _USER_ERRORS,
    _fail,
    _need_ft,
    _setup,
    defaults,
    with_precision,
)

crosscoder_app = typer.Typer(
    no_args_is_help=True, help="Crosscoders over a base model and its fine-tune (BatchTopK, latent scaling)."
)


@crosscoder_app.command("train")
@with_precision
def crosscoder_train_cmd(
    base: str = _BASE,
    finetuned: str | None = _FT,
    adapter: str | None = _ADAPTER,
    prompts: str = _PROMPTS,
    hook: str = typer.Option(
        ..., "--hook", help="residual hook read in both models, e.g. blocks.15.hook_resid_post"
    ),
    out: Path = typer.Option(
        ..., "--out", help="crosscoder folder to write (cfg.json + crosscoder.safetensors)"
    ),
    positions: str = _POSITIONS,
    d_sae: int = typer.Option(
        1024, "--d-sae", help="latents (the diffing-toolkit's EM crosscoder: 32 x d_model)"
    ),
    k: int = typer.Option(32, "--k", help="active latents per token at the end (BatchTopK)"),
    k_start: int | None = typer.Option(None, "--k-start", help="anneal k down from this value"),
    anneal_steps: int = typer.Option(0, "--anneal-steps", help="steps over which k anneals to --k"),
    steps: int = typer.Option(3000, "--steps"),
    batch_size: int = typer.Option(1024, "--batch-size"),
    lr: float = typer.Option(1e-3, "--lr"),
    buffer_rows: int = typer.Option(65536, "--buffer-rows", help="rows in the shuffling buffer"),
    device: str = typer.Option("auto", "--device"),
    seed: int = typer.Option(0, "--seed"),
    checkpoint_every: int | None = typer.Option(
        None, "--checkpoint-every", help="save the training state every N steps (to OUT.ckpt/)"
    ),
    resume: bool = typer.Option(
        False, "--resume", help="continue from OUT.ckpt/ (same models, prompts, settings and seed)"
    ),
    threads: int | None = typer.Option(None, "--threads"),
) -> None:
    """Train a BatchTopK crosscoder on a base model and its fine-tune, read live on the same tokens."""
    _setup(threads)
    from saediff.activations.collect import check_positions
    from saediff.models.validate import check_pair
    from saediff.saes.crosscoder import CrosscoderConfig, crosscoder_from_models

    try:
        _need_ft(finetuned, adapter)
        check_positions(positions)
        check_pair(base, finetuned, adapter, hook)  # the configs alone, before either model loads
        cfg = CrosscoderConfig(
            d_sae=d_sae,
            k=k,
            k_start=k_start,
            anneal_steps=anneal_steps,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            device=device,
            seed=seed,
        )
        res = crosscoder_from_models(
            base,
            out,
            cfg,
            defaults().prompt_set(prompts, base),
            hook,
            finetuned=finetuned,
            adapter=adapter,
            positions=positions,
            buffer_rows=buffer_rows,
            prompts_name=prompts,
            checkpoint_every=checkpoint_every,
            resume=resume,
        )
    except _USER_ERRORS as e:
        _fail(e)
    typer.echo(json.dumps(res, indent=2))


@crosscoder_app.command("diff")
@with_precision
def crosscoder_diff_cmd(
    crosscoder: Path = typer.Argument(..., help="crosscoder folder (saediff crosscoder train --out)"),
    base: str = _BASE,
    finetuned: str | None = _FT,
    adapter: str | None = _ADAPTER,
    prompts: str = _PROMPTS,
    out: Path = typer.Option(..., "--out", help="run folder: crosscoder_diff.json, cards.json, directions/"),
    positions: str = _POSITIONS,
    top: int = typer.Option(10, "--top", help="fine-tune-only latents to card and export as directions"),
    threads: int | None = typer.Option(None, "--threads"),
) -> None:
    """The crosscoder's latents: fine-tune-only, base-only and shared, with decoder-norm ratios and latent scaling."""
    _setup(threads)
    from saediff.activations.collect import check_positions
    from saediff.methods.crosscoder import run_crosscoder_diff
    from saediff.models.validate import check_pair
    from saediff.saes.crosscoder import check_crosscoder_folder

    try:
        _need_ft(finetuned, adapter)
        check_positions(positions)
        check_crosscoder_folder(crosscoder, check_pair(base, finetuned, adapter))
        res = run_crosscoder_diff(
            crosscoder,
            base,
            out,
            defaults().prompt_set(prompts, base),
            finetuned=finetuned,
            adapter=adapter,
            positions=positions,
            top=top,
            prompts_name=prompts,
        )
    except _USER_ERRORS as e:
        _fail(e)
    _print_crosscoder(out)
    typer.echo(json.dumps(res, indent=2))


def _print_crosscoder(out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    data = json.loads((out / "crosscoder_diff.json").read_text())
    by = {r["latent"]: r for r in data["latents"]}
    t = Table(title=f"fine-tune-only latents ({data['summary']['classes']})")
    for col in ("latent", "rel_norm", "freq", "nu_r", "nu_eps", "cosine"):
        t.add_column(col)
    fmt = lambda v: "n/a" if v is None else f"{v:.3g}"
    for j in data["summary"]["ft_only_ranked"]:
        r = by[j]
        t.add_row(str(j), *(fmt(r[c]) for c in ("rel_norm", "freq", "nu_r", "nu_eps", "cosine")))
    Console(stderr=True).print(t)
