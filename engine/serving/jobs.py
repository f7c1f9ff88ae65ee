"""The job store of the HTTP endpoint: SQLite (standard library) plus one mp4 and one metrics file per job.

It all lives in the output directory, so job records and videos survive a restart of the app. Under Ray
one store actor owns it (engine/serving/ray_executor.py: shared_store) and every replica, on any node, goes through it;
a replica claims a queued job in a write transaction.

A running job carries a heartbeat, renewed by the replica running it. A job whose heartbeat is older than
the lease was running on a replica that died: it is reported failed ("interrupted"), not re-queued, since
the client may already have moved on and a re-run would silently cost a full generation.

Job ids come from `secrets` (128 random bits) and are the only input to a file name.
"""

from __future__ import annotations

import json
import re
import secrets
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

from .schema import api_view

STATES = ("queued", "running", "completed", "failed", "cancelled")
FINAL = ("completed", "failed", "cancelled")
ID = re.compile(r"video_[0-9a-f]{32}")
INTERRUPTED = "interrupted: the server stopped while this job was running; submit it again"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    request TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    heartbeat_at REAL,
    owner TEXT,
    step INTEGER NOT NULL DEFAULT 0,
    steps INTEGER NOT NULL,
    cancel INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    timings TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, created_at);
"""


class QueueFull(Exception):
    """The bounded queue holds `capacity` jobs already."""

    def __init__(self, capacity: int):
        super().__init__(f"the queue is full ({capacity} jobs waiting); retry later")


class JobStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.videos = self.root / "videos"
        self.videos.mkdir(parents=True, exist_ok=True)
        self.path = self.root / "jobs.sqlite3"
        db = sqlite3.connect(self.path, timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")  # persistent: readers never block the runner's writes
            db.executescript(_SCHEMA)  # its own transaction: executescript commits around itself
        finally:
            db.close()

    @contextmanager
    def _tx(self, write: bool = True):
        """One connection per operation (handlers run on many threads). Writes take the write lock up front
        (IMMEDIATE), so read-then-write steps (queue bound, claim) are atomic across threads and replicas;
        reads (status polls, /healthz) take none and never wait for the runner's heartbeats."""
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    # ---- files -------------------------------------------------------------------------------------------
    def video_path(self, job_id: str) -> Path:
        return self._file(job_id, ".mp4")

    def metrics_path(self, job_id: str) -> Path:
        return self._file(job_id, ".metrics.json")

    def _file(self, job_id: str, suffix: str) -> Path:
        if not ID.fullmatch(job_id):  # never reached with user text: the API checks ids first
            raise ValueError(f"not a job id: {job_id!r}")
        return self.videos / f"{job_id}{suffix}"

    # ---- the queue ---------------------------------------------------------------------------------------
    def submit(self, request: dict, capacity: int) -> dict:
        """Queue a validated request (GenerationRequest.to_dict()); QueueFull when `capacity` are waiting."""
        job_id = "video_" + secrets.token_hex(16)
        with self._tx() as db:
            (waiting,) = db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued'").fetchone()
            if waiting >= capacity:
                raise QueueFull(capacity)
            db.execute(
                "INSERT INTO jobs (id, state, request, created_at, steps) VALUES (?, 'queued', ?, ?, ?)",
                (job_id, json.dumps(request), time.time(), request["steps"]),
            )
            return _record(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def claim(self, owner: str) -> tuple[str, dict] | None:
        """The oldest queued job, now running under `owner`: (id, request) or None."""
        with self._tx() as db:
            row = db.execute(
                "SELECT id, request FROM jobs WHERE state = 'queued' ORDER BY created_at, rowid LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            now = time.time()
            db.execute(
                "UPDATE jobs SET state = 'running', owner = ?, started_at = ?, heartbeat_at = ? WHERE id = ?",
                (owner, now, now, row["id"]),
            )
            return row["id"], json.loads(row["request"])

    def heartbeat(self, job_id: str, step: int) -> bool:
        """Record progress (of the `steps` stored at submit) and renew the lease; True if the client asked to
        cancel."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET step = ?, heartbeat_at = ? WHERE id = ? AND state = 'running'",
                (step, time.time(), job_id),
            )
            row = db.execute("SELECT cancel FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return bool(row and row["cancel"])

    def finish(self, job_id: str, state: str, error: str | None = None, timings: dict | None = None) -> bool:
        """Running -> a final state; False if the job was no longer running (e.g. declared interrupted)."""
        assert state in FINAL
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET state = ?, error = ?, timings = ?, finished_at = ?, "
                "step = CASE WHEN ? = 'completed' THEN steps ELSE step END "
                "WHERE id = ? AND state = 'running'",
                (state, error, json.dumps(timings) if timings else None, time.time(), state, job_id),
            )
            return cur.rowcount == 1

    def save_outputs(self, job_id: str, mp4: bytes, metrics: dict) -> None:
        """The finished job's video and metrics, written where the store lives (temp name, then rename), so
        replicas on other nodes never need this disk."""
        from engine.runtime.io import write_bytes, write_json

        write_bytes(mp4, self.video_path(job_id))
        write_json(metrics, self.metrics_path(job_id))

    def video_bytes(self, job_id: str) -> bytes | None:
        path = self.video_path(job_id)
        return path.read_bytes() if path.is_file() else None

    def cancel(self, job_id: str) -> str | None:
        """DELETE: queued -> 'cancelled'; running -> cancel requested ('cancelling', the runner stops it at the
        next step); finished -> record and files removed ('deleted'). None if there is no such job."""
        with self._tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            if row["state"] == "queued":
                db.execute(
                    "UPDATE jobs SET state = 'cancelled', error = 'cancelled by the client', finished_at = ? "
                    "WHERE id = ?",
                    (time.time(), job_id),
                )
                return "cancelled"
            if row["state"] == "running":
                db.execute("UPDATE jobs SET cancel = 1 WHERE id = ?", (job_id,))
                return "cancelling"
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        self.video_path(job_id).unlink(missing_ok=True)
        self.metrics_path(job_id).unlink(missing_ok=True)
        return "deleted"

    def expire(self, lease_s: float) -> int:
        """Running jobs whose replica stopped renewing them -> failed (interrupted). Returns how many."""
        with self._tx() as db:
            return db.execute(
                "UPDATE jobs SET state = 'failed', error = ?, finished_at = ? "
                "WHERE state = 'running' AND heartbeat_at < ?",
                (INTERRUPTED, time.time(), time.time() - lease_s),
            ).rowcount

    def interrupt(self, owner: str) -> int:
        """A replica shutting down: its running jobs -> failed (interrupted) now, without waiting for the lease."""
        with self._tx() as db:
            return db.execute(
                "UPDATE jobs SET state = 'failed', error = ?, finished_at = ? WHERE state = 'running' AND owner = ?",
                (INTERRUPTED, time.time(), owner),
            ).rowcount

    # ---- reading -----------------------------------------------------------------------------------------
    def get(self, job_id: str) -> dict | None:
        with self._tx(write=False) as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _record(row)

    def list(self, limit: int = 100) -> list[dict]:
        """Newest first."""
        with self._tx(write=False) as db:
            rows = db.execute("SELECT * FROM jobs ORDER BY created_at DESC, rowid DESC LIMIT ?", (limit,)).fetchall()
        return [_record(r) for r in rows]

    def counts(self) -> dict:
        with self._tx(write=False) as db:
            rows = db.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        return {s: 0 for s in STATES} | {r["state"]: r["n"] for r in rows}


def _record(row: sqlite3.Row) -> dict:
    """A job as the API shows it."""
    t = dict(row)
    timings = json.loads(t["timings"]) if t["timings"] else {}
    if t["started_at"]:
        timings["queued_s"] = t["started_at"] - t["created_at"]
    return {
        "id": t["id"],
        "object": "video",
        "status": t["state"],
        "progress": {"step": t["step"], "steps": t["steps"], "percent": round(100 * t["step"] / max(1, t["steps"]))},
        "cancel_requested": bool(t["cancel"]) and t["state"] == "running",
        "created_at": t["created_at"],
        "started_at": t["started_at"],
        "finished_at": t["finished_at"],
        "timings": timings,
        "error": t["error"],
        "request": api_view(json.loads(t["request"])),
    }
