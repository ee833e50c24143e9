"""Collect residual activations at TransformerLens hooks and keep them in an on-disk store.

A store is a folder: ``manifest.json`` (kind, hooks, d_model, shards, model, adapter, positions)
plus ``shard_XXXXX.safetensors`` files holding, per hook, an (n, d_model) block, and an index
(``prompt_index``, ``position``, ``role``: 0 prompt / 1 response) per row. Reads are memory
mapped; ``ActivationStore.batches`` shuffles across shards for SAE training.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal, NamedTuple

import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from saediff import _io
from saediff._io import atomic_save_safetensors, atomic_write_json
from saediff.models import LoadedModel, chat_tokens
from saediff.prompts import Prompt
from saediff.errors import MissingFileError, SaediffError, UnknownKeyError

__all__ = ["Positions", "POSITIONS", "check_positions", "ActivationStore", "collect_activations", "tokenize_prompts",
           "model_stream", "paired_model_stream", "paired_rows", "check_same_tokenizer",
           "TokenizedPrompts", "row_descriptions", "shuffled_batches", "ActivationSource", "store_source",
           "model_source", "paired_source"]

log = logging.getLogger(__name__)
Positions = Literal["last_prompt", "response", "all"]
POSITIONS: tuple[str, ...] = ("all", "response", "last_prompt")
SHARD_ROWS = 65536


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

    def batch(self, rows: slice | torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def row_descriptions(lm: LoadedModel, prompts: list[Prompt], toks: TokenizedPrompts, positions: Positions,
                     which: list[int] | None = None, context: tuple[int, int] = (6, 2)) -> list[dict]:
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
        out.append({"prompt": prompts[r].id, "position": int(c), "token": token,
                    "context": f"{before}[{token}]{after}".strip()})
    return out


class ActivationStore:
    """A folder of activation shards. ``load(hook)`` gives an (N, d) tensor; ``batches`` shuffles."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        mpath = self.path / "manifest.json"
        if not mpath.exists():
            raise MissingFileError(f"activation store {self.path}: manifest.json missing")
        try:
            self.manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise SaediffError(f"{mpath}: not valid JSON ({e})") from None
        if self.manifest.get("kind") != "saediff.activations":
            raise SaediffError(f"{mpath}: kind is {self.manifest.get('kind')!r}, not saediff.activations")
        if not self.manifest.get("shards"):
            raise SaediffError(f"activation store {self.path} is empty (no shards)")

    @property
    def hooks(self) -> list[str]:
        return list(self.manifest["hooks"])

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    def __len__(self) -> int:
        return sum(s["n"] for s in self.manifest["shards"])

    def _open(self, shard: dict) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        f = self.path / shard["file"]
        if not f.exists():
            raise MissingFileError(f"activation shard missing: {f}")
        try:
            tensors = load_file(str(f))  # safetensors memory-maps the file
        except (SafetensorError, OSError, ValueError) as e:
            raise SaediffError(f"activation shard {f} is corrupt ({e})") from None
        for h in self.hooks:
            t = tensors.get(h)
            if t is None or t.ndim != 2 or t.shape != (shard["n"], self.d_model):
                raise SaediffError(f"activation shard {f}: {h} has shape {None if t is None else tuple(t.shape)}, "
                                 f"expected ({shard['n']}, {self.d_model})")
        return tensors

    def _check_hook(self, hook: str) -> None:
        if hook not in self.hooks:
            raise UnknownKeyError(f"activation store {self.path} has no hook {hook!r}; it holds {self.hooks}")

    def load(self, hook: str) -> Float[torch.Tensor, "n d"]:
        """Every row of one hook, float32."""
        self._check_hook(hook)
        return torch.cat([self._open(s)[hook].float() for s in self.manifest["shards"]])

    def index(self) -> dict[str, torch.Tensor]:
        """Per row: ``prompt_index``, ``position``, ``role``."""
        parts = [self._open(s) for s in self.manifest["shards"]]
        return {k: torch.cat([p[k] for p in parts]) for k in ("prompt_index", "position", "role")}

    def batches(self, hook: str, batch_size: int, *, seed: int = 0, epochs: int | None = None
                ) -> Iterator[Float[torch.Tensor, "batch d"]]:
        """Shuffled batches of one hook, over ``epochs`` passes (forever if None), all rows in memory."""
        return shuffled_batches(self.load(hook), batch_size, seed=seed, epochs=epochs)

    def rows(self, hook: str, start: int, stop: int, chunk: int = 8192) -> Iterator[Float[torch.Tensor, "n d"]]:
        """Rows ``start:stop`` of one hook in order, ``chunk`` rows at a time, read lazily from the
        memory-mapped shards (only the requested slices are materialised)."""
        from safetensors import safe_open

        self._check_hook(hook)
        offset = 0
        for shard in self.manifest["shards"]:
            lo, hi = max(start, offset), min(stop, offset + shard["n"])
            if lo < hi:
                f = self.path / shard["file"]
                if not f.exists():
                    raise MissingFileError(f"activation shard missing: {f}")
                with safe_open(str(f), framework="pt") as st:
                    sl = st.get_slice(hook)
                    for a in range(lo - offset, hi - offset, chunk):
                        yield sl[a : min(a + chunk, hi - offset)].float()
            offset += shard["n"]

    def stream(self, hook: str, batch_size: int, *, buffer_rows: int = 65536, stop: int | None = None,
               seed: int = 0, epochs: int | None = None, rank: int = 0, world: int = 1
               ) -> Iterator[Float[torch.Tensor, "batch d"]]:
        """Shuffled batches of rows ``0:stop`` without loading the store: chunks of the shards (in a
        random order each pass) fill a mixing buffer of ``buffer_rows``; when it is full it is
        shuffled and its first half is served, the second half stays to mix with what comes next
        (as SAELens and dictionary_learning do). Memory: the buffer plus one chunk. Under
        ``torchrun`` each ``rank`` of ``world`` reads its own share of the chunks."""
        stop = len(self) if stop is None else stop
        if stop < batch_size or buffer_rows < 2 * batch_size:
            raise SaediffError(f"stream: {stop} rows and a buffer of {buffer_rows} for batches of {batch_size} "
                             "(need rows >= batch and buffer >= 2 x batch)")
        buffer_rows = min(buffer_rows, max(stop, 2 * batch_size))  # a small store: one pass fills the buffer
        gen = torch.Generator().manual_seed(seed)
        chunk = max(batch_size, buffer_rows // 4)
        spans = [(a, min(a + chunk, stop)) for a in range(0, stop, chunk)][rank::world]
        if not spans:
            raise SaediffError(f"stream: rank {rank} of {world} has no rows ({stop} rows in chunks of {chunk})")

        def parts():
            epoch = 0
            while epochs is None or epoch < epochs:
                for j in torch.randperm(len(spans), generator=gen).tolist():
                    yield torch.cat(list(self.rows(hook, *spans[j], chunk=chunk)))
                epoch += 1

        return mixed_batches(parts(), batch_size, buffer_rows, gen)


def mixed_batches(parts: Iterator[torch.Tensor], batch_size: int, buffer_rows: int, gen: torch.Generator
                  ) -> Iterator[Float[torch.Tensor, "batch d"]]:
    """The mixing buffer: row chunks from ``parts`` fill a buffer of ``buffer_rows``; when full it is
    shuffled, its first half is served in batches and the second half stays to mix with what comes
    next; when ``parts`` ends, what is left is shuffled and served (the partial batch dropped)."""
    buf = torch.empty(0)
    for part in parts:
        buf = part if buf.numel() == 0 else torch.cat([buf, part])
        if buf.shape[0] >= buffer_rows:
            buf = buf[torch.randperm(buf.shape[0], generator=gen)]
            n_out = (buf.shape[0] // 2) // batch_size * batch_size
            for i in range(0, n_out, batch_size):
                yield buf[i : i + batch_size]
            buf = buf[n_out:]
    if buf.numel():
        buf = buf[torch.randperm(buf.shape[0], generator=gen)]
        for i in range(0, buf.shape[0] - batch_size + 1, batch_size):
            yield buf[i : i + batch_size]


def model_stream(lm: LoadedModel, toks: TokenizedPrompts, hook: str, batch_size: int, *,
                 positions: Positions = "all", buffer_rows: int = 65536, prompt_batch: int = 32, seed: int = 0,
                 epochs: int | None = None) -> Iterator[Float[torch.Tensor, "batch d"]]:
    """Shuffled batches of activations at ``hook`` (``blocks.L.hook_resid_post``) read straight from
    ``lm`` over a prompt corpus, nothing written to disk: each pass runs the prompts in a random
    order (forward stopped at block L, forward hooks), and the rows go through the same mixing
    buffer as ``ActivationStore.stream``."""
    gen = torch.Generator().manual_seed(seed)
    parts = _model_parts([lm], toks, hook, toks.select(positions), gen, prompt_batch, epochs)
    return mixed_batches((p[:, 0] for p in parts), batch_size, buffer_rows, gen)


def paired_model_stream(lm_base: LoadedModel, lm_ft: LoadedModel, toks: TokenizedPrompts, hook: str, batch_size: int,
                        *, positions: Positions = "all", buffer_rows: int = 65536, prompt_batch: int = 32,
                        seed: int = 0, epochs: int | None = None) -> Iterator[Float[torch.Tensor, "batch 2 d"]]:
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
    if a.get_vocab() != b.get_vocab() or getattr(a, "chat_template", None) != getattr(b, "chat_template", None):
        raise SaediffError(f"{lm_a.spec.model} and {lm_b.spec.model} have different tokenizers or chat templates: "
                           "a paired read needs the same tokens in both models")


def paired_rows(lm_base: LoadedModel, lm_ft: LoadedModel, toks: TokenizedPrompts, hook: str, *,
                positions: Positions = "all", prompt_batch: int = 32) -> Iterator[Float[torch.Tensor, "rows 2 d"]]:
    """One pass of both models over the prompts in their order, rows in collection order (the
    order of ``toks.select(positions).nonzero()``, so ``row_descriptions`` names them)."""
    check_same_tokenizer(lm_base, lm_ft)
    return _model_parts([lm_base, lm_ft], toks, hook, toks.select(positions), None, prompt_batch, 1)


def _model_parts(lms: list[LoadedModel], toks: TokenizedPrompts, hook: str, keep: torch.Tensor,
                 gen: torch.Generator | None, prompt_batch: int, epochs: int | None
                 ) -> Iterator[Float[torch.Tensor, "rows models d"]]:
    """The kept rows of each prompt batch, in a fresh random prompt order each pass (in order
    without ``gen``), read from every model in ``lms`` (forward stopped at the hook's block), as
    (rows, len(lms), d) float32."""
    from saediff.hooks import capture_resid, parse_layer

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


def shuffled_batches(data: Float[torch.Tensor, "n d"], batch_size: int, *, seed: int = 0, epochs: int | None = None
                     ) -> Iterator[Float[torch.Tensor, "batch d"]]:
    """Full batches of ``data`` in a fresh random order each pass (the last partial batch is dropped)."""
    gen = torch.Generator().manual_seed(seed)
    epoch = 0
    while epochs is None or epoch < epochs:
        perm = torch.randperm(data.shape[0], generator=gen)
        for i in range(0, data.shape[0] - batch_size + 1, batch_size):
            yield data[perm[i : i + batch_size]]
        epoch += 1


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
    for i in tqdm(range(0, toks.input_ids.shape[0], batch_size), desc="collect", disable=_io.no_progress(progress), leave=False):
        if max_rows is not None and n_rows >= max_rows:
            break
        ids, _, m = toks.batch(slice(i, i + batch_size), keep)
        if max_rows is not None and n_rows + int(m.sum()) > max_rows:  # keep the first rows up to the cap
            flat = m.flatten().clone()
            flat[flat.nonzero()[max_rows - n_rows :, 0]] = False
            m = flat.view(m.shape)
        n_rows += int(m.sum())
        _, cache = tl.run_with_cache(ids.to(device), names_filter=lambda n: n in names, stop_at_layer=stop)
        batch = {h: cache[h][m.to(device)].to("cpu", dtype) for h in hooks}
        if writer:
            rows, cols = m.nonzero(as_tuple=True)
            writer.add(batch, {"prompt_index": (rows + i).int(), "position": cols.int(),
                               "role": toks.role[i : i + batch_size, : ids.shape[1]][m].to(torch.int8)})
        else:
            for h in hooks:
                chunks[h].append(batch[h])
    if writer:
        meta = {"model": lm.spec.model, "adapter": lm.spec.adapter, "positions": positions,
                "n_prompts": int(toks.input_ids.shape[0])}
        return writer.close(d_model=int(next(iter(cache.values())).shape[-1]), meta=meta)
    return {h: torch.cat(c) for h, c in chunks.items()}


class _ShardWriter:
    """Buffers rows and writes fixed-size shards atomically; the manifest is written last."""

    def __init__(self, path: Path, hooks: list[str]):
        self.path, self.hooks = path, hooks
        path.mkdir(parents=True, exist_ok=True)
        self.buf: dict[str, list[torch.Tensor]] = {k: [] for k in [*hooks, "prompt_index", "position", "role"]}
        self.n_buf = 0
        self.shards: list[dict] = []

    def add(self, batch: dict[str, torch.Tensor], index: dict[str, torch.Tensor]) -> None:
        for k, v in {**batch, **index}.items():
            self.buf[k].append(v)
        self.n_buf += next(iter(index.values())).shape[0]
        if self.n_buf >= SHARD_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self.n_buf == 0:
            return
        name = f"shard_{len(self.shards):05d}.safetensors"
        tensors = {k: torch.cat(v).contiguous() for k, v in self.buf.items()}
        atomic_save_safetensors(tensors, self.path / name)
        self.shards.append({"file": name, "n": self.n_buf})
        self.buf = {k: [] for k in self.buf}
        self.n_buf = 0

    def close(self, d_model: int, meta: dict) -> ActivationStore:
        from saediff import __version__

        self._flush()
        atomic_write_json(self.path / "manifest.json", {
            "kind": "saediff.activations", "saediff_version": __version__, "hooks": self.hooks,
            "d_model": d_model, "n_rows": sum(s["n"] for s in self.shards), "shards": self.shards, **meta})
        return ActivationStore(self.path)


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
        return store.stream(hook, batch, buffer_rows=buffer, stop=n - n_held, seed=seed, rank=rank, world=world)

    return ActivationSource(hook, n - n_held, held, stream, str(path))


def _hold_out_tenth(toks: TokenizedPrompts, name: str) -> tuple[TokenizedPrompts, TokenizedPrompts]:
    """(training prompts, held-out prompts): the last tenth (at least one) held out."""
    n = toks.input_ids.shape[0]
    cut = n - max(1, n // 10)
    if cut < 1:
        raise SaediffError(f"{name}: {n} prompt(s) are too few to hold some out")
    return (TokenizedPrompts(toks.input_ids[:cut], toks.role[:cut]),
            TokenizedPrompts(toks.input_ids[cut:], toks.role[cut:]))


def model_source(lm: LoadedModel, prompts: list[Prompt], hook: str, positions: Positions, name: str) -> ActivationSource:
    """Rows read straight from a model over a prompt set, nothing written: the last tenth of the
    prompts is held out; every rank reads every prompt (seeded by its rank)."""
    check_positions(positions)
    toks = tokenize_prompts(lm, prompts)
    train, held_toks = _hold_out_tenth(toks, name)
    held = torch.cat(list(model_stream(lm, held_toks, hook, 1, positions=positions, buffer_rows=2**62, epochs=1)))

    def stream(batch, buffer, seed, rank, world):
        return model_stream(lm, train, hook, batch, positions=positions, buffer_rows=buffer, seed=seed + rank)

    return ActivationSource(hook, int(train.select(positions).sum()), held, stream, name)


def paired_source(lm_base: LoadedModel, lm_ft: LoadedModel, prompts: list[Prompt], hook: str, positions: Positions,
                  name: str, difference: bool = False) -> ActivationSource:
    """``model_source`` over a base and a fine-tuned model at once: rows (batch, 2, d) of the same
    tokens (``[:, 0]`` base), or with ``difference`` the fine-tune minus the base (batch, d), for an
    SAE on activation differences. The last tenth of the prompts is held out."""
    check_positions(positions)
    check_same_tokenizer(lm_base, lm_ft)
    toks = tokenize_prompts(lm_base, prompts)
    train, held_toks = _hold_out_tenth(toks, name)
    out = (lambda r: r[:, 1] - r[:, 0]) if difference else (lambda r: r)
    held = out(torch.cat(list(paired_model_stream(lm_base, lm_ft, held_toks, hook, 1, positions=positions,
                                                  buffer_rows=2**62, epochs=1))))

    def stream(batch, buffer, seed, rank, world):
        return (out(r) for r in paired_model_stream(lm_base, lm_ft, train, hook, batch, positions=positions,
                                                    buffer_rows=buffer, seed=seed + rank))

    return ActivationSource(hook, int(train.select(positions).sum()), held, stream, name)
