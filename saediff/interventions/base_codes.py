"""The base model's codes of the blocked latents on every training row, computed once per sweep.

A BLOCK-EM penalty compares the trained model's codes with the base model's on the same tokens.
The base side depends only on the row, the base model, the SAE and the latents, not on training:
``BaseCodes`` computes it once per row (the forward stopped at the SAE's block, in the precision
training runs under) and every run of a sweep, every epoch, every lambda and the random controls
read it back, instead of a second partial forward per step (the adapter disabled, or a frozen
copy of the blocks up to the SAE for a full fine-tune, which then is not built at all).

The codes live in a folder (``codes.npy``: (tokens, latents) float32, every token of every row;
``offsets.npy``: each row's first token and length; ``base_codes.json``: what made them), read
through a memory map above ``in_memory_max_bytes``, so memory stays bounded however large the
data. A batch finds its rows by their tokens (a digest of each row's unpadded ids), so any
sampler, shuffling, ``accelerate`` shard or resumed run gets the right rows. A folder is reused
only when its fingerprint (model, data, SAE, block, latents, precision) matches.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch

from saediff import _io, console
from saediff.errors import SaediffError

__all__ = ["BaseCodes", "row_key"]

log = logging.getLogger(__name__)
KIND = "saediff.base_codes"


def row_key(ids: torch.Tensor | list[int]) -> bytes:
    """Digest of one row's unpadded token ids (the key a batch finds its cached codes by)."""
    arr = np.asarray(ids.tolist() if torch.is_tensor(ids) else ids, dtype=np.int64)
    return hashlib.blake2b(arr.tobytes(), digest_size=16).digest()


class BaseCodes:
    """Cached base codes: ``lookup`` gives a batch's (B, T, n) codes of the latents asked for."""

    def __init__(
        self,
        codes,
        offsets: np.ndarray,
        latents: list[int],
        keys: dict[bytes, int],
        fingerprint: dict,
        folder: Path | None = None,
    ):
        self.codes, self.offsets, self.latents = codes, offsets, list(latents)  # codes: (N_tokens, n_latents)
        self._col = {i: c for c, i in enumerate(self.latents)}
        self._keys, self.fingerprint, self.folder = keys, fingerprint, folder

    def covers(self, idx: list[int] | tuple[int, ...]) -> bool:
        return all(i in self._col for i in idx)

    def columns(self, idx: list[int] | tuple[int, ...]) -> list[int]:
        missing = [i for i in idx if i not in self._col]
        if missing:
            raise SaediffError(
                f"base codes at {self.folder}: latents {missing[:5]} were not cached "
                f"(cached: {len(self.latents)} latents)"
            )
        return [self._col[i] for i in idx]

    def lookup(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cols: list[int],
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """(B, T, len(cols)) base codes of a right-padded batch on its device; 0 on padding."""
        B, T = input_ids.shape
        lengths = attention_mask.sum(1).tolist() if attention_mask is not None else [T] * B
        out = np.zeros((B, T, len(cols)), dtype=np.float32)
        ids_cpu = input_ids.cpu()
        for b, n in enumerate(lengths):
            row = self._keys.get(row_key(ids_cpu[b, :n]))
            if row is None:
                raise SaediffError(
                    f"base codes at {self.folder}: a batch row of {n} tokens is not among the "
                    f"{len(self._keys)} cached rows (another data set or tokenizer?)"
                )
            start, length = self.offsets[row]
            if length != n:
                raise SaediffError(
                    f"base codes at {self.folder}: row {row} has {length} cached tokens, the batch {n}"
                )
            out[b, :n] = self.codes[start : start + n][:, cols]
        return torch.from_numpy(out).to(input_ids.device, dtype)

    @classmethod
    def build(
        cls,
        model: torch.nn.Module,
        dataset,
        sae,
        layer: int,
        latents: list[int],
        folder: str | Path,
        *,
        fingerprint: dict,
        preactivation: bool = True,
        autocast: torch.dtype | None = None,
        batch_size: int = 16,
        in_memory_max_bytes: int = 2**28,
        progress: bool = True,
    ) -> BaseCodes:
        """The codes of ``latents`` on every row of ``dataset`` (items with ``input_ids``), from
        ``model`` as it enters training (a PEFT model: with its adapter disabled), under
        ``autocast`` (the training's mixed precision, None: none; ``fingerprint`` must name what
        decides it). A folder holding the same ``fingerprint`` is read back instead (nothing is
        computed)."""
        folder = Path(folder)
        fp = {**fingerprint, "latents": sorted(set(latents)), "preactivation": preactivation}
        found = cls.load(folder, dataset, fp, in_memory_max_bytes)
        if found is not None:
            log.info("base codes reused from %s", folder)
            return found
        cols = fp["latents"]
        rows = [list(item["input_ids"]) for item in dataset]
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        offsets = np.stack([np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths], 1)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".codes.{id(fp)}.npy.tmp"
        codes = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=np.float32, shape=(int(lengths.sum()), len(cols))
        )
        order = np.argsort(-lengths, kind="stable")  # long rows together: little padding
        device = next(model.parameters()).device
        sae.to(device)
        disabled = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
        with (
            torch.no_grad(),
            disabled,
            torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None),
        ):
            for i in console.progress(range(0, len(rows), batch_size), desc="base codes", enabled=progress):
                chunk = order[i : i + batch_size]
                ids, attn = _padded([rows[r] for r in chunk], lengths[chunk])
                z = _codes(model, sae, layer, ids.to(device), attn.to(device), cols, preactivation)
                z = z.float().cpu().numpy()  # (b, t, n)
                for j, r in enumerate(chunk):
                    start, n = offsets[r]
                    codes[start : start + n] = z[j, :n]
        codes.flush()
        del codes
        _publish(
            folder,
            tmp,
            offsets,
            {"kind": KIND, "fingerprint": fp, "rows": len(rows), "tokens": int(lengths.sum())},
        )
        return cls.load(folder, dataset, fp, in_memory_max_bytes)

    @classmethod
    def load(
        cls, folder: str | Path, dataset, fingerprint: dict, in_memory_max_bytes: int = 2**28
    ) -> BaseCodes | None:
        """The cached codes in ``folder`` if they were made with ``fingerprint``, else None."""
        folder = Path(folder)
        meta = _io.read_json_if_exists(folder / "base_codes.json")
        if meta is None or meta.get("kind") != KIND or _norm(meta.get("fingerprint")) != _norm(fingerprint):
            return None
        if not (folder / "codes.npy").is_file() or not (folder / "offsets.npy").is_file():
            return None
        big = (folder / "codes.npy").stat().st_size > in_memory_max_bytes
        codes = np.load(folder / "codes.npy", mmap_mode="r" if big else None, allow_pickle=False)
        offsets = np.load(folder / "offsets.npy", allow_pickle=False)
        if len(offsets) != len(dataset):
            return None
        keys = {row_key(list(item["input_ids"])): i for i, item in enumerate(dataset)}
        return cls(codes, offsets, fingerprint["latents"], keys, fingerprint, folder)


def _codes(
    model, sae, layer: int, ids: torch.Tensor, attn: torch.Tensor, cols: list[int], preactivation: bool
):
    from saediff.interventions.blocking import latent_codes
    from saediff.models.hooks import capture_resid

    r = capture_resid(model, [layer], ids, attn)[layer]
    return latent_codes(sae, r.to(sae.W_enc.dtype), cols, preactivation)


def _norm(obj):
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _save_npy(path: str, arr: np.ndarray) -> None:
    with open(path, "wb") as f:  # a path ending in .tmp would get .npy appended by np.save
        np.save(f, arr, allow_pickle=False)


def _padded(rows: list[list[int]], lengths: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` of token ids right-padded with 0 into (b, t) ids and their attention mask."""
    t = int(lengths.max())
    ids = torch.zeros((len(rows), t), dtype=torch.long)
    attn = torch.zeros((len(rows), t), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, : lengths[j]], attn[j, : lengths[j]] = torch.tensor(r), 1
    return ids, attn


def _publish(folder: Path, tmp: Path, offsets: np.ndarray, meta: dict) -> None:
    """The finished codes (written to ``tmp``) put in place beside ``offsets.npy``, and
    ``base_codes.json`` (``meta``) last: a folder without it is never read."""
    _io._atomic(folder / "offsets.npy", lambda p: _save_npy(p, offsets))
    Path(tmp).replace(folder / "codes.npy")
    _io.atomic_write_json(folder / "base_codes.json", meta)
