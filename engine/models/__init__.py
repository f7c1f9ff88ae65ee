"""What the engine knows about each model family, one module per family (wan.py, hunyuan15.py), and the registry
that finds a family from a transformer. With engine/hooks, the only engine code parallel/ imports.

Adding a family = a new module here with a ModelFamily, listed in FAMILIES (docs/architecture.md).
"""

from __future__ import annotations

from .hunyuan15 import HUNYUAN_VIDEO_15
from .spec import BlockArgs, FISAdapter, ModelFamily, SliceRule, SPPlan
from .wan import WAN

FAMILIES: tuple[ModelFamily, ...] = (WAN, HUNYUAN_VIDEO_15)
_BY_CLASS = {f.transformer_class: f for f in FAMILIES}


def supported() -> str:
    return ", ".join(sorted(_BY_CLASS))


def family_of(transformer, what: str = "the engine has no model family") -> ModelFamily:
    """The family of a transformer (by its class); ValueError naming the supported ones otherwise."""
    name = type(transformer).__name__
    if name not in _BY_CLASS:
        raise ValueError(f"{what} for {name}; supported: {supported()}")
    return _BY_CLASS[name]


def is_supported(transformer) -> bool:
    return type(transformer).__name__ in _BY_CLASS


def adapter_for(transformer) -> FISAdapter:
    return family_of(transformer, "FIS has no adapter").adapter


def sp_plan_for(transformer) -> SPPlan:
    return family_of(transformer, "sequence parallelism has no plan").sp_plan


def transformers_of(pipe) -> list:
    """The denoisers of a pipeline: `transformer`, and Wan 2.2's low-noise expert `transformer_2`."""
    return [t for t in (getattr(pipe, "transformer", None), getattr(pipe, "transformer_2", None)) if t is not None]


def preset_family(config) -> str:
    """Which FIS preset family (configs/fis/<family>.<preset>.toml) a transformer config belongs to, by
    architecture and size, never by name; anything unknown (the tiny test models): 'default'."""
    for family in FAMILIES:
        if (name := family.preset_family(config)) is not None:
            return name
    return "default"


__all__ = [
    "FAMILIES",
    "BlockArgs",
    "FISAdapter",
    "ModelFamily",
    "SPPlan",
    "SliceRule",
    "adapter_for",
    "family_of",
    "is_supported",
    "preset_family",
    "sp_plan_for",
    "supported",
    "transformers_of",
]
