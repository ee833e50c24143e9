"""Collect residual activations at TransformerLens hooks, in memory or into an on-disk store
(``activations.store``).

A store is a folder: ``manifest.json`` (kind, hooks, d_model, shards, model, adapter, positions)
plus ``shard_XXXXX.safetensors`` files holding, per hook, an (n, d_model) block, and an index
(``prompt_index``, ``position``, ``role``: 0 prompt / 1 response) per row. Reads are memory
mapped; ``ActivationStore.batches`` shuffles across shards for SAE training.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from jaxtyping import Float

from saediff import console
from saediff.activations.store import ActivationStore, _ShardWriter
from saediff.data.prompts import Prompt
from saediff.errors import SaediffError, UnknownKeyError
from saediff.models.hooks import decoder_layers, read_blocks, resid_post
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
    The forwards run at the model's own precision (``lm.precision``: a bf16 model runs under
    autocast); rows come back as ``dtype`` whatever it computed in.

    Residual-stream hooks (``blocks.L.hook_resid_post``, the usual case) are read with plain forward
    hooks on the HF model, the forward stopped after the deepest hooked block and no work spent that
    cannot reach a kept row (``_forward_rows``). Any other TransformerLens hook (``mlp.hook_post``,
    attention, resid_pre/mid), and every hook of the EM model organism (its figures were measured
    that way), goes through the TransformerLens bridge with ``names_filter`` and
    ``stop_at_layer`` (on a merged model). At ``hook_resid_post`` the two agree
    (``tests/test_activations.py::test_bridge_and_forward_hook_paths_agree``).

    With ``out`` the rows go to a store folder (written shard by shard, the manifest last) and the
    store is returned; otherwise a dict hook -> (n, d) tensor.
    """
    blocks = _resid_post_blocks(hooks)
    fast = blocks is not None and not _organism(lm)
    rows_of = _ResidRows(lm, blocks) if fast else _BridgeRows(lm, hooks)
    toks = prompts if isinstance(prompts, TokenizedPrompts) else tokenize_prompts(lm, prompts)
    keep = toks.select(positions)
    if not keep.any():
        raise SaediffError(f"no {positions!r} positions in these prompts (is there a response?)")
    chunks: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    writer = _ShardWriter(Path(out), hooks) if out is not None else None
    n_rows, d_model = 0, None
    for i in console.progress(
        range(0, toks.input_ids.shape[0], batch_size), desc="collect", enabled=progress
    ):
        if max_rows is not None and n_rows >= max_rows:
            break
        ids, attn, m = toks.batch(slice(i, i + batch_size), keep)
        m = _capped(m, n_rows, max_rows)
        n_rows += int(m.sum())
        batch = {h: r.to("cpu", dtype) for h, r in rows_of(ids, attn, m).items()}
        d_model = next(iter(batch.values())).shape[-1]
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
        return writer.close(d_model=int(d_model), meta=meta)
    return {h: torch.cat(c) for h, c in chunks.items()}


def _organism(lm: LoadedModel) -> bool:
    """Whether ``lm`` is the EM model organism's (its folder's ``saediff_organism.json``): its
    shipped SAE and figures were collected through the bridge, whose float rounding the
    forward-hook path does not reproduce bit for bit, so the organism keeps the bridge; every other
    model takes the forward hooks."""
    from saediff.models.precision import pinned_fp32

    return lm.spec.is_local and pinned_fp32(lm.spec.model)


def _resid_post_blocks(hooks: list[str]) -> list[int] | None:
    """The block of each hook when every hook is a ``blocks.L.hook_resid_post``, else None."""
    found = [_RESID_POST.match(h) for h in hooks]
    return [int(f.group(1)) for f in found] if found and all(found) else None


_RESID_POST = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")


class _BridgeRows:
    """Rows at any TransformerLens hook, through the bridge (``names_filter``, ``stop_at_layer``)."""

    def __init__(self, lm: LoadedModel, hooks: list[str]):
        self.tl, self.hooks, self.device = lm.bridge(), hooks, lm.device
        bad = [h for h in hooks if h not in self.tl.hook_dict]
        if bad:
            raise UnknownKeyError(
                f"hook(s) not in the model: {', '.join(bad)} (e.g. blocks.0.hook_resid_post)"
            )
        layers = [int(h.split(".")[1]) for h in hooks if h.startswith("blocks.")]
        self.stop = max(layers) + 1 if len(layers) == len(hooks) else None

    def __call__(self, ids, _attn, m) -> dict[str, torch.Tensor]:
        names = set(self.hooks)
        _, cache = self.tl.run_with_cache(
            ids.to(self.device), names_filter=lambda n: n in names, stop_at_layer=self.stop
        )
        return {h: cache[h][m.to(self.device)] for h in self.hooks}


class _ResidRows:
    """Rows at ``blocks.L.hook_resid_post`` from forward hooks on the HF model (``_forward_rows``)."""

    def __init__(self, lm: LoadedModel, blocks: list[int]):
        n = len(decoder_layers(lm.model))
        bad = [resid_post(b) for b in blocks if not 0 <= b < n]
        if bad:
            raise UnknownKeyError(
                f"hook(s) not in the model: {', '.join(bad)} (it has blocks 0-{n - 1}; "
                "e.g. blocks.0.hook_resid_post)"
            )
        self.model, self.blocks, self.device = lm.model, blocks, lm.device
        # a bridged model's attention no longer reads HF's KV cache, so no shared prefix there
        self.share_prefix = getattr(lm, "_bridge", None) is None
        self.prefix: tuple[tuple[int, ...], object] | None = None  # (prefix ids, its KV cache)

    def __call__(self, ids, attn, m) -> dict[str, torch.Tensor]:
        """The kept rows (mask ``m``) of a right-padded batch, in the batch's row-major order. Rows
        of like length run together (``_length_groups``), so short rows carry less padding."""
        ids, m = ids.to(self.device), m.to(self.device)
        cached = self._prefix_cache(ids, attn, m) if self.share_prefix else None
        groups = _length_groups(m)
        parts = [_forward_rows(self.model, self.blocks, ids[g], m[g], cached) for g in groups]
        rows = {b: torch.cat([p[b] for p in parts]) for b in self.blocks}
        if len(groups) > 1:  # back to the batch's order: row by row, position by position
            run = torch.cat(groups).cpu()
            counts = m.sum(1).cpu()
            starts = counts.cumsum(0) - counts
            where = torch.cat([torch.arange(starts[r], starts[r] + counts[r]) for r in run.tolist()])
            for b, r in rows.items():
                rows[b] = torch.empty_like(r).index_copy_(0, where.to(r.device), r)
        return {resid_post(b): rows[b] for b in self.blocks}

    def _prefix_cache(self, ids, attn, m):
        """The KV cache of the batch's shared prefix (up to its first kept position), computed
        once and reused while the next batches share it; None when there is none to share."""
        first_kept = int(m.any(0).int().argmax())
        p = min(_common_prefix(ids), first_kept, int(attn.sum(1).min()) - 1)
        if p < 1 or ids.shape[0] == 1:
            return None
        key = tuple(ids[0, :p].tolist())
        if self.prefix is None or self.prefix[0] != key:
            self.prefix = (key, _prefix_kv(self.model, max(self.blocks), ids[:1, :p]))
        return self.prefix[1]


_FORWARD_COST = 256
"""A forward's fixed cost in token positions, for ``_length_groups``: a batch splits where the
padding it saves is worth more than the extra forward."""


def _length_groups(m_BT: torch.Tensor) -> list[torch.Tensor]:
    """The batch's rows (indices, ascending) in groups of like length to run one forward each:
    each row needs its columns up to its last kept one; rows with none kept are left out (a
    batch with no kept row still runs its first row, so the blocks' widths are known). The split
    minimises padded positions plus ``_FORWARD_COST`` per group over the rows sorted by need
    (dynamic programming; a batch of equal rows stays one group)."""
    cols = torch.arange(m_BT.shape[1], device=m_BT.device)
    need = (torch.where(m_BT, cols, -1).max(1).values + 1).tolist()
    lengths = sorted({n for n in need if n > 0})  # a group always ends at one of these
    if len(lengths) <= 1:
        rows = [r for r, n in enumerate(need) if n > 0] or [0]
        return [torch.tensor(rows, device=m_BT.device)]
    below = [0]  # below[k]: how many rows need lengths[:k]
    for length in lengths:
        below.append(below[-1] + need.count(length))
    best, cut = [0], [0]  # best[k]: cost of the rows needing lengths[:k]; cut[k]: its last group's start
    for k in range(1, len(lengths) + 1):
        cost, i = min((best[i] + (below[k] - below[i]) * lengths[k - 1] + _FORWARD_COST, i) for i in range(k))
        best.append(cost)
        cut.append(i)
    groups, k = [], len(lengths)
    while k > 0:
        members = set(lengths[cut[k] : k])
        groups.append(torch.tensor([r for r, n in enumerate(need) if n in members], device=m_BT.device))
        k = cut[k]
    return groups[::-1]


def _common_prefix(ids: torch.Tensor) -> int:
    """How many leading columns of ``ids`` (B, T) are the same in every row."""
    same = (ids == ids[:1]).all(0)
    return int(same.int().cumprod(0).sum())


def _run_to(model, blocks: list[int], ids: torch.Tensor, read, **forward_kw) -> None:
    """``hooks.read_blocks`` without an attention mask (right padding: the causal mask gives the
    same rows), with forward keywords."""
    read_blocks(model, blocks, ids, None, read, **forward_kw)


@torch.no_grad()
def _prefix_kv(model, last: int, prefix_1P: torch.Tensor):
    """HF's KV cache of blocks ``0..last`` over one row of prefix tokens (1, P)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with _mlp_only_at(decoder_layers(model)[last], torch.zeros_like(prefix_1P, dtype=torch.bool)):
        _run_to(model, [last], prefix_1P, lambda *_: None, past_key_values=cache, use_cache=True)
    return cache


@torch.no_grad()
def _forward_rows(
    model, blocks: list[int], ids_BT: torch.Tensor, m_BT: torch.Tensor, prefix_kv=None
) -> dict[int, torch.Tensor]:
    """The outputs of decoder ``blocks`` at the kept positions ``m_BT`` of a right-padded batch,
    (n_kept, d) per block, skipping the work that cannot reach them:

    - columns after the last kept one are cut (a causal model's earlier positions never see them);
    - no attention mask: with right padding the causal mask already keeps padding out of every
      real position;
    - the deepest block's MLP runs only at the kept positions (its other outputs are never read);
    - with ``prefix_kv`` (``_prefix_kv`` of the batch's first P tokens, all rows alike) only the
      rest of the sequence is run, attending to the cached prefix.

    ``_forward_rows_plain`` is the reference (the whole batch, full forward)."""
    kept_cols = m_BT.any(0).nonzero()
    t = int(kept_cols.max()) + 1 if len(kept_cols) else 1
    ids_BT, m_BT = ids_BT[:, :t], m_BT[:, :t]
    kw = {}
    if prefix_kv is not None:
        p = prefix_kv.get_seq_length()
        kv = copy.deepcopy(prefix_kv)
        kv.batch_repeat_interleave(ids_BT.shape[0])
        ids_BT, m_BT, kw = ids_BT[:, p:], m_BT[:, p:], {"past_key_values": kv, "use_cache": True}
    out: dict[int, torch.Tensor] = {}
    with _mlp_only_at(decoder_layers(model)[max(blocks)], m_BT):
        _run_to(model, blocks, ids_BT, lambda b, h: out.__setitem__(b, h[m_BT]), **kw)
    return out


@torch.no_grad()
def _forward_rows_plain(model, blocks: list[int], ids_BT, attn_BT, m_BT) -> dict[int, torch.Tensor]:
    """Reference for ``_forward_rows``: the full forward of the batch with its attention mask."""
    out: dict[int, torch.Tensor] = {}
    read_blocks(model, blocks, ids_BT, attn_BT, lambda b, h: out.__setitem__(b, h[m_BT]))
    return out


@contextmanager
def _mlp_only_at(layer: torch.nn.Module, m_BT: torch.Tensor) -> Iterator[None]:
    """While inside, ``layer.mlp`` (position-wise) runs only at the positions ``m_BT`` and gives
    zeros elsewhere: for the deepest block read, whose other positions are never used. A layer
    without a plain ``mlp`` (one tensor in, one out) runs as it is."""
    mlp = getattr(layer, "mlp", None)
    if not isinstance(mlp, torch.nn.Module) or bool(m_BT.all()):
        yield
        return
    full, own = mlp.forward, vars(mlp).get("forward")  # own: a forward set on the instance (accelerate)

    def only_kept(x, *args, **kwargs):
        if args or kwargs or x.shape[:2] != m_BT.shape:
            return full(x, *args, **kwargs)
        y = full(x[m_BT])
        if not isinstance(y, torch.Tensor) or y.shape[-1] != x.shape[-1]:
            return full(x)  # e.g. an MoE block returning router logits too
        out = x.new_zeros(x.shape[:2] + y.shape[-1:], dtype=y.dtype)
        out[m_BT] = y
        return out

    mlp.forward = only_kept
    try:
        yield
    finally:
        if own is None:
            del mlp.forward
        else:
            mlp.forward = own


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
