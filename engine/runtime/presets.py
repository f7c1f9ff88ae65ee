"""FIS presets: TOML files, one per (model family, preset), shipped with the package in engine/configs/fis/ (the
checkout's configs/ points there) and user-editable: copy one and pass its path to --fis.

The six wan-* files equal default.* today; they are kept as each size's own starting point.
"""

from __future__ import annotations

from pathlib import Path

from fis import FISConfig, FISConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"  # package data: works from a wheel too
PRESET_DIR = CONFIG_DIR / "fis"
PRESETS = ("balanced", "fast", "quality")


def load_fis(spec: str | None, family: str = "default") -> FISConfig | None:
    """'off'/None -> None; 'balanced'/'fast'/'quality' -> the family's preset; anything else -> a TOML path."""
    if spec is None or spec.lower() in ("off", "none", "dense"):
        return None
    if spec.lower() in PRESETS:
        path = PRESET_DIR / f"{family}.{spec.lower()}.toml"
        if not path.exists():
            path = PRESET_DIR / f"default.{spec.lower()}.toml"
        cfg = FISConfig.from_toml(path)
        return cfg.replace(name=spec.lower())
    if spec.endswith(".toml") or Path(spec).exists():
        return FISConfig.from_toml(spec)
    raise FISConfigError(f"unknown FIS preset {spec!r}: use off, {', '.join(PRESETS)} or a path to a .toml file")


def build_fis(spec: str | None, family: str = "default", **overrides) -> FISConfig | None:
    """A preset with overrides on top (None values ignored). Overrides alone, with FIS off, start from
    'balanced': asking for a stride means asking for FIS. Used by the CLI, the HTTP API and manifests."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    fis = load_fis(spec, family)
    if fis is None and overrides:
        fis = load_fis("balanced", family)
    return None if fis is None else fis.replace(**overrides)
