"""``saediff sae train / info``: train an SAE (SAELens format) on a store streamed from disk, on a
model's activations read live, or on a fine-tune's difference from its base; print one's config and
metrics.

    saediff sae train --activations STORE --out SAE --preset organism
    saediff sae info SAE --activations STORE
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

from saediff.cli.common import _USER_ERRORS, _fail, _setup, with_precision
from saediff.cli.organism import load_prompt_set
from saediff.errors import SaediffError

sae_app = typer.Typer(no_args_is_help=True, help="Train and inspect SAEs (SAELens format).")


# long: one typer option per line; the body parses them and calls the helpers below
@sae_app.command("train")
@with_precision
def sae_train_cmd(
    out: Path = typer.Option(..., "--out", help="SAE folder to write (SAELens format)"),
    activations: Path | None = typer.Option(
        None, "--activations", help="activation store folder (saediff cache)"
    ),
    model: str | None = typer.Option(
        None,
        "--model",
        help="or read activations straight from this model (nothing written to disk), over --prompts",
    ),
    prompts: str | None = typer.Option(
        None, "--prompts", help="with --model: prompt file, first_plot or organism[:N]"
    ),
    positions: str = typer.Option("all", "--positions", help="with --model: all | response | last_prompt"),
    hook: str | None = typer.Option(None, "--hook", help="which hook (a store's only one by default)"),
    on_difference: bool = typer.Option(
        False,
        "--on-difference",
        help="with --model (the base) and --finetuned or "
        "--adapter: train on the fine-tune's minus the base model's activations of "
        "the same tokens (the diffing-toolkit's diff-SAE); its latents ranked by mean "
        "activation go to saediff.json as candidate directions",
    ),
    finetuned: str | None = typer.Option(
        None, "--finetuned", help="with --on-difference: the fine-tuned model"
    ),
    adapter: str | None = typer.Option(
        None, "--adapter", help="with --on-difference: a PEFT adapter on --model"
    ),
    preset: str | None = typer.Option(None, "--preset", help="training preset from saes/registry.yaml"),
    arch: str | None = typer.Option(None, "--arch", help="topk | relu | batchtopk"),
    d_sae: int | None = typer.Option(None, "--d-sae"),
    k: int | None = typer.Option(None, "--k"),
    steps: int | None = typer.Option(None, "--steps"),
    batch_size: int | None = typer.Option(None, "--batch-size"),
    lr: float | None = typer.Option(None, "--lr"),
    l1_coefficient: float | None = typer.Option(None, "--l1-coefficient"),
    device: str = typer.Option("auto", "--device"),
    autocast: bool = typer.Option(False, "--autocast", help="bf16 autocast (GPU)"),
    buffer_rows: int = typer.Option(
        262144,
        "--buffer-rows",
        help="rows in the shuffling buffer (the store is streamed from disk through it, never loaded whole)",
    ),
    held_rows: int = typer.Option(
        20000, "--held-rows", help="rows at the end of the store held out for the metrics (at most 10% of it)"
    ),
    checkpoint_every: int | None = typer.Option(
        None, "--checkpoint-every", help="save the training state every N steps (to OUT.ckpt/)"
    ),
    resume: bool = typer.Option(
        False, "--resume", help="continue from OUT.ckpt/ (same store, settings and seed)"
    ),
    seed: int = typer.Option(0, "--seed"),
    kernel: str = typer.Option(
        "sparse_decode",
        "--kernel",
        help="TopK step: dense | sparse_decode | sparse | fused (one hand-written TopK step; "
        "with --autocast it picks latents in bf16) | auto (the fastest here, timed on the first "
        "batch; bench/sae_train.py, bench/sae_decode.py)",
    ),
    threads: int | None = typer.Option(None, "--threads"),
) -> None:
    """Train an SAE on a store streamed from disk, or on a model's activations read live; writes a SAELens folder."""
    _setup(threads)
    from saediff.saes.loading import check_sae_out
    from saediff.saes.registry import preset as get_preset
    from saediff.saes.training import SAETrainConfig, init_distributed, train_sae

    try:
        check_sae_out(out)  # before training, not after it
        given = {
            "arch": arch,
            "d_sae": d_sae,
            "k": k,
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "l1_coefficient": l1_coefficient,
        }
        settings = {
            **(get_preset(preset) if preset else {}),
            **{a: v for a, v in given.items() if v is not None},
        }
        run = {"device": device, "autocast": autocast, "seed": seed, "kernel": kernel}
        cfg = SAETrainConfig(**settings, **run)
        _check_sources(activations, model, finetuned, adapter, hook, on_difference)
        rank, world = init_distributed(device)
        if on_difference:
            hook, n_train, held, stream, source = _difference_source(
                model, finetuned, adapter, prompts, hook, positions
            )
        else:
            hook, n_train, held, stream, source = _source(
                activations, model, prompts, hook, positions, held_rows
            )
        if n_train < 2 * cfg.batch_size:  # a small test set: smaller batches rather than a failure
            cfg = _smaller_batches(settings, run, n_train, source, cfg.batch_size)
        # read live, a buffer larger than the corpus would read it many times over
        if model is not None and activations is None:
            buffer_rows = min(buffer_rows, n_train)
        batches = stream(cfg.batch_size, max(buffer_rows, 2 * cfg.batch_size), seed, rank, world)
        sae, _ = train_sae(
            batches,
            cfg,
            hook_name=hook,
            model_name=model or source,
            checkpoint_dir=Path(f"{out}.ckpt") if (checkpoint_every or resume) else None,
            checkpoint_every=checkpoint_every,
            resume=resume,
        )
        if rank != 0:  # under torchrun every rank holds the same weights; rank 0 measures and saves
            return
        metrics = _save(sae, out, held, hook, source, cfg, world, on_difference)
    except _USER_ERRORS as e:
        _fail(e)
    typer.echo(json.dumps({"out": str(out), **metrics}))


def _check_sources(activations, model, finetuned, adapter, hook, on_difference) -> None:
    """What ``sae train`` can check before it reads a row or loads a model: the store's manifest,
    the model configs (and the adapter) and the hook against their blocks."""
    from saediff.models.validate import check_hook, check_model, check_pair

    if on_difference:
        if model is None or (finetuned is None and adapter is None):
            raise SaediffError(
                "--on-difference needs --model (the base), --finetuned or --adapter, --prompts and --hook"
            )
        check_pair(model, finetuned, adapter, hook)
    elif activations is not None:
        from saediff.activations.store import ActivationStore

        store = ActivationStore(activations)  # the manifest alone
        if hook is not None and hook not in store.hooks:
            raise SaediffError(f"--hook {hook}: {activations} holds {', '.join(store.hooks)}")
    elif model is not None and hook is not None:
        check_hook(hook, check_model(model))


def _difference_source(model, finetuned, adapter, prompts, hook, positions) -> tuple:
    """``--on-difference``: the fine-tune's minus the base model's activations of the same tokens,
    as ``(hook, n_train, held, stream, source)``."""
    from saediff.activations.collect import check_positions
    from saediff.activations.streams import paired_source
    from saediff.models.loading import load_pair

    if not (model and prompts and hook) or (finetuned is None and adapter is None):
        raise SaediffError(
            "--on-difference needs --model (the base), --finetuned or --adapter, --prompts and --hook"
        )
    check_positions(positions)
    prompt_set = load_prompt_set(prompts, model)  # a bad file named before the models load
    lm_base, lm_ft = load_pair(model, finetuned, adapter)
    _, n_train, held, stream, source = paired_source(
        lm_base,
        lm_ft,
        prompt_set,
        hook,
        positions,
        f"{finetuned or adapter} minus {model} over {prompts}",
        difference=True,
    )
    return hook, n_train, held, stream, source


def _source(activations, model, prompts, hook, positions, held_rows: int) -> tuple:
    """The training rows, ``(hook, n_train, held, stream, source)``: a store streamed from disk, or
    a model's activations over ``prompts`` read live."""
    from saediff.activations.collect import check_positions
    from saediff.activations.streams import model_source, store_source
    from saediff.models.loading import load_model

    if activations is not None:
        return store_source(activations, hook, held_rows)
    if not (model and prompts and hook):
        raise SaediffError("give --activations, or --model, --prompts and --hook")
    check_positions(positions)  # before the model loads
    prompt_set = load_prompt_set(prompts, model)
    _, n_train, held, stream, source = model_source(
        load_model(model), prompt_set, hook, positions, f"{model} over {prompts}"
    )
    return hook, n_train, held, stream, source


def _smaller_batches(settings: dict, run: dict, n_train: int, source: str, batch_size: int):
    """The config with half the training rows per batch, when there are fewer than two batches."""
    from saediff.saes.training import SAETrainConfig

    small = max(1, n_train // 2)
    logging.getLogger("saediff").warning(
        "%s has %d training rows: batch size %d instead of %d (real SAEs want millions of tokens)",
        source,
        n_train,
        small,
        batch_size,
    )
    return SAETrainConfig(**{**settings, "batch_size": small}, **run)


def _save(sae, out: Path, held, hook: str, source: str, cfg, world: int, on_difference: bool) -> dict:
    """Measure on the held-out rows and write the SAELens folder; returns the metrics."""
    from saediff.methods.diff_sae import difference_latents
    from saediff.saes.loading import save_sae
    from saediff.saes.metrics import sae_metrics

    metrics = sae_metrics(sae, held).to_json()
    extra = {"difference_latents": difference_latents(sae, held)} if on_difference else {}
    save_sae(
        sae,
        out,
        {
            "hook_name": hook,
            "activations": source,
            "metrics": metrics,
            "train": cfg.__dict__,
            "processes": world,
            "on_difference": on_difference,
            **extra,
        },
    )
    return metrics


@sae_app.command("info")
def sae_info_cmd(
    sae_dir: str = typer.Argument(..., help="SAE folder (SAELens format) or RELEASE:SAE_ID"),
    activations: Path | None = typer.Option(None, "--activations", help="measure FVU/L0/dead on this store"),
    max_rows: int = typer.Option(
        100000, "--max-rows", help="rows of the store to measure on (its first ones)"
    ),
) -> None:
    """Print an SAE's config and metrics."""
    from saediff.saes.loading import load_sae
    from saediff.saes.metrics import sae_metrics

    try:
        sae = load_sae(sae_dir)
        info = {
            "cfg": {k: v for k, v in sae.cfg.to_dict().items() if not isinstance(v, dict)},
            "hook_name": sae.cfg.metadata.hook_name,
        }
        side = Path(sae_dir) / "saediff.json"
        if side.exists():
            info["saediff"] = json.loads(side.read_text())
        if activations is not None:
            import torch

            from saediff.activations.store import ActivationStore

            store = ActivationStore(activations)
            hook = sae.cfg.metadata.hook_name or store.hooks[0]
            rows = torch.cat(list(store.rows(hook, 0, min(max_rows, len(store)))))
            info["metrics"] = {**sae_metrics(sae, rows).to_json(), "rows": rows.shape[0]}
    except _USER_ERRORS as e:
        _fail(e)
    typer.echo(json.dumps(info, indent=2, default=str))
