"""The on-disk activation store (safetensors shards per hook with an index, memory-mapped reads) and
the shuffling buffers that turn stored or streamed rows into SAE training batches."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from jaxtyping import Float

from saediff._io import atomic_save_safetensors, atomic_write_json
from saediff.errors import MissingFileError, SaediffError, UnknownKeyError

__all__ = ["SHARD_ROWS", "ActivationStore", "mixed_batches", "shuffled_batches"]

log = logging.getLogger(__name__)


SHARD_ROWS = 65536


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
                raise SaediffError(
                    f"activation shard {f}: {h} has shape {None if t is None else tuple(t.shape)}, "
                    f"expected ({shard['n']}, {self.d_model})"
                )
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

    def batches(
        self, hook: str, batch_size: int, *, seed: int = 0, epochs: int | None = None
    ) -> Iterator[Float[torch.Tensor, "batch d"]]:
        """Shuffled batches of one hook, over ``epochs`` passes (forever if None), all rows in memory."""
        return shuffled_batches(self.load(hook), batch_size, seed=seed, epochs=epochs)

    def rows(
        self, hook: str, start: int, stop: int, chunk: int = 8192
    ) -> Iterator[Float[torch.Tensor, "n d"]]:
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

    def stream(
        self,
        hook: str,
        batch_size: int,
        *,
        buffer_rows: int = 65536,
        stop: int | None = None,
        seed: int = 0,
        epochs: int | None = None,
        rank: int = 0,
        world: int = 1,
    ) -> Iterator[Float[torch.Tensor, "batch d"]]:
        """Shuffled batches of rows ``0:stop`` without loading the store: chunks of the shards (in a
        random order each pass) fill a mixing buffer of ``buffer_rows``; when it is full it is
        shuffled and its first half is served, the second half stays to mix with what comes next
        (as SAELens and dictionary_learning do). Memory: the buffer plus one chunk. Under
        ``torchrun`` each ``rank`` of ``world`` reads its own share of the chunks."""
        stop = len(self) if stop is None else stop
        if stop < batch_size or buffer_rows < 2 * batch_size:
            raise SaediffError(
                f"stream: {stop} rows and a buffer of {buffer_rows} for batches of {batch_size} "
                "(need rows >= batch and buffer >= 2 x batch)"
            )
        buffer_rows = min(buffer_rows, max(stop, 2 * batch_size))  # a small store: one pass fills the buffer
        gen = torch.Generator().manual_seed(seed)
        chunk = max(batch_size, buffer_rows // 4)
        spans = [(a, min(a + chunk, stop)) for a in range(0, stop, chunk)][rank::world]
        if not spans:
            raise SaediffError(
                f"stream: rank {rank} of {world} has no rows ({stop} rows in chunks of {chunk})"
            )

        def parts():
            epoch = 0
            while epochs is None or epoch < epochs:
                for j in torch.randperm(len(spans), generator=gen).tolist():
                    yield torch.cat(list(self.rows(hook, *spans[j], chunk=chunk)))
                epoch += 1

        return mixed_batches(parts(), batch_size, buffer_rows, gen)


def mixed_batches(
    parts: Iterator[torch.Tensor], batch_size: int, buffer_rows: int, gen: torch.Generator
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


def shuffled_batches(
    data: Float[torch.Tensor, "n d"], batch_size: int, *, seed: int = 0, epochs: int | None = None
) -> Iterator[Float[torch.Tensor, "batch d"]]:
    """Full batches of ``data`` in a fresh random order each pass (the last partial batch is dropped)."""
    gen = torch.Generator().manual_seed(seed)
    epoch = 0
    while epochs is None or epoch < epochs:
        perm = torch.randperm(data.shape[0], generator=gen)
        for i in range(0, data.shape[0] - batch_size + 1, batch_size):
            yield data[perm[i : i + batch_size]]
        epoch += 1


class _ShardWriter:
    """Buffers rows and writes fixed-size shards atomically; the manifest is written last."""

    def __init__(self, path: Path, hooks: list[str]):
        self.path, self.hooks = path, hooks
        path.mkdir(parents=True, exist_ok=True)
        self.buf: dict[str, list[torch.Tensor]] = {
            k: [] for k in [*hooks, "prompt_index", "position", "role"]
        }
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
        atomic_write_json(
            self.path / "manifest.json",
            {
                "kind": "saediff.activations",
                "saediff_version": __version__,
                "hooks": self.hooks,
                "d_model": d_model,
                "n_rows": sum(s["n"] for s in self.shards),
                "shards": self.shards,
                **meta,
            },
        )
        return ActivationStore(self.path)
