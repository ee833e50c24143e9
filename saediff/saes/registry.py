"""The SAE registry (``saes/registry.yaml``): known pretrained SAEs and training presets."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from saediff.errors import UnknownKeyError

__all__ = ["preset", "registry"]


@lru_cache(maxsize=1)
def registry() -> dict:
    import yaml

    return yaml.safe_load(resources.files("saediff.data").joinpath("sae_registry.yaml").read_text())


def preset(name: str) -> dict:
    """Training settings of a preset (keys of ``SAETrainConfig``)."""
    presets = registry()["presets"]
    if name not in presets:
        raise UnknownKeyError(f"unknown SAE preset {name!r}; known: {', '.join(presets)}")
    return dict(presets[name])
