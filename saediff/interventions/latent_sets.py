"""The latents a BLOCK-EM run holds: the paper's signed sets, read from a diff run, a
``latents.json`` or drawn at random as the control."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from saediff.errors import MissingFileError, SaediffError

__all__ = ["LatentSets", "latents_from_diff", "random_latents", "read_latents"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatentSets:
    """The BLOCK-EM paper's signed sets: ``low`` (K+, rose in the fine-tune: held down) and
    ``high`` (K-, fell: held up). ``sae``: the identity of the SAE the indices belong to
    (``provenance.sae_fingerprint``), when the source recorded it; ``source`` names that source."""

    low: tuple[int, ...] = ()
    high: tuple[int, ...] = ()
    sae: dict | None = field(default=None, compare=False)
    source: str = field(default="given", compare=False)

    def __post_init__(self):
        if set(self.low) & set(self.high):
            raise SaediffError(
                f"latents {sorted(set(self.low) & set(self.high))} are in both the low and high sets"
            )

    def check(self, sae, where: str) -> None:
        """The indices fit ``sae`` (loaded from ``where``) and, when the sets know their SAE, it is
        that SAE: another SAE's latent 17 is an unrelated feature."""
        d_sae = sae.cfg.d_sae
        bad = [i for i in (*self.low, *self.high) if not 0 <= i < d_sae]
        if bad:
            raise SaediffError(f"{where}: latents {bad} outside the SAE's 0-{d_sae - 1}")
        if self.sae is None:
            log.warning(
                "latents from %s carry no SAE identity; trusting that they are %s's", self.source, where
            )
            return
        from saediff.models.provenance import mismatch, sae_fingerprint

        keys = ("hook", "d_sae", "d_in", "weights")
        mine = sae_fingerprint(sae, where)
        why = mismatch({k: self.sae.get(k) for k in keys}, {k: mine.get(k) for k in keys})
        if why is not None:
            raise SaediffError(
                f"latents from {self.source} belong to the SAE {self.sae.get('path', '?')}, not to "
                f"{where} ({why})"
            )

    def __len__(self) -> int:
        return len(self.low) + len(self.high)


def latents_from_diff(run_dir: str | Path, n_low: int, n_high: int) -> LatentSets:
    """The ``n_low`` latents ranked first by the diff run's ranking among those that rose, and the
    ``n_high`` that fell most (by delta), with the run's SAE identity. Under ``abs_delta`` a latent
    that fell ranks high too; its sign decides its set."""
    from saediff.methods.sae_diff import LatentDiff

    run_dir = Path(run_dir)
    path = run_dir / "diff.json"
    if not path.exists():
        raise MissingFileError(f"{run_dir} has no diff.json (a run folder of saediff diff)")
    run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    info = run.get("steps", {}).get("diff", {})
    table = LatentDiff.from_json(json.loads(path.read_text()))
    rose = [i for i in table.top(table.delta.numel(), info.get("ranking", "delta")) if table.delta[i] > 0]
    fell = [i for i in table.bottom(n_high, "delta") if table.delta[i] < 0] if n_high else []
    return LatentSets(tuple(rose[:n_low]), tuple(fell), sae=info.get("sae_identity"), source=str(run_dir))


def read_latents(path: str | Path) -> LatentSets:
    """``latents.json`` (``saediff discover`` writes it, with the SAE it screened): ``{"low": [...],
    "high": [...], "sae_identity": {...}}``; a hand-written file may leave the identity out."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise MissingFileError(f"latents file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise SaediffError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(d, dict) or not all(isinstance(d.get(k, []), list) for k in ("low", "high")):
        raise SaediffError(f'{path}: expected {{"low": [latent, ...], "high": [latent, ...]}}')
    sets = LatentSets(
        tuple(int(i) for i in d.get("low", [])),
        tuple(int(i) for i in d.get("high", [])),
        sae=d.get("sae_identity"),
        source=str(path),
    )
    if not len(sets):
        raise SaediffError(f"{path}: no latents in 'low' or 'high'")
    return sets


def random_latents(like: LatentSets, d_sae: int, seed: int) -> LatentSets:
    """As many random latents per set as ``like`` has, none of them in ``like`` (the control)."""
    g = torch.Generator().manual_seed(seed + 99)
    chosen = set(like.low) | set(like.high)
    pool = [i for i in torch.randperm(d_sae, generator=g).tolist() if i not in chosen]
    n = len(like.low)
    return LatentSets(tuple(pool[:n]), tuple(pool[n : n + len(like.high)]))
