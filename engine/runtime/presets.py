"""FIS presets: TOML files in configs/fis/, one per (model family, preset), user-editable."""

from __future__ import annotations

from pathlib import Path

from fis import FISConfig, FISConfigError

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "fis"
PRESETS = ("balanced", "fast")


def model_family(transformer_config) -> str:
    """Which preset family a transformer config belongs to (by architecture, not by name). HunyuanVideo 1.5
    configs have an integer patch_size plus patch_size_t, Wan's have ffn_dim; a size of the other
    architecture never picks up its presets. Anything else (the tiny test models): 'default'."""
    c = transformer_config
    dim = c["num_attention_heads"] * c["attention_head_dim"]
    wan, hunyuan = "patch_size_t" not in c, "ffn_dim" not in c
    if wan and c["num_layers"] == 40 and dim == 5120:
        return "wan-14b"
    if wan and c["num_layers"] == 30 and dim == 3072:
        return "wan-5b"
    if wan and c["num_layers"] == 30 and dim == 1536:
        return "wan-1.3b"
    if hunyuan and c["num_layers"] == 54 and dim == 2048:
        return "hunyuanvideo1.5-8b"
    return "default"


def load_fis(spec: str | None, family: str = "default") -> FISConfig | None:
    """'off'/None -> None; 'balanced'/'fast' -> the family's preset; anything else -> a TOML path."""
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
