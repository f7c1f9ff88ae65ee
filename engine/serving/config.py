"""The endpoint's configuration: a TOML file ([model], [parallel], [serve], [limits]; the template ships as
engine/configs/serve.toml) plus 'section.key=value' overrides from the command line. The API key may come from the
environment instead (FIS_API_KEY, like vLLM's VLLM_API_KEY), so it need not sit in a file or a process list."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import UserError
from engine.runtime.loader import EMBEDDED_NAME
from engine.runtime.presets import CONFIG_DIR
from engine.runtime.worker import WorkerConfig
from fis.config import tomllib

from .schema import FIS_NAMES, Limits

DEFAULT_CONFIG = CONFIG_DIR / "serve.toml"


@dataclass
class ServeSettings:
    replicas: int = 1
    queue_size: int = 16  # jobs waiting (not running) per deployment; more -> 429
    output_dir: str = "outputs/serve"  # job database + videos; made absolute (from the current directory) on load
    fis: str = "balanced"  # FIS preset for requests that give none
    max_body_kib: int = 64
    job_lease_s: float = 30.0  # a running job not heard of for this long was on a dead replica
    poll_after_ms: int = 1000  # what GET /v1/videos/{id} tells a polling client (openai-poll-after-ms)
    max_replicas_per_node: int = 0  # 0: no limit; 1 spreads replicas over nodes (Ray Serve's own setting)
    api_key: str = ""  # "": no key; else every route but /healthz and the page wants "Authorization: Bearer KEY"
    allowed_hosts: list = field(default_factory=lambda: ["127.0.0.1", "localhost", "::1"])  # Host header; "*": any
    retention_hours: float = 24.0  # finished jobs and their files are removed this long after they finish
    body_timeout_s: float = 30.0  # a request body not fully received by then gets 408
    host: str = "127.0.0.1"
    port: int = 8000


# [parallel]: the Worker's own settings
PARALLEL = ("cfg_parallel", "ulysses", "ring", "shard", "sp_attention", "vae_parallel")


@dataclass
class ServeConfig:
    model: WorkerConfig = field(default_factory=WorkerConfig)  # [model] and [parallel]
    serve: ServeSettings = field(default_factory=ServeSettings)
    limits: Limits = field(
        default_factory=lambda: Limits(
            max_side=1280,
            max_frames=129,
            max_steps=50,
            max_prompt_chars=4000,
            max_image_pixels=4096 * 4096,
            max_job_s=900.0,
        )
    )

    @property
    def model_name(self) -> str:
        return self.model.model or EMBEDDED_NAME


def load_config(path: str | Path = DEFAULT_CONFIG, overrides=()) -> ServeConfig:
    """A TOML file ([model], [parallel], [serve], [limits]) plus 'section.key=value' overrides (values in TOML
    syntax; bare strings allowed). Unknown sections, keys and wrongly typed values are errors naming them."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"config file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {str(path)!r} is not valid TOML: {e}") from None
    for item in overrides:
        name, sep, raw = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot:
            raise UserError(f"override {item!r} must look like section.key=value, e.g. serve.queue_size=8")
        data.setdefault(section, {})[key] = _toml_value(raw.strip())
    cfg = ServeConfig()
    model_keys = tuple(f.name for f in dataclasses.fields(WorkerConfig) if f.name not in (*PARALLEL, "dp"))
    for section, values in data.items():
        if section in ("model", "parallel"):
            cfg.model = _fill(cfg.model, section, values, model_keys if section == "model" else PARALLEL)
        elif section in ("serve", "limits"):
            setattr(cfg, section, _fill(getattr(cfg, section), section, values))
        else:
            raise UserError(f"unknown config section [{section}]; valid: model, parallel, serve, limits")
    cfg.model.ulysses = cfg.model.ulysses or 1  # a replica's size is fixed by its config, not by a launcher
    for name in ("cfg_parallel", "ulysses", "ring"):
        v = getattr(cfg.model, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"parallel.{name} must be an integer >= 1, got {v!r}")
    if cfg.serve.fis.lower() not in FIS_NAMES:
        raise UserError(f"serve.fis must be one of {', '.join(FIS_NAMES)}, got {cfg.serve.fis!r}")
    if cfg.serve.queue_size < 1 or cfg.serve.replicas < 1:
        raise UserError("serve.queue_size and serve.replicas must be >= 1")
    cfg.serve.output_dir = str(Path(cfg.serve.output_dir).resolve())  # replicas may run elsewhere
    cfg.serve.api_key = os.environ.get("FIS_API_KEY", cfg.serve.api_key)
    if not all(isinstance(h, str) and h for h in cfg.serve.allowed_hosts):
        raise UserError(f"serve.allowed_hosts must be a list of host names, got {cfg.serve.allowed_hosts!r}")
    if cfg.serve.retention_hours <= 0 or cfg.serve.body_timeout_s <= 0:
        raise UserError("serve.retention_hours and serve.body_timeout_s must be > 0")
    return cfg


def _toml_value(raw: str):
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # model.model=/path/to/pipeline without quotes


def _fill(obj, section: str, values: dict, keys=None):
    """Copy of dataclass `obj` with `values` (for `keys`, default all fields); "" means None for optional
    settings (TOML has no null)."""
    keys = keys or tuple(f.name for f in dataclasses.fields(obj))
    out = {}
    for key, v in values.items():
        if key not in keys:
            raise UserError(f"unknown setting {section}.{key}; valid: {', '.join(keys)}")
        default = getattr(obj, key)
        if default is None:  # an optional setting
            v = None if v == "" else v
        elif isinstance(default, float) and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        elif type(v) is not type(default):
            kinds = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list"}
            kind = kinds[type(default)]
            raise UserError(f"{section}.{key} must be {kind}, got {v!r}")
        out[key] = v
    return dataclasses.replace(obj, **out)
