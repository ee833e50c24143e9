"""Activations read live from one model or a base/fine-tune pair (no store): shuffled training
streams, paired rows of the same tokens, and the sources SAE and crosscoder training draw from
(the last tenth of prompts held out for metrics)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from jaxtyping import Float

from saediff.activations.collect import Positions, TokenizedPrompts, check_positions, tokenize_prompts
from saediff.activations.store import ActivationStore, mixed_batches
from saediff.data.prompts import Prompt
from saediff.errors import SaediffError
from saediff.models.loading import LoadedModel

__all__ = [
    "ActivationSource",
    "check_same_tokenizer",
    "model_source",
    "model_stream",
    "paired_model_stream",
    "paired_rows",
    "paired_source",
    "store_source",
]

log = logging.getLogger(__name__)


def model_stream(
    lm: LoadedModel,
    toks: TokenizedPrompts,
    hook: str,
    batch_size: int,
    *,
    positions: Positions = "all",
    buffer_rows: int = 65536,
    prompt_batch: int = 32,
    seed: int = 0,
    epochs: int | None = None,
) -> Iterator[Float[torch.Tensor, "batch d"]]:
    """Shuffled batches of activations at ``hook`` (``blocks.L.hook_resid_post``) read straight from
    ``lm`` over a prompt corpus, nothing written to disk: each pass runs the prompts in a random
    order (forward stopped at block L, forward hooks), and the rows go through the same mixing
    buffer as ``ActivationStore.stream``."""
    gen = torch.Generator().manual_seed(seed)
    parts = _model_parts([lm], toks, hook, toks.select(positions), gen, prompt_batch, epochs)
    return mixed_batches((p[:, 0] for p in parts), batch_size, buffer_rows, gen)


def paired_model_stream(
    lm_base: LoadedModel,
    lm_ft: LoadedModel,
    toks: TokenizedPrompts,
    hook: str,
    batch_size: int,
    *,
    positions: Positions = "all",
    buffer_rows: int = 65536,
    prompt_batch: int = 32,
    seed: int = 0,
    epochs: int | None = None,
) -> Iterator[Float[torch.Tensor, "batch 2 d"]]:
    """``model_stream`` over two models at once: each row holds the same token read from the base
    (``[:, 0]``) and the fine-tuned model (``[:, 1]``), shuffled together, for crosscoders and
    SAEs on activation differences. The two must share a tokenizer (``check_same_tokenizer``)."""
    check_same_tokenizer(lm_base, lm_ft)
    gen = torch.Generator().manual_seed(seed)
    parts = _model_parts([lm_base, lm_ft], toks, hook, toks.select(positions), gen, prompt_batch, epochs)
    return mixed_batches(parts, batch_size, buffer_rows, gen)


def check_same_tokenizer(lm_a: LoadedModel, lm_b: LoadedModel) -> None:
    """Refuse a pair whose tokenizers differ (vocabulary or chat template): their rows would not be the same tokens."""
    a, b = lm_a.tokenizer, lm_b.tokenizer
    if a.get_vocab() != b.get_vocab() or getattr(a, "chat_template", None) != getattr(
        b, "chat_template", None
    ):
        raise SaediffError(
            f"{lm_a.spec.model} and {lm_b.spec.model} have different tokenizers or chat templates: "
            "a paired read needs the same tokens in both models"
        )


def paired_rows(
    lm_base: LoadedModel,
    lm_ft: LoadedModel,
    toks: TokenizedPrompts,
    hook: str,
    *,
    positions: Positions = "all",
    prompt_batch: int = 32,
) -> Iterator[Float[torch.Tensor, "rows 2 d"]]:
    """One pass of both models over the prompts in their order, rows in collection order (the
    order of ``toks.select(positions).nonzero()``, so ``row_descriptions`` names them)."""
    check_same_tokenizer(lm_base, lm_ft)
    return _model_parts([lm_base, lm_ft], toks, hook, toks.select(positions), None, prompt_batch, 1)


def _model_parts(
    lms: list[LoadedModel],
    toks: TokenizedPrompts,
    hook: str,
    keep: torch.Tensor,
    gen: torch.Generator | None,
    prompt_batch: int,
    epochs: int | None,
) -> Iterator[Float[torch.Tensor, "rows models d"]]:
    """The kept rows of each prompt batch, in a fresh random prompt order each pass (in order
    without ``gen``), read from every model in ``lms`` (forward stopped at the hook's block), as
    (rows, len(lms), d) float32."""
    from saediff.models.hooks import capture_resid, parse_layer

    layer = parse_layer(hook)
    epoch = 0
    while epochs is None or epoch < epochs:
        n = toks.input_ids.shape[0]
        order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
        for i in range(0, len(order), prompt_batch):
            ids, attn, m = toks.batch(order[i : i + prompt_batch], keep)
            reads = []
            for lm in lms:
                with torch.no_grad():
                    r = capture_resid(lm.model, [layer], ids.to(lm.device), attn.to(lm.device))[layer]
                reads.append(r[m.to(lm.device)].float().cpu())
            yield torch.stack(reads, 1)
        epoch += 1


class ActivationSource(NamedTuple):
    """Where an SAE's training rows come from: ``stream(batch, buffer, seed, rank, world)`` yields
    (batch, d) training rows; ``held`` are rows kept apart for the metrics."""

    hook: str
    n_train: int
    held: torch.Tensor
    stream: Callable
    name: str


def store_source(path: str | Path, hook: str | None, held_rows: int) -> ActivationSource:
    """A store streamed from disk: its last rows (``held_rows``, at most 10%) held out, the rest
    streamed through the shuffling buffer, each rank its own share."""
    store = ActivationStore(path)
    if hook is None:
        if len(store.hooks) != 1:
            raise SaediffError(f"{path} holds hooks {store.hooks}: choose one with --hook")
        hook = store.hooks[0]
    store._check_hook(hook)
    n = len(store)
    n_held = min(held_rows, max(1, n // 10))
    held = torch.cat(list(store.rows(hook, n - n_held, n)))

    def stream(batch, buffer, seed, rank, world):
        return store.stream(
            hook, batch, buffer_rows=buffer, stop=n - n_held, seed=seed, rank=rank, world=world
        )

    return ActivationSource(hook, n - n_held, held, stream, str(path))


def _hold_out_tenth(toks: TokenizedPrompts, name: str) -> tuple[TokenizedPrompts, TokenizedPrompts]:
    """(training prompts, held-out prompts): the last tenth (at least one) held out."""
    n = toks.input_ids.shape[0]
    cut = n - max(1, n // 10)
    if cut < 1:
        raise SaediffError(f"{name}: {n} prompt(s) are too few to hold some out")
    return (
        TokenizedPrompts(toks.input_ids[:cut], toks.role[:cut]),
        TokenizedPrompts(toks.input_ids[cut:], toks.role[cut:]),
    )


def model_source(
    lm: LoadedModel, prompts: list[Prompt], hook: str, positions: Positions, name: str
) -> ActivationSource:
    """Rows read straight from a model over a prompt set, nothing written: the last tenth of the
    prompts is held out; every rank reads every prompt (seeded by its rank)."""
    check_positions(positions)
    toks = tokenize_prompts(lm, prompts)
    train, held_toks = _hold_out_tenth(toks, name)
    held = torch.cat(
        list(model_stream(lm, held_toks, hook, 1, positions=positions, buffer_rows=2**62, epochs=1))
    )

    def stream(batch, buffer, seed, rank, world):
        return model_stream(lm, train, hook, batch, positions=positions, buffer_rows=buffer, seed=seed + rank)

    return ActivationSource(hook, int(train.select(positions).sum()), held, stream, name)


def paired_source(
    lm_base: LoadedModel,
    lm_ft: LoadedModel,
    prompts: list[Prompt],
    hook: str,
    positions: Positions,
    name: str,
    difference: bool = False,
) -> ActivationSource:
    """``model_source`` over a base and a fine-tuned model at once: rows (batch, 2, d) of the same
    tokens (``[:, 0]`` base), or with ``difference`` the fine-tune minus the base (batch, d), for an
    SAE on activation differences. The last tenth of the prompts is held out."""
    check_positions(positions)
    check_same_tokenizer(lm_base, lm_ft)
    toks = tokenize_prompts(lm_base, prompts)
    train, held_toks = _hold_out_tenth(toks, name)
    out = (lambda r: r[:, 1] - r[:, 0]) if difference else (lambda r: r)
    held = out(
        torch.cat(
            list(
                paired_model_stream(
                    lm_base, lm_ft, held_toks, hook, 1, positions=positions, buffer_rows=2**62, epochs=1
                )
            )
        )
    )

    def stream(batch, buffer, seed, rank, world):
        return (
            out(r)
            for r in paired_model_stream(
                lm_base, lm_ft, train, hook, batch, positions=positions, buffer_rows=buffer, seed=seed + rank
            )
        )

    return ActivationSource(hook, int(train.select(positions).sum()), held, stream, name)
