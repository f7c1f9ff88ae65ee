"""The video service behind the HTTP API: one replica's state — the job store, one executor (a worker group),
and the thread that runs queued jobs on it.

Ray-free: the executor comes from a factory (engine/serving/executor.py: the Executor protocol; the Ray worker
group of ray_executor.py, or LocalExecutor in one process), and raises GroupFailed when a rank is lost.

What clients see of a failure is its kind and a sentence (a dead rank by its number, a bad request by the engine's
own message); process ids, addresses, actor names and library exceptions go to the replica's log only. A running
job is stopped after limits.max_job_s (failed, deadline_exceeded), within a block of its step (runtime/worker.py).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time

from engine.errors import Cancelled, GroupFailed, UserError

from .config import ServeConfig
from .jobs import CANCELLED, JobStore
from .schema import build, request_from_dict

log = logging.getLogger("fis.serve")
PUBLIC_WORKER = ("rank", "alive", "device", "step", "steps", "gpu")  # what /healthz shows of a rank


class VideoService:
    """One replica. Requests are validated on submit against the model (same checks as the Worker), queued in
    the job store, and run one at a time on this replica's worker group by a background thread."""

    def __init__(self, config: ServeConfig, make_group, store=None):
        self.config = config
        retention = config.serve.retention_hours * 3600
        self.store = store if store is not None else JobStore(config.serve.output_dir, retention)  # or a remote one
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
        """Validate (FieldError, ModelNotFound) and queue (QueueFull) a request body (a JSON object, or a form as
        schema.form_body makes it); returns the video object."""
        c = self.config
        parsed = build(body, c.limits, c.serve.fis, self.info, c.model_name)
        meta = {"model": c.model_name, "fps": self.info.fps, "fis_source": parsed.fis_source, "notes": parsed.notes}
        record = self.store.submit(parsed.request.to_dict(), c.serve.queue_size, meta)
        self._wake.set()
        return record

    def health(self) -> tuple[bool, dict]:
        group = self.group
        workers = group.health() if group is not None else []
        workers = [{k: w[k] for k in PUBLIC_WORKER if k in w} for w in workers]
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

    def _poll(self, job_id: str, step: int) -> bool:
        """While a job runs: its heartbeat (True if the client cancelled it), and the sweep for jobs of replicas
        that died meanwhile (a long job must not keep them 'running' until it ends)."""
        self._sweep()
        return self.store.heartbeat(job_id, step)

    def _sweep(self) -> None:
        """Jobs left running by a replica that died: failed (interrupted) once their lease ran out; finished jobs
        past the retention: removed with their files."""
        lease = self.config.serve.job_lease_s
        if time.monotonic() - self._last_sweep >= min(lease / 4, 60.0):
            self._last_sweep = time.monotonic()
            self.store.expire(lease)
            self.store.purge()

    def _run(self, job_id: str, request: dict) -> None:
        req = request_from_dict(request)
        notes = (self.store.get(job_id) or {}).get("fis", {}).get("notes", [])
        t0 = time.time()
        limit = self.config.limits.max_job_s
        late = []

        def poll(k: int, n: int) -> bool:
            if limit and time.time() - t0 > limit:
                late.append(True)
                return True  # stopped like a cancel, reported as what it is
            return self._poll(job_id, k)

        try:
            result = self.group.run(req, poll, fps=self.info.fps)
            t1 = time.time()
            m = result["metrics"]
            if notes:
                m = {**m, "notes": [*m.get("notes", []), *notes]}
            self.store.save_outputs(job_id, result["video"], {**m, "id": job_id})
        except Cancelled:
            if late:
                message = f"stopped after {limit:g} s: the server's limit per job (limits.max_job_s)"
                self.store.finish(job_id, "failed", message, code="deadline_exceeded")
            else:
                self.store.finish(job_id, "cancelled", CANCELLED)
        except UserError as e:
            self.store.finish(job_id, "failed", str(e), code="invalid_request")
        except GroupFailed as e:
            log.error("job %s: worker group failed: %s", job_id, e)
            self.store.finish(job_id, "failed", f"{e}; the worker group is being restarted", code="worker_failed")
            group, self.group = self.group, None  # the loop builds a new one before the next job
            group.shutdown()
        except Exception as e:  # e.g. a full disk: this job fails, the service goes on
            log.exception("job %s failed", job_id)
            self.store.finish(job_id, "failed", f"internal error ({type(e).__name__}); see the replica's log")
        else:
            timings = {
                "run_s": t1 - t0,
                "write_s": time.time() - t1,
                **{k: m[k] for k in ("latency_s", "text_encode_s", "denoise_s", "decode_s", "encode_s")},
            }
            self.store.finish(job_id, "completed", timings=timings, meta={"speedup_estimate": m["speedup_estimate"]})

    def _rebuild(self) -> bool:
        if self._stop.is_set():
            return False
        try:
            group = self._make_group()
        except Exception as e:  # reported on /healthz; the jobs stay queued
            log.error("worker group failed to start: %s: %s", type(e).__name__, e)
            self.group_error = f"the worker group failed to start ({type(e).__name__}); see the replica's log"
            return False
        if self._stop.is_set():  # close() ran while the group was starting: it would hold its GPUs forever
            group.shutdown()
            return False
        self.group, self.group_error = group, None
        return True
