"""One interface for every direction-finding method, after diffing-toolkit's ``DiffingMethod``.

A method is a subclass of :class:`DiffingMethod` in its own module under ``saediff/methods/``; the
registry finds it there (every module of the package is imported once, on first use), so adding a
method is one new module and one test. Given a fine-tune pair and what it needs (:class:`MethodInputs`:
the two loaded models, the block, prompts, contrast examples, the diff run's directions and SAE
size), a method returns its candidate directions at that block, best first, with their provenance
(:class:`Candidates`). The head-to-head, ``saediff export``, the report and the dashboard iterate
over :func:`registry` instead of naming methods.

    from saediff.methods.base import registry
    [m.name for m in registry()]   # the head-to-head's rows, in its order
"""

from __future__ import annotations

import importlib
import pkgutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from saediff.errors import SaediffError
from saediff.methods.directions import Direction

__all__ = [
    "Candidates",
    "DiffingMethod",
    "MethodConfig",
    "MethodInputs",
    "diff_run_candidate",
    "get_method",
    "method_names",
    "method_of_tag",
    "registry",
]


@dataclass(frozen=True)
class MethodConfig:
    """The knobs of the methods that train or read something of their own (widths and k not given
    follow the diff run's SAE: ``MethodInputs.sae_size``)."""

    crosscoder_latents: int | None = None
    """None: twice the diff run's SAE's width (a latent per model's feature)"""
    crosscoder_k: int | None = None
    """None: the diff run's SAE's k (the sparsity the run already chose for this block)"""
    crosscoder_steps: int = 2000
    diff_sae_latents: int | None = None
    """None: the diff run's SAE's width"""
    diff_sae_k: int | None = None
    """None: the diff run's SAE's k"""
    diff_sae_steps: int = 2000
    batch_size: int = 512
    lr: float = 3e-3
    adl_k: int = 5
    """answer positions the ADL reads"""
    positions: str = "response"
    """tokens of the prompts the crosscoder and the diff-SAE train on"""
    seed: int = 0


@dataclass
class MethodInputs:
    """What a method may use on one fine-tune pair at one block. ``paired_rows`` (the same tokens
    read from both models, shuffled by ``cfg.seed``) is read once, on first use, and its seconds
    are charged in equal parts to the methods that use it (``read_seconds``)."""

    lm_base: object
    """``LoadedModel`` of the base model"""
    lm_ft: object
    """``LoadedModel`` of the fine-tune"""
    layer: int
    """the block (``blocks.{layer}.hook_resid_post``)"""
    prompts: list
    contrast: list
    """question / misaligned / aligned examples (persona vector)"""
    cfg: MethodConfig
    sae_size: dict
    """the diff run's SAE: ``d_sae`` and ``k``"""
    diff_directions: dict[str, Direction] = field(default_factory=dict)
    """the diff run's exported directions, by name"""
    diff_info: dict = field(default_factory=dict)
    """the diff run's ``run.json`` step (``top_latents``, ``seconds``, ...)"""
    run_dir: Path | None = None
    """the diff run's folder (its answers: the mean differences rebuild their estimators from them
    for the label-permuted null)"""
    in_context: object | None = None
    """how the diff run's in-context direction was built (``in_context.InContextSource``), for its
    label-permuted null; None: rebuilt from the run's questions and ``contrast``, and kept only
    when it reproduces the run's direction"""
    _rows: torch.Tensor | None = None
    read_seconds: float = 0.0

    @property
    def hook(self) -> str:
        return f"blocks.{self.layer}.hook_resid_post"

    def paired_rows(self) -> torch.Tensor:
        """(n, 2, d) rows of ``prompts`` at ``cfg.positions``, base model first, shuffled."""
        if self._rows is None:
            from saediff.activations.collect import tokenize_prompts
            from saediff.activations.streams import paired_rows

            t = time.perf_counter()
            toks = tokenize_prompts(self.lm_base, self.prompts)
            rows = torch.cat(
                list(paired_rows(self.lm_base, self.lm_ft, toks, self.hook, positions=self.cfg.positions))
            )
            self._rows = rows[
                torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(self.cfg.seed))
            ]
            self.read_seconds = time.perf_counter() - t
        return self._rows


@dataclass(frozen=True)
class Candidates:
    """A method's answer at one block: its directions, best first (empty when it found none, and
    ``detail`` says why), the seconds it cost, what a reader needs to judge the row, and, for a
    method of the mean-difference family, its estimator with the labels permuted."""

    directions: tuple[Direction, ...]
    seconds: float | None
    detail: dict = field(default_factory=dict)
    permuted: Callable[[int], torch.Tensor] | None = None
    """seed -> the best direction's estimator on the same data with the two labels (misaligned /
    aligned, or fine-tune / base) swapped within each question or prompt at random: the steering
    protocol's label-permuted null (``steer_null``); None where the method has no per-question
    pairing (``detail["permuted_null"]`` says why, where the method could have had one)"""

    @property
    def best(self) -> Direction | None:
        return self.directions[0] if self.directions else None


class DiffingMethod:
    """A way of finding a candidate EM direction. Subclasses set the class attributes and
    implement :meth:`find`; the rest have defaults."""

    name: ClassVar[str]
    """the registry key and the head-to-head's row name"""
    summary: ClassVar[str]
    """one line: what the method computes"""
    order: ClassVar[int]
    """position in the head-to-head's table (the diff run's methods first)"""
    tags: ClassVar[tuple[str, ...]] = ()
    """the ``Direction.method`` values this method writes into export folders"""
    from_diff_run: ClassVar[bool] = False
    """computed by ``saediff diff`` in one pass (its seconds are shared by every such method)"""
    uses_paired_rows: ClassVar[bool] = False
    """reads ``MethodInputs.paired_rows`` (charged a share of its seconds)"""
    results_file: ClassVar[str | None] = None
    """the file this method's own command writes into its run folder (``has_results``)"""

    def find(self, inputs: MethodInputs) -> Candidates:
        raise NotImplementedError

    def has_results(self, folder: str | Path) -> bool:
        """Whether ``folder`` holds this method's own run (its command's output)."""
        return self.results_file is not None and (Path(folder) / self.results_file).exists()

    def keeps(self, direction: Direction, run_info: dict, top: int) -> bool:
        """Whether ``saediff export`` keeps one of this method's directions of a diff run (all, by default)."""
        return True

    def card_data(self, folder: str | Path, lm=None) -> list[dict] | None:
        """Per-latent cards of this method's run in ``folder`` for the dashboard (None: no cards)."""
        return None

    def figures(self, folder: str | Path) -> list[tuple[str, object, str]]:
        """(title, plotly figure, note) for the report, from this method's results in ``folder``."""
        return []

    @staticmethod
    def timed(fn: Callable[[], Candidates]) -> Candidates:
        """``fn()`` with its seconds filled in where it left them None."""
        t = time.perf_counter()
        res = fn()
        if res.seconds is not None:
            return res
        return Candidates(res.directions, time.perf_counter() - t, res.detail, res.permuted)


def diff_run_candidate(inputs: MethodInputs, names: tuple[str, ...]) -> Candidates:
    """The first of ``names`` the diff run exported (for the diff run's own methods), with the
    diff run's seconds; a note when it exported none of them."""
    hit = next((inputs.diff_directions[n] for n in names if n in inputs.diff_directions), None)
    if hit is None:
        return Candidates((), None, {"note": "not in the diff run"})
    return Candidates((hit,), inputs.diff_info.get("seconds"))


_IMPORTED: list[bool] = []


def registry() -> list[DiffingMethod]:
    """Every registered method (each concrete subclass of ``DiffingMethod`` that sets ``name``), in
    the head-to-head's order. On first use every module of ``saediff.methods`` is imported, so a
    new method module registers itself by existing."""
    if not _IMPORTED:
        import saediff.methods as pkg

        for mod in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{pkg.__name__}.{mod.name}")
        _IMPORTED.append(True)
    found: dict[str, DiffingMethod] = {}
    for cls in _subclasses(DiffingMethod):
        if "name" in cls.__dict__:
            if cls.name in found:
                raise SaediffError(f"two methods are named {cls.name!r}")
            found[cls.name] = cls()
    return sorted(found.values(), key=lambda m: (m.order, m.name))


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def method_names() -> tuple[str, ...]:
    return tuple(m.name for m in registry())


def get_method(name: str) -> DiffingMethod:
    """The registered method ``name`` (one line naming the known ones when there is none)."""
    for m in registry():
        if m.name == name:
            return m
    raise SaediffError(f"unknown method {name!r}; choose from {', '.join(method_names())}")


def method_of_tag(tag: str) -> DiffingMethod | None:
    """The method that writes directions tagged ``tag`` (``Direction.method``), if one is registered."""
    return next((m for m in registry() if tag in m.tags), None)
