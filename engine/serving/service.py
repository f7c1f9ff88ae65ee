"""The video service behind the HTTP API: its configuration, and one replica's state — the job store, one
worker group, and the thread that runs queued jobs on that group.

Ray-free: the worker group comes from a factory (engine.serving.ray_executor builds Ray actor groups), so this file
only knows that a group has `info`, `describe`, `run(request, on_poll)`, `health()` and `shutdown()`, and
raises GroupFailed when a rank is lost.
"""

from __future__ import annotations

import dataclasses
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine.runtime.io import mp4_bytes
from engine.runtime.loader import EMBEDDED_NAME
from engine.runtime.request import UserError
from engine.runtime.worker import Cancelled, WorkerConfig

from .executor import GroupFailed
from .jobs import JobStore
from .schema import FIS_NAMES, Limits, check_for, parse, request_from_dict

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = ROOT / "configs" / "serve.toml"


@dataclass
class ServeSettings:
    replicas: int = 1
    queue_size: int = 16  # jobs waiting (not running) per deployment; more -> 429
    output_dir: str = "outputs/serve"  # job database + videos; made absolute (from the current directory) on load
    fis: str = "balanced"  # FIS preset for requests that give none
    max_body_kib: int = 64
    job_lease_s: float = 30.0  # a running job not heard of for this long was on a dead replica
    host: str = "127.0.0.1"
    port: int = 8000


PARALLEL = ("cfg_parallel", "ulysses", "ring", "shard", "sp_attention")  # [parallel]: the Worker's own settings


@dataclass
class ServeConfig:
    model: WorkerConfig = field(default_factory=WorkerConfig)  # [model] and [parallel]
    serve: ServeSettings = field(default_factory=ServeSettings)
    limits: Limits = field(default_factory=lambda: Limits(max_side=1280, max_frames=129, max_steps=50))

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
            kind = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[type(default)]
            raise UserError(f"{section}.{key} must be {kind}, got {v!r}")
        out[key] = v
    return dataclasses.replace(obj, **out)


class VideoService:
    """One replica. Requests are validated on submit against the model (same checks as the Worker), queued in
    the job store, and run one at a time on this replica's worker group by a background thread."""

    def __init__(self, config: ServeConfig, make_group, store=None):
        self.config = config
        self.store = store if store is not None else JobStore(config.serve.output_dir)  # or a remote one
        self.owner = secrets.token_hex(8)  # marks the jobs this replica runs
        self._make_group = make_group
        self.group = make_group()  # a model that cannot load fails the replica's start, loudly
        self.info, self.describe = self.group.info, self.group.describe
        self.group_error: str | None = None
        self._wake, self._stop = threading.Event(), threading.Event()
        self._last_sweep = 0.0
        self._thread = threading.Thread(target=self._loop, name="fis-jobs", daemon=True)
        self._thread.start()

    # ---- API -----------------------------------------------------------------------------------------------
    def submit(self, body) -> dict:
        """Validate (FieldError) and queue (QueueFull) a request body; returns the job record."""
        req, _ = parse(body, self.config.limits, self.config.serve.fis, self.info.family)
        req = check_for(req, self.info)
        record = self.store.submit(req.to_dict(), self.config.serve.queue_size)
        self._wake.set()
        return record

    def health(self) -> tuple[bool, dict]:
        group = self.group
        workers = group.health() if group is not None else []
        running = self._thread.is_alive()
        ok = running and group is not None and all(w["alive"] for w in workers)
        error = (
            None
            if ok
            else (
                "the job runner stopped (see the replica log)"
                if not running
                else self.group_error or "the worker group is starting"
            )
        )
        counts = self.store.counts()
        return ok, {
            "status": "ok" if ok else "unavailable",
            "model": self.config.model_name,
            "workers": workers,
            "error": error,
            "queue": {
                "queued": counts["queued"],
                "running": counts["running"],
                "capacity": self.config.serve.queue_size,
            },
        }

    def close(self) -> None:
        """Replica shutdown: its running job is reported interrupted now, then the workers go."""
        self._stop.set()
        self._wake.set()
        self.store.interrupt(self.owner)
        if self.group is not None:
            self.group.shutdown()

    # ---- the runner thread ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sweep()
            if self.group is None and not self._rebuild():
                self._stop.wait(5.0)  # the model failed to come back; keep the queue, retry
                continue
            job = self.store.claim(self.owner)
            if job is None:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            self._run(*job)

    def _sweep(self) -> None:
        """Jobs left running by a replica that died: failed (interrupted) once their lease ran out."""
        lease = self.config.serve.job_lease_s
        if time.monotonic() - self._last_sweep >= lease / 4:
            self._last_sweep = time.monotonic()
            self.store.expire(lease)

    def _run(self, job_id: str, request: dict) -> None:
        req = request_from_dict(request)
        t0 = time.time()
        try:
            result = self.group.run(req, lambda k, n: self.store.heartbeat(job_id, k))
            t1 = time.time()
            self.store.save_outputs(job_id, mp4_bytes(result["frames"]), {**result["metrics"], "id": job_id})
        except Cancelled:
            self.store.finish(job_id, "cancelled", "cancelled by the client")
        except UserError as e:
            self.store.finish(job_id, "failed", str(e))
        except GroupFailed as e:
            self.store.finish(job_id, "failed", f"{e}; the worker group is being restarted")
            group, self.group = self.group, None  # the loop builds a new one before the next job
            group.shutdown()
        except Exception as e:  # e.g. a full disk: this job fails, the service goes on
            self.store.finish(job_id, "failed", f"{type(e).__name__}: {e}")
        else:
            m = result["metrics"]
            timings = {
                "run_s": t1 - t0,
                "write_s": time.time() - t1,
                **{k: m[k] for k in ("latency_s", "text_encode_s", "denoise_s", "decode_s")},
            }
            self.store.finish(job_id, "completed", timings=timings)

    def _rebuild(self) -> bool:
        if self._stop.is_set():
            return False
        try:
            group = self._make_group()
        except Exception as e:  # reported on /healthz; the jobs stay queued
            self.group_error = f"worker group failed to start: {type(e).__name__}: {e}"
            return False
        if self._stop.is_set():  # close() ran while the group was starting: it would hold its GPUs forever
            group.shutdown()
            return False
        self.group, self.group_error = group, None
        return True
