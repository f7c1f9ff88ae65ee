"""One rank of a render group, as Ray worker actors and torchrun batch rendering both drive it.

A render group (a model replica) is the set of processes that make one video together: N GPUs, or on CPU
N gloo processes. The Worker sets up torch.distributed itself from torchrun's environment variables
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; parallel.init_parallel): torchrun sets them, a Ray
worker group sets them in each actor. Every rank runs each request; the group's leader returns the video.
"""

from __future__ import annotations

import os

from engine.runtime.io import to_uint8
from engine.runtime.request import GenerationRequest, UserError
from engine.runtime.timing import gpu_info
from engine.runtime.worker import Worker, WorkerConfig
from parallel import Degrees


def ranks_of(cfg: WorkerConfig) -> int:
    """Processes per render group (a replica of parallel.Degrees; ulysses unset: 1)."""
    try:
        return Degrees(cfg=cfg.cfg_parallel, ulysses=1 if cfg.ulysses is None else cfg.ulysses, ring=cfg.ring).replica
    except ValueError as e:
        raise UserError(str(e)) from None


class GroupFailed(RuntimeError):
    """A rank died, or failed in a way that may leave the others waiting in a collective: the job fails with
    this reason and the group is rebuilt."""


class GroupMember:
    def __init__(self, cfg: WorkerConfig):
        self.worker = Worker(cfg)
        self.worker.pipe.set_progress_bar_config(disable=True)  # progress goes to the driver, not to a log
        self.progress = (0, 0)  # (step, steps) of the current request; a Ray driver reads it from another thread
        self._cancel: str | None = None  # the job token a driver cancelled

    def run(self, req: GenerationRequest, job: str | None = None) -> dict | None:
        """Generate on this rank. The leader returns {'frames': uint8 [F, H, W, 3], 'metrics'}, the others None.
        A run with a job token stops at the next step after cancel(job) (the Worker has every rank agree)."""
        self.progress = (0, req.steps)
        cancel = None if job is None else (lambda: self._cancel == job)
        try:
            out = self.worker.execute("generate", req, on_step=self._on_step, cancel=cancel)
        finally:
            self.progress = (0, 0)  # a driver polling before the next request starts must not see this one's
        if out["frames"] is None:
            return None
        return {"frames": to_uint8(out["frames"]), "metrics": out["metrics"]}

    def cancel(self, job: str) -> None:
        self._cancel = job

    def health(self) -> dict:
        return {
            "pid": os.getpid(),
            "device": str(self.worker.device),
            "step": self.progress[0],
            "steps": self.progress[1],
            "gpu": gpu_info(self.worker.device),
        }

    def _on_step(self, k: int, n: int) -> None:
        self.progress = (k, n)
