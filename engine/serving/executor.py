"""Executors: what runs requests on a worker group, as vLLM's executors do (entrypoint -> service -> executor ->
worker). A worker group (one model replica) is the set of processes that make one video together: N GPUs, or on
CPU N gloo processes; every rank runs each request and the group's leader returns the video.

  Executor        the protocol VideoService and batch rendering drive: info, describe, run, health, shutdown
  GroupMember     one rank: a Worker driven by method name, with progress and cancellation for its driver
  LocalExecutor   a group of one, in this process (no Ray: `launch/serve.py --executor local`, tests)
  render_local    batch rendering under torchrun (or in one process): the world split into groups
  RayExecutor     engine/serving/ray_executor.py: actors in a placement group; the only module that imports Ray

The Worker sets up torch.distributed itself from torchrun's environment variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT; parallel.init_parallel): torchrun sets them, the Ray executor sets them in each actor.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from typing import Protocol

from engine.errors import UserError, one_line
from engine.runtime.io import mp4_bytes, to_uint8
from engine.runtime.request import GenerationRequest
from engine.runtime.timing import gpu_info
from engine.runtime.worker import Worker, WorkerConfig
from parallel import Degrees, destroy_parallel


class Executor(Protocol):
    """info (ModelInfo) and describe (dict) of the loaded model, then:"""

    info: object
    describe: dict

    def run(self, req: GenerationRequest, on_poll=None, fps: int | None = None) -> dict:
        """The leader's {'frames': uint8 [F, H, W, 3], 'metrics'}, or with `fps` {'video': mp4 bytes, 'metrics'}
        (encoded where the frames are). on_poll(step, steps) -> True cancels. Raises UserError / Cancelled as the
        ranks do; GroupFailed if a rank died (the group must then be shut down)."""

    def health(self) -> list[dict]:
        """Per rank: {'rank', 'alive', ...}."""

    def shutdown(self) -> None: ...


def ranks_of(cfg: WorkerConfig) -> int:
    """Processes per render group (a replica of parallel.Degrees; ulysses unset: 1)."""
    try:
        return Degrees(cfg=cfg.cfg_parallel, ulysses=1 if cfg.ulysses is None else cfg.ulysses, ring=cfg.ring).replica
    except ValueError as e:
        raise UserError(str(e)) from None


class GroupMember:
    def __init__(self, cfg: WorkerConfig):
        self.worker = Worker(cfg)
        self.worker.pipe.set_progress_bar_config(disable=True)  # progress goes to the driver, not to a log
        self.progress = (0, 0)  # (step, steps) of the current request; a Ray driver reads it from another thread
        self._cancel: str | None = None  # the job token a driver cancelled

    def run(self, req: GenerationRequest, job: str | None = None, on_step=None, fps: int | None = None) -> dict | None:
        """Generate on this rank. The leader returns {'frames': uint8 [F, H, W, 3], 'metrics'}, the others None;
        with `fps`, {'video': the mp4's bytes, 'metrics'} instead: the video is encoded here, beside its frames, so
        a 480p clip crosses to the replica and the store as a few MB of mp4, not ~100 MB of pixels.
        A run with a job token stops at the next step after cancel(job) (the Worker has every rank agree).
        on_step(k, n): after each step, in this process (it may raise Cancelled in a group of one)."""
        self.progress = (0, req.steps)
        cancel = None if job is None else (lambda: self._cancel == job)

        def step(k: int, n: int) -> None:
            self.progress = (k, n)
            if on_step is not None:
                on_step(k, n)

        try:
            out = self.worker.execute("generate", req, on_step=step, cancel=cancel, in_step=True)
        finally:
            self.progress = (0, 0)  # a driver polling before the next request starts must not see this one's
        if out["frames"] is None:
            return None
        frames = to_uint8(out["frames"])
        if fps is None:
            return {"frames": frames, "metrics": out["metrics"]}
        t0 = time.perf_counter()
        video = mp4_bytes(frames, fps)
        return {"video": video, "metrics": {**out["metrics"], "encode_s": time.perf_counter() - t0, "fps": fps}}

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


class LocalExecutor:
    """A worker group of one, in this process: the model loads here and requests run on the caller's thread, while
    a watcher thread polls (on_poll, like RayExecutor's driver: heartbeats, cancellation) every `poll_s`, so a
    cancel lands within a block of the step, not at its end."""

    def __init__(self, cfg: WorkerConfig, poll_s: float = 0.2):
        self.member = GroupMember(cfg)
        self.info, self.describe = self.member.worker.info, self.member.worker.describe()
        self.poll_s = poll_s

    def run(self, req: GenerationRequest, on_poll=None, fps: int | None = None) -> dict:
        job, done, member = secrets.token_hex(8), threading.Event(), self.member  # shutdown() may drop self.member

        def watch() -> None:
            while not done.wait(self.poll_s):
                if on_poll(*member.progress):
                    member.cancel(job)  # the Worker stops at its next block
                    return

        watcher = threading.Thread(target=watch, name="fis-poll", daemon=True)
        if on_poll is not None:
            watcher.start()
        try:
            return member.run(req, job, fps=fps)
        finally:
            done.set()
            if watcher.is_alive():
                watcher.join()

    def health(self) -> list[dict]:
        return [{"rank": 0, "alive": True, **self.member.health()}]

    def shutdown(self) -> None:
        self.member = None


def render_local(batch, cfg: WorkerConfig):
    """torchrun (or one process): the world is cfg.dp worker groups, lines dealt round-robin over them (`batch`:
    an engine.serving.batch.Batch).
    Every rank of a group runs each of its lines; the leader writes; rank 0 ends up with every outcome.
    Returns this process's parallel context."""
    import torch.distributed as dist

    member = GroupMember(cfg)
    ctx = member.worker.ctx
    ctx.barrier()  # every rank has planned before any rank writes: all saw the same complete lines
    group, groups = ctx.axis_rank("dp"), ctx.degrees.dp
    if ctx.is_main:
        batch.watch([i for n, i in enumerate(batch.pending) if n % groups != group])
    for item in batch.pending[group::groups]:
        try:
            result = member.run(batch.request(item, member.worker.info))
        except UserError as e:  # every rank of the group rejects the line alike
            if ctx.is_leader:
                batch.failed(item, str(e))
            continue
        except Exception as e:
            if ctx.degrees.replica > 1:
                raise  # the group's other ranks may wait in a collective: stop; a re-run resumes
            batch.failed(item, one_line(e))
            continue
        if ctx.is_leader:
            try:
                batch.done(item, result)
            except OSError as e:  # disk full, permissions: this line fails, the group goes on together
                batch.failed(item, f"cannot write the outputs: {e}")
    if ctx.is_distributed:
        parts = [None] * ctx.world_size if ctx.is_main else None
        dist.gather_object((batch.rendered, batch.errors), parts, dst=0)
        if ctx.is_main:
            batch.rendered = [i for done, _ in parts for i in done]
            batch.errors = [e for _, errors in parts for e in errors]
    destroy_parallel()
    return ctx
