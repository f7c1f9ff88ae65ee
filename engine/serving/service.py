"""The video service behind the HTTP API: one replica's state — the job store, one executor (a worker group),
and the thread that runs queued jobs on it.

Ray-free: the executor comes from a factory (engine/serving/executor.py: the Executor protocol; the Ray worker
group of ray_executor.py, or LocalExecutor in one process), and raises GroupFailed when a rank is lost.
"""

from __future__ import annotations

import secrets
import threading
import time

from engine.errors import Cancelled, GroupFailed, UserError
from engine.runtime.io import mp4_bytes

from .config import ServeConfig
from .jobs import JobStore
from .schema import check_for, parse, request_from_dict


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
