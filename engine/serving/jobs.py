"""The job store of the HTTP endpoint: SQLite (standard library) plus one mp4 and one metrics file per job.

It all lives in the output directory, so job records and videos survive a restart of the app. Under Ray
one store actor owns it (engine/serving/ray_executor.py: shared_store) and every replica, on any node, goes through it;
a replica claims a queued job in a write transaction.

A running job carries a heartbeat, renewed by the replica running it. A job whose heartbeat is older than
the lease was running on a replica that died: it is reported failed ("interrupted"), not re-queued, since
the client may already have moved on and a re-run would silently cost a full generation.

Job ids come from `secrets` (128 random bits) and are the only input to a file name.

State is bounded: finished jobs and their files are removed `retention_s` after they finish (purge; the video object
shows when as `expires_at`), and a job cancelled before it started keeps its place in the queue's count until it is
removed (DELETE again, or retention), so submitting and cancelling cannot fill the database past queue_size.

Records are shown as OpenAI's video object (video()): status queued | in_progress | completed | failed (a cancelled
job is failed with error code "cancelled"), progress an integer percent, times in unix seconds, error
{code, message}; the engine's extras (the request, steps, fis, timings) under their own keys.
"""

from __future__ import annotations

import json
import re
import secrets
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

from .schema import api_view, seconds_of

STATES = ("queued", "running", "completed", "failed", "cancelled")
FINAL = ("completed", "failed", "cancelled")
STATUS = {
    "queued": "queued",
    "running": "in_progress",
    "completed": "completed",
    "failed": "failed",
    "cancelled": "failed",
}
ID = re.compile(r"video_[0-9a-f]{32}")
INTERRUPTED = "interrupted: the replica running this job stopped (a restart or a lost node); submit it again"
CANCELLED = "cancelled by the client"

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
# columns added since the first version: a store made by an older one gains them on open
_ADDED = {"meta": "TEXT", "error_code": "TEXT"}
# a running job that stopped without finishing: interrupted, or cancelled as its client asked
_STOPPED = (
    "UPDATE jobs SET state = CASE WHEN cancel = 1 THEN 'cancelled' ELSE 'failed' END, "
    "error = CASE WHEN cancel = 1 THEN ? ELSE ? END, "
    "error_code = CASE WHEN cancel = 1 THEN 'cancelled' ELSE 'interrupted' END, finished_at = ? "
)


class QueueFull(Exception):
    """The bounded queue holds `capacity` jobs already."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        super().__init__(f"the queue is full ({capacity} jobs waiting); retry later")

    def __reduce__(self):  # across Ray (pickled): rebuilt from the capacity, not from the message
        return QueueFull, (self.capacity,)


class JobStore:
    def __init__(self, root: str | Path, retention_s: float | None = None):
        self.root = Path(root)
        self.retention_s = retention_s  # None: kept until deleted
        self.videos = self.root / "videos"
        self.videos.mkdir(parents=True, exist_ok=True)
        self.path = self.root / "jobs.sqlite3"
        db = sqlite3.connect(self.path, timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")  # persistent: readers never block the runner's writes
            db.executescript(_SCHEMA)  # its own transaction: executescript commits around itself
            have = {r[1] for r in db.execute("PRAGMA table_info(jobs)")}
            for column, kind in _ADDED.items():
                if column not in have:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
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
    def submit(self, request: dict, capacity: int, meta: dict | None = None) -> dict:
        """Queue a validated request (GenerationRequest.to_dict()); QueueFull when `capacity` are waiting.
        meta: what the video object shows beside the request ('model', 'fps', 'fis_source', 'notes')."""
        job_id = "video_" + secrets.token_hex(16)
        with self._tx() as db:
            (waiting,) = db.execute(
                "SELECT COUNT(*) FROM jobs WHERE state = 'queued' OR (state = 'cancelled' AND started_at IS NULL)"
            ).fetchone()
            if waiting >= capacity:
                raise QueueFull(capacity)
            db.execute(
                "INSERT INTO jobs (id, state, request, created_at, steps, meta) VALUES (?, 'queued', ?, ?, ?, ?)",
                (job_id, json.dumps(request), time.time(), request["steps"], json.dumps(meta or {})),
            )
            return video(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone(), self.retention_s)

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

    def finish(
        self,
        job_id: str,
        state: str,
        error: str | None = None,
        timings: dict | None = None,
        code: str | None = None,
        meta: dict | None = None,
    ) -> bool:
        """Running -> a final state; False if the job was no longer running (e.g. declared interrupted).
        code: the error's machine-readable code; meta: merged into the job's meta (e.g. the FIS speedup)."""
        assert state in FINAL
        code = code or {"failed": "internal_error", "cancelled": "cancelled"}.get(state)
        with self._tx() as db:
            row = db.execute("SELECT meta FROM jobs WHERE id = ?", (job_id,)).fetchone()
            merged = {**json.loads(row["meta"] or "{}"), **(meta or {})} if row else {}
            cur = db.execute(
                "UPDATE jobs SET state = ?, error = ?, error_code = ?, timings = ?, finished_at = ?, meta = ?, "
                "step = CASE WHEN ? = 'completed' THEN steps ELSE step END "
                "WHERE id = ? AND state = 'running'",
                (
                    state,
                    error,
                    code,
                    json.dumps(timings) if timings else None,
                    time.time(),
                    json.dumps(merged),
                    state,
                    job_id,
                ),
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
                    "UPDATE jobs SET state = 'cancelled', error = ?, error_code = 'cancelled', finished_at = ? "
                    "WHERE id = ?",
                    (CANCELLED, time.time(), job_id),
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
        """Running jobs whose replica stopped renewing them -> failed (interrupted), or cancelled where the client
        had asked. Returns how many."""
        with self._tx() as db:
            return db.execute(
                _STOPPED + "WHERE state = 'running' AND heartbeat_at < ?",
                (CANCELLED, INTERRUPTED, time.time(), time.time() - lease_s),
            ).rowcount

    def interrupt(self, owner: str) -> int:
        """A replica shutting down: its running jobs -> failed (interrupted) now, without waiting for the lease;
        cancelled where the client had asked."""
        with self._tx() as db:
            return db.execute(
                _STOPPED + "WHERE state = 'running' AND owner = ?", (CANCELLED, INTERRUPTED, time.time(), owner)
            ).rowcount

    def purge(self) -> int:
        """Finished jobs older than the retention: record, video and metrics removed. Returns how many."""
        if self.retention_s is None:
            return 0
        with self._tx() as db:
            rows = db.execute(
                "SELECT id FROM jobs WHERE state IN ('completed', 'failed', 'cancelled') AND finished_at < ?",
                (time.time() - self.retention_s,),
            ).fetchall()
            db.executemany("DELETE FROM jobs WHERE id = ?", [(r["id"],) for r in rows])
        for r in rows:
            self.video_path(r["id"]).unlink(missing_ok=True)
            self.metrics_path(r["id"]).unlink(missing_ok=True)
        return len(rows)

    # ---- reading -----------------------------------------------------------------------------------------
    def get(self, job_id: str) -> dict | None:
        with self._tx(write=False) as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else video(row, self.retention_s)

    def list(self, limit: int = 100, after: str | None = None, order: str = "desc") -> tuple[list[dict], bool]:
        """(a page of video objects, whether more follow): newest first ('desc') or oldest first, after the job
        `after` (a cursor: the last id of the previous page). An `after` that is no job: an empty page."""
        assert order in ("asc", "desc")
        op, direction = ("<", "DESC") if order == "desc" else (">", "ASC")
        with self._tx(write=False) as db:
            where, args = "", []
            if after is not None:
                cursor = db.execute("SELECT created_at, rowid FROM jobs WHERE id = ?", (after,)).fetchone()
                if cursor is None:
                    return [], False
                where, args = f"WHERE (created_at, rowid) {op} (?, ?)", [cursor[0], cursor[1]]
            rows = db.execute(
                f"SELECT * FROM jobs {where} ORDER BY created_at {direction}, rowid {direction} LIMIT ?",
                (*args, limit + 1),
            ).fetchall()
        return [video(r, self.retention_s) for r in rows[:limit]], len(rows) > limit

    def counts(self) -> dict:
        with self._tx(write=False) as db:
            rows = db.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        return {s: 0 for s in STATES} | {r["state"]: r["n"] for r in rows}


def video(row: sqlite3.Row, retention_s: float | None = None) -> dict:
    """A job as the API shows it: OpenAI's video object, then the engine's extras."""
    t = dict(row)
    meta = json.loads(t.get("meta") or "{}")
    req = json.loads(t["request"])
    timings = json.loads(t["timings"]) if t["timings"] else {}
    if t["started_at"]:
        timings["queued_s"] = t["started_at"] - t["created_at"]
    state, step, steps = t["state"], t["step"], max(1, t["steps"])
    percent = 100 if state == "completed" else 0 if state == "queued" else 100 * step // steps
    if state == "running":
        percent = min(percent, 99)  # decoding and storing are left after the last step
    fis = req["fis"]
    notes = list(meta.get("notes") or [])
    return {
        "id": t["id"],
        "object": "video",
        "model": meta.get("model", ""),
        "status": STATUS[state],
        "progress": percent,
        "created_at": int(t["created_at"]),
        "completed_at": None if t["finished_at"] is None else int(t["finished_at"]),
        "expires_at": None if t["finished_at"] is None or retention_s is None else int(t["finished_at"] + retention_s),
        "prompt": req["prompt"],
        "seconds": seconds_of(req["num_frames"], meta.get("fps", 16)),
        "size": f"{req['width']}x{req['height']}",
        "error": None if t["error"] is None else {"code": t["error_code"] or "internal_error", "message": t["error"]},
        # the engine's own
        "steps": {"done": step, "total": t["steps"]},
        "fis": {
            "preset": fis["name"] if fis else "off",
            "source": meta.get("fis_source", "request"),
            "speedup_estimate": meta.get("speedup_estimate"),
            "notes": notes,  # e.g. why the server's default preset ran dense
        },
        "timings": timings,
        "started_at": None if t["started_at"] is None else int(t["started_at"]),
        "cancel_requested": bool(t["cancel"]) and state == "running",
        "request": api_view(req),
    }
