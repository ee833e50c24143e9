"""Collect residual activations at TransformerLens hooks, in memory or into an on-disk store
(``activations.store``).

A store is a folder: ``manifest.json`` (kind, hooks, d_model, shards, model, adapter, positions)
plus ``shard_XXXXX.safetensors`` files holding, per hook, an (n, d_model) block, and an index
(``prompt_index``, ``position``, ``role``: 0 prompt / 1 response) per row. Reads are memory
mapped; ``ActivationStore.batches`` shuffles across shards for SAE training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from jaxtyping import Float

from saediff import console
from saediff.activations.store import ActivationStore, _ShardWriter
from saediff.data.prompts import Prompt
from saediff.errors import SaediffError, UnknownKeyError
from saediff.models.hooks import resid_post
from saediff.models.loading import LoadedModel, chat_tokens

__all__ = [
    "POSITIONS",
    "Positions",
    "TokenizedPrompts",
    "check_positions",
    "collect_activations",
    "prompt_activations",
    "row_descriptions",
    "tokenize_prompts",
]

log = logging.getLogger(__name__)
Positions = Literal["last_prompt", "response", "all"]
POSITIONS: tuple[str, ...] = ("all", "response", "last_prompt")


def check_positions(positions: str) -> None:
    """Raise a one-line ValueError unless ``positions`` is one of :data:`POSITIONS`."""
    if positions not in POSITIONS:
        raise SaediffError(f"positions must be all, response or last_prompt, got {positions!r}")


@dataclass(frozen=True)
class TokenizedPrompts:
    """Right-padded token ids with a per-token role (-1 pad, 0 prompt, 1 response)."""

    input_ids: torch.Tensor  # (N, T)
    role: torch.Tensor  # (N, T)

    def select(self, positions: Positions) -> torch.Tensor:
        """Boolean (N, T) mask of the positions to keep."""
        check_positions(positions)
        if positions == "all":
            return self.role >= 0
        if positions == "response":
            return self.role == 1
        # last prompt token: the last role-0 position before the response (a template may write
        # prompt-role tokens after it, e.g. ChatML's newline after <|im_end|>)
        n, t = self.role.shape
        pos = torch.arange(t)
        first_response = torch.where(self.role == 1, pos, t).min(1).values
        is_prompt = ((self.role == 0) & (pos < first_response[:, None])).long()
        last = t - 1 - torch.argmax(is_prompt.flip(1), dim=1)
        mask = torch.zeros(n, t, dtype=torch.bool)
        mask[torch.arange(n), last] = True
        return mask & is_prompt.bool()

    def batch(
        self, rows: slice | torch.Tensor, keep: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask, keep)`` of ``rows``, cut to their longest prompt (the
        padding is on the right); ``keep`` is a (N, T) mask from ``select``."""
        role = self.role[rows]
        t = int((role >= 0).sum(1).max())
        return self.input_ids[rows, :t], (role[:, :t] >= 0).long(), keep[rows, :t]


def tokenize_prompts(lm: LoadedModel, prompts: list[Prompt]) -> TokenizedPrompts:
    """Render prompts with the chat template; a prompt with a ``response`` gets it as the final
    assistant turn (role 1), otherwise the generation prompt ends the sequence."""
    rows, roles = [], []
    for p in prompts:
        if p.response is not None:
            ids, mask = chat_tokens(lm.tokenizer, [*p.messages, {"role": "assistant", "content": p.response}])
        elif p.messages[-1]["role"] == "assistant":
            ids, mask = chat_tokens(lm.tokenizer, p.messages)
        else:
            text = lm.format_chat(p.messages)
            ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
            mask = [0] * len(ids)
        rows.append(ids)
        roles.append(mask)
    t = max(len(r) for r in rows)
    pad = lm.tokenizer.pad_token_id or 0
    input_ids = torch.full((len(rows), t), pad, dtype=torch.long)
    role = torch.full((len(rows), t), -1, dtype=torch.long)
    for i, (r, m) in enumerate(zip(rows, roles)):
        input_ids[i, : len(r)] = torch.tensor(r)
        role[i, : len(r)] = torch.tensor(m)
    return TokenizedPrompts(input_ids, role)


def row_descriptions(
    lm: LoadedModel,
    prompts: list[Prompt],
    toks: TokenizedPrompts,
    positions: Positions,
    which: list[int] | None = None,
    context: tuple[int, int] = (6, 2),
) -> list[dict]:
    """For each collected row (in collection order), or only the rows ``which``: prompt id,
    position, the token as text, and ``context`` (the text of up to ``context[0]`` tokens before
    it, the token in [brackets], and up to ``context[1]`` after; padding left out)."""
    rows, cols = toks.select(positions).nonzero(as_tuple=True)
    if which is not None:
        rows, cols = rows[which], cols[which]
    out = []
    for r, c in zip(rows.tolist(), cols.tolist()):
        n_real = int((toks.role[r] >= 0).sum())  # right-padded
        lo, hi = max(0, c - context[0]), min(n_real, c + 1 + context[1])
        ids = toks.input_ids[r].tolist()
        before, after = lm.tokenizer.decode(ids[lo:c]), lm.tokenizer.decode(ids[c + 1 : hi])
        token = lm.tokenizer.decode([ids[c]])
        out.append(
            {
                "prompt": prompts[r].id,
                "position": int(c),
                "token": token,
                "context": f"{before}[{token}]{after}".strip(),
            }
        )
    return out


# long: its signature and docstring; the code itself is 40 lines
@torch.no_grad()
def collect_activations(
    lm: LoadedModel,
    prompts: list[Prompt] | TokenizedPrompts,
    hooks: list[str],
    positions: Positions = "all",
    *,
    out: str | Path | None = None,
    batch_size: int = 64,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    max_rows: int | None = None,
) -> dict[str, torch.Tensor] | ActivationStore:
    """Activations at ``hooks`` for the chosen positions, in one pass per batch, stored as
    ``dtype`` (bfloat16 halves a store; reads come back as float32); at most ``max_rows`` rows.

    Runs the TransformerLens bridge with ``names_filter`` and ``stop_at_layer`` (after the
    deepest hooked block). With ``out`` the rows go to a store folder (written shard by shard, the
    manifest last) and the store is returned; otherwise a dict hook -> (n, d) tensor.

    Why two activation paths: this one reads any TransformerLens hook (``mlp.hook_post``,
    attention, resid_pre/mid) for analysis, on a merged model; ``hooks.capture_resid`` reads block
    outputs with plain forward hooks on the live (PEFT, training, bf16) model, which the bridge
    cannot wrap without renaming its parameters. At ``hook_resid_post`` they agree
    (``tests/test_activations.py::test_bridge_and_forward_hook_paths_agree``).
    """
    tl = lm.bridge()
    known = set(tl.hook_dict)
    bad = [h for h in hooks if h not in known]
    if bad:
        raise UnknownKeyError(f"hook(s) not in the model: {', '.join(bad)} (e.g. blocks.0.hook_resid_post)")
    toks = prompts if isinstance(prompts, TokenizedPrompts) else tokenize_prompts(lm, prompts)
    keep = toks.select(positions)
    if not keep.any():
        raise SaediffError(f"no {positions!r} positions in these prompts (is there a response?)")
    layers = [int(h.split(".")[1]) for h in hooks if h.startswith("blocks.")]
    stop = max(layers) + 1 if len(layers) == len(hooks) else None
    names = set(hooks)
    chunks: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    writer = _ShardWriter(Path(out), hooks) if out is not None else None
    device = lm.device
    n_rows = 0
    for i in console.progress(
        range(0, toks.input_ids.shape[0], batch_size), desc="collect", enabled=progress
    ):
        if max_rows is not None and n_rows >= max_rows:
            break
        ids, _, m = toks.batch(slice(i, i + batch_size), keep)
        m = _capped(m, n_rows, max_rows)
        n_rows += int(m.sum())
        _, cache = tl.run_with_cache(ids.to(device), names_filter=lambda n: n in names, stop_at_layer=stop)
        batch = {h: cache[h][m.to(device)].to("cpu", dtype) for h in hooks}
        if writer:
            writer.add(batch, _row_index(m, toks.role[i : i + batch_size, : ids.shape[1]], i))
        else:
            for h in hooks:
                chunks[h].append(batch[h])
    if writer:
        meta = {
            "model": lm.spec.model,
            "adapter": lm.spec.adapter,
            "positions": positions,
            "n_prompts": int(toks.input_ids.shape[0]),
        }
        return writer.close(d_model=int(next(iter(cache.values())).shape[-1]), meta=meta)
    return {h: torch.cat(c) for h, c in chunks.items()}


def _capped(m: torch.Tensor, n_rows: int, max_rows: int | None) -> torch.Tensor:
    """The batch's mask ``m`` (B, T) cut so that the rows so far (``n_rows``) do not pass ``max_rows``:
    the first rows up to the cap are kept."""
    if max_rows is not None and n_rows + int(m.sum()) > max_rows:
        flat = m.flatten().clone()
        flat[flat.nonzero()[max_rows - n_rows :, 0]] = False
        m = flat.view(m.shape)
    return m


def _row_index(m: torch.Tensor, role_BT: torch.Tensor, first: int) -> dict[str, torch.Tensor]:
    """A store's index of the batch's kept rows (mask ``m`` (B, T); the batch starts at prompt
    ``first``): each row's prompt, position and role."""
    rows, cols = m.nonzero(as_tuple=True)
    return {
        "prompt_index": (rows + first).int(),
        "position": cols.int(),
        "role": role_BT[m].to(torch.int8),
    }


def prompt_activations(
    lm,
    prompts: list,
    layers: list[int],
    positions: str = "last_prompt",
    *,
    batch_size: int = 64,
    progress: bool = True,
) -> dict[int, Float[torch.Tensor, "n d"]]:
    """One vector per prompt after each block in ``layers``, float32 on the CPU: the residual at
    the last prompt token (``last_prompt``: the generation prompt's end, where the answer starts),
    or the mean over the prompt's response tokens (``response``: prompts that carry an answer)."""
    if positions not in ("last_prompt", "response"):
        raise SaediffError(f"positions must be last_prompt or response, got {positions!r}")
    toks = tokenize_prompts(lm, prompts)
    acts = collect_activations(
        lm, toks, [resid_post(L) for L in layers], positions, batch_size=batch_size, progress=progress
    )
    if positions == "last_prompt":
        return {L: acts[resid_post(L)].float().cpu() for L in layers}
    row = toks.select("response").nonzero()[:, 0]  # the prompt of each collected row, in collection order
    counts = torch.bincount(row, minlength=len(prompts)).clamp_min(1)[:, None].float()
    out = {}
    for L in layers:
        a = acts[resid_post(L)].float().cpu()
        out[L] = torch.zeros(len(prompts), a.shape[1]).index_add_(0, row, a) / counts
    return out
