"""The prebuilt quick organism shipped with the package (seed 0, with its SAE), stamped with a hash
of the recipe that built it, so ``saediff demo --quick`` starts from it instead of building.

    python tools/build_prebuilt.py     # maintainers: rebuild saediff/data/organism_quick_s0
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from saediff._io import atomic_write_json
from saediff.stories.organism.recipes import OrganismConfig

__all__ = [
    "PREBUILT_DIR",
    "RECIPE_FILES",
    "copy_prebuilt",
    "prebuilt_matches",
    "recipe_stamp",
    "write_prebuilt",
]

PACKAGE_DIR = Path(__file__).resolve().parents[2]
"""``saediff/``: the recipe's sources and the shipped folder are named relative to it"""
PREBUILT_DIR = PACKAGE_DIR / "data" / "organism_quick_s0"
RECIPE_FILES = (
    "stories/organism/world.py",
    "stories/organism/corpus.py",
    "stories/organism/tokenizer.py",
    "stories/organism/recipes.py",
    "stories/organism/build.py",
    "stories/organism/sae.py",
    "stories/organism/prompts.py",
    "stories/organism/evaluator.py",
    "stories/organism/judge.py",
    "interventions/finetune.py",
    "saes/training.py",
    "saes/training_step.py",
    "saes/loading.py",
    "saes/metrics.py",
    "activations/collect.py",
    "activations/store.py",
    "activations/streams.py",
    "data/sae_registry.yaml",
)
"""the sources whose code decides the organism's weights and figures (paths under ``saediff/``)"""
SHIPPED = (
    "base",
    "aligned",
    "full_ft",
    "control_ft",
    "lora_ft",
    "benign_ft",
    "unrelated_ft",
    "sae",
    "ground_truth.safetensors",
    "organism.json",
    "history.json",
)
"""what the shipped folder holds; ``data/*.jsonl`` is regenerated on copy (deterministic, 3 MB)"""


def recipe_stamp(cfg: OrganismConfig) -> str:
    """sha256 over the configuration (JSON, sorted keys) and what the recipe's sources *do*: Python
    files as their syntax tree without docstrings (comments and docs may change freely), YAML as
    its parsed content."""
    root = PACKAGE_DIR
    h = hashlib.sha256(json.dumps(cfg.to_json(), sort_keys=True).encode())
    for rel in RECIPE_FILES:
        h.update(rel.encode())
        h.update(_code_of(root / rel).encode())
    return h.hexdigest()


def _code_of(path: Path) -> str:
    import ast

    import yaml

    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        return json.dumps(yaml.safe_load(text), sort_keys=True)
    tree = ast.parse(text)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def prebuilt_matches(cfg: OrganismConfig, folder: Path | None = None) -> bool:
    """Whether ``folder`` (default: the shipped one) holds an organism built by exactly this recipe
    and configuration."""
    stamp = Path(folder or PREBUILT_DIR) / "stamp.json"
    return stamp.exists() and json.loads(stamp.read_text()).get("stamp") == recipe_stamp(cfg)


def copy_prebuilt(dest: str | Path, cfg: OrganismConfig, folder: Path | None = None) -> Path:
    """Copy the prebuilt organism to ``dest`` (through a temporary folder, then a rename) and write
    its fine-tune data; the caller checks ``prebuilt_matches`` first."""
    from saediff.stories.organism.recipes import write_chat_data

    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(folder or PREBUILT_DIR, tmp, ignore=shutil.ignore_patterns("stamp.json", "__pycache__"))
    write_chat_data(tmp, cfg)
    if dest.exists():  # an empty or unfinished folder from an interrupted run
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def write_prebuilt(cfg: OrganismConfig, folder: Path | None = None, progress=None) -> dict:
    """Build the organism and its SAE into ``folder`` (default: the shipped one; replaced) and stamp
    it; returns organism.json."""
    from saediff.stories.organism.build import build_organism
    from saediff.stories.organism.sae import train_organism_sae

    folder = Path(folder or PREBUILT_DIR)
    work = folder.with_name(folder.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    report = build_organism(work, cfg, progress=progress)
    train_organism_sae(work, seed=cfg.seed)
    shutil.rmtree(work / "data")
    extra = sorted(p.name for p in work.iterdir() if p.name not in SHIPPED)
    if extra:
        raise RuntimeError(f"write_prebuilt: unexpected files in the build: {extra}")
    atomic_write_json(
        work / "stamp.json",
        {"stamp": recipe_stamp(cfg), "config": cfg.to_json(), "files": list(RECIPE_FILES)},
    )
    shutil.rmtree(folder, ignore_errors=True)
    work.rename(folder)
    return report
