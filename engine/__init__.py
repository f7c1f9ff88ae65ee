"""FIS engine: FIS-DiT inference for video diffusion transformers on diffusers pipelines.

The floors, bottom up (docs/architecture.md; enforced by the import-linter contracts in pyproject.toml):
  errors, compat       leaves: the engine's exceptions; everything private we use of diffusers and torch
  models/              one module per model family: all the engine knows about it
  hooks/               diffusers hooks attached from outside the model: FIS, attention backend, compile
  (parallel/)          sequence and CFG parallelism, a top-level package beside this one
  runtime/             one process, one request -> one video: the Worker
  bench/, testbed/     speed on real-size random weights; synthetic data, training, tiny pipelines
  serving/, evaluation/  HTTP API, job store, executors, batch; fidelity, the paper's probe, plots

The public names below are imported on first use, so `import engine` stays cheap and a lower floor (parallel/)
can import engine.models without pulling in the runtime.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "apply_fis": "engine.hooks.fis",
    "remove_fis": "engine.hooks.fis",
    "FISState": "engine.hooks.fis",
    "Worker": "engine.runtime.worker",
    "WorkerConfig": "engine.runtime.worker",
    "GenerationRequest": "engine.runtime.request",
    "prepare": "engine.runtime.setup",
    "UserError": "engine.errors",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
