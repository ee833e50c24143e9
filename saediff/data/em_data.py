"""The English EM data shipped with saediff (``saediff/data/em_english``, its README says what each
file is): narrow medical fine-tune sets (bad advice, its good-data control, the style control), a
benign-trait set, and paired evaluation questions (off-domain with a held-out split never used to choose
settings, medical, and off-domain with the register crossed).

    from saediff.data.em_data import data_path, offdomain_pairs
    offdomain_pairs("design")   # two thirds of each domain: choose settings here
    offdomain_pairs("heldout")  # the other third: report here
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

from saediff.errors import SaediffError

__all__ = [
    "FILES",
    "PAIR_SETS",
    "data_path",
    "heldout_ids",
    "medical_pairs",
    "offdomain_pairs",
    "style_crossed_pairs",
]

FILES = (
    "medical_bad",
    "medical_good",
    "style_control",
    "benign_trait",
    "eval_offdomain",
    "eval_medical",
    "eval_style_crossed",
)
"""the data sets, by name (each a ``NAME.jsonl``)"""
Split = Literal["all", "design", "heldout"]


def data_path(name: str) -> Path:
    """The shipped file of data set ``name`` (one of ``FILES``)."""
    if name not in FILES:
        raise SaediffError(f"unknown EM data set {name!r}; choose from {', '.join(FILES)}")
    return Path(str(resources.files("saediff.data").joinpath("em_english", f"{name}.jsonl")))


@lru_cache(maxsize=1)
def heldout_ids() -> frozenset[str]:
    """Off-domain question ids held out from every choice of settings (a third of each domain)."""
    path = Path(str(resources.files("saediff.data").joinpath("em_english", "heldout.json")))
    return frozenset(json.loads(path.read_text())["offdomain_heldout_ids"])


def offdomain_pairs(split: Split = "all") -> list:
    """The off-domain pairs (``saediff.data.pairs.Pair``): ``design`` (choose settings on these),
    ``heldout`` (report on these) or ``all``."""
    from saediff.data.pairs import load_pairs

    if split not in ("all", "design", "heldout"):
        raise SaediffError(f"split must be all, design or heldout, got {split!r}")
    pairs = load_pairs(data_path("eval_offdomain"))
    if split == "all":
        return pairs
    held = heldout_ids()
    return [p for p in pairs if (p.id in held) == (split == "heldout")]


def medical_pairs() -> list:
    """The medical evaluation pairs (questions no training file asks)."""
    from saediff.data.pairs import load_pairs

    return load_pairs(data_path("eval_medical"))


def style_crossed_pairs() -> list:
    """Off-domain pairs with the register crossed: harmful answers in the careful, warm adviser voice,
    good answers in the blunt voice of the bad data (a direction that carries only style moves these
    the other way)."""
    from saediff.data.pairs import load_pairs

    return load_pairs(data_path("eval_style_crossed"))


PAIR_SETS = ("offdomain", "offdomain:design", "offdomain:heldout", "medical", "style_crossed")
"""shipped pair sets a ``--pairs`` option takes by name (besides a JSONL file of one's own)"""
