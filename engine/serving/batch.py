"""Offline batch rendering: a JSONL manifest in, one mp4 + metrics per line and summary.json out.

Each line is a request with the HTTP API's fields (engine/serving/schema.py) plus an optional "id" (letters,
digits, '.', '_', '-'), which names the outputs: ID.mp4 and ID.metrics.json. A line without an id is named by
a hash of its request and the model, so editing or reordering lines never reuses a stale video. A line's
"image" is a file path relative to the manifest's folder; its content is part of the key.

Resumable: a line whose metrics file exists and records the same request key is skipped; files are written
to a temporary name and renamed (mp4 first, metrics last), so a killed run leaves nothing that looks done.
Deterministic: a line's video depends on its request and seed only, not on the group that rendered it.
A bad line is reported with its line number, recorded in summary.json, and does not stop the batch.

Runs on Ray (engine.serving.ray_executor.render_on_ray: groups of N ranks, data parallel), under torchrun (the world
split into groups of N ranks, lines dealt round-robin), or in a single process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from engine.errors import FieldError, UserError
from engine.runtime.images import digest
from engine.runtime.io import write_json, write_mp4
from engine.runtime.request import GenerationRequest, ModelInfo
from engine.runtime.worker import WorkerConfig

from .schema import Limits, build, parse


@dataclass(frozen=True)
class Item:
    line: int  # 1-based line number in the manifest
    id: str
    key: str  # hash of the request, the default FIS preset and the model: what makes an output reusable
    obj: dict


# where and how fast a video is made, not what it shows: not part of an output's identity
_PLACEMENT = (
    "device",
    "attention_backend",
    "cfg_parallel",
    "ulysses",
    "ring",
    "shard",
    "sp_attention",
    "dp",
    "vae_parallel",  # exact: the parallel decode equals the leader's
)


def model_key(cfg: WorkerConfig) -> dict:
    """The settings that change a video."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _PLACEMENT}


def read_manifest(path: Path, default_fis: str, model: dict) -> tuple[list[Item], list[dict]]:
    """-> (items, bad lines as {'line', 'id', 'reason'}). Field checks happen here; checks against the model
    (sizes, 4k+1 frames, FIS fit) when a worker takes the line."""
    items, bad, seen = [], [], {}
    for n, text in enumerate(path.read_text().splitlines(), 1):
        if not text.strip():
            continue
        obj, job_id = None, None
        try:
            obj = json.loads(text)
            req, job_id = parse(obj, default_fis=default_fis, allow_id=True, image_root=path.parent)
        except (ValueError, RecursionError) as e:
            reason = e.args[0] if isinstance(e, FieldError) else f"not valid JSON: {e}"
            bad.append({"line": n, "id": obj.get("id") if isinstance(obj, dict) else None, "reason": reason})
            continue
        request = {k: v for k, v in obj.items() if k != "id"}
        identity = {"request": request, "default_fis": default_fis, "model": model}
        if req.image:  # the image's content, not only its path: an edited image renders again
            identity["image_sha256"] = digest(req.image)
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        job_id = job_id or key[:16]
        if job_id in seen:
            bad.append({"line": n, "id": job_id, "reason": f"duplicate id {job_id!r} (also on line {seen[job_id]})"})
            continue
        seen[job_id] = n
        items.append(Item(n, job_id, key, obj))
    return items, bad


class Batch:
    """One run over a manifest: the plan, the outcomes, the progress bar and summary.json. Thread-safe: Ray
    render groups report from threads of their own."""

    def __init__(
        self,
        manifest: str | Path,
        out_dir: str | Path,
        default_fis: str,
        cfg: WorkerConfig,
        fps: int | None = None,
        progress: bool = True,
        report: bool = True,
    ):
        self.manifest, self.out, self.default_fis, self.fps = Path(manifest), Path(out_dir), default_fis, fps
        if not self.manifest.is_file():
            raise UserError(f"manifest {str(manifest)!r} does not exist")
        self.out.mkdir(parents=True, exist_ok=True)
        self.started = time.time()
        self.items, self.bad = read_manifest(self.manifest, default_fis, model_key(cfg))
        complete = {i.id for i in self.items if self.is_complete(i)}
        self.skipped = [i for i in self.items if i.id in complete]
        self.pending = [i for i in self.items if i.id not in complete]
        self.rendered: list[str] = []
        self.errors: list[dict] = []
        self._notes: dict[str, tuple[str, ...]] = {}  # per line: e.g. the default FIS preset ran dense
        self._queue = deque(self.pending)
        self._lock = threading.Lock()
        for b in self.bad if report else ():  # under torchrun every rank reads the manifest; one reports
            self._report(b)
        self.bar = tqdm(total=len(self.pending), unit="video", desc="render", disable=not progress, file=sys.stderr)

    def metrics_path(self, item: Item) -> Path:
        return self.out / f"{item.id}.metrics.json"

    def video_path(self, item: Item) -> Path:
        return self.out / f"{item.id}.mp4"

    def is_complete(self, item: Item) -> bool:
        try:
            return (
                json.loads(self.metrics_path(item).read_text()).get("key") == item.key
                and self.video_path(item).is_file()
            )
        except (OSError, ValueError):
            return False

    def request(self, item: Item, info: ModelInfo) -> GenerationRequest:
        """The line's request checked against the loaded model, with its family's FIS presets (the id plays no
        part); UserError if the model refuses it. The default preset (--fis) runs dense where it cannot apply."""
        parsed = build(
            item.obj, Limits(), self.default_fis, info, allow_id=True, image_root=self.manifest.parent
        )  # the image read again: items stay small
        with self._lock:
            self._notes[item.id] = parsed.notes
            self.fps = self.fps or info.fps  # the model's frame rate unless --fps says otherwise
        return parsed.request

    # ---- outcomes (called by whoever rendered the line: a Ray group thread, or a group leader) --------------
    def next_item(self) -> Item | None:
        with self._lock:
            return self._queue.popleft() if self._queue else None

    def done(self, item: Item, result: dict) -> None:
        write_mp4(result["frames"], self.video_path(item), fps=self.fps or 16)
        metrics = dict(result["metrics"])
        if self._notes.get(item.id):
            metrics["notes"] = [*metrics.get("notes", []), *self._notes[item.id]]
        write_json(
            {**metrics, "id": item.id, "line": item.line, "key": item.key, "manifest": str(self.manifest)},
            self.metrics_path(item),
        )  # last: marks the line complete
        with self._lock:
            self.rendered.append(item.id)
            self.bar.update()

    def failed(self, item: Item, reason: str) -> None:
        entry = {"line": item.line, "id": item.id, "reason": reason}
        with self._lock:
            self.errors.append(entry)
            self._report(entry)
            self.bar.update()

    def watch(self, items: list[Item]) -> None:
        """Move the bar for lines other processes render (torchrun: rank 0 sees the other groups' files)."""
        left = list(items)

        def poll():
            while left:
                time.sleep(1.0)
                finished = [i for i in left if self.is_complete(i)]
                for i in finished:
                    left.remove(i)
                with self._lock:
                    self.bar.update(len(finished))

        threading.Thread(target=poll, daemon=True).start()

    def _report(self, entry: dict) -> None:
        tqdm.write(f"{self.manifest}:{entry['line']}: {entry['reason']}", file=sys.stderr)

    # ---- the end --------------------------------------------------------------------------------------------
    def not_run(self) -> list[str]:
        """Pending lines with no outcome: neither rendered nor failed (under torchrun the queue is never taken
        from, groups take their lines by position; on Ray what every lost group left)."""
        seen = {*self.rendered, *(e["id"] for e in self.errors)}
        return [i.id for i in self.pending if i.id not in seen]

    def summary(self, backend: str, groups: int, ranks: int) -> dict:
        self.bar.n = len(self.rendered) + len(self.errors)  # torchrun: the other groups' lines, now known
        self.bar.close()
        elapsed = time.time() - self.started
        failures = sorted(self.bad + self.errors, key=lambda f: f["line"])
        s = {
            "manifest": str(self.manifest),
            "output_dir": str(self.out),
            "backend": backend,
            "groups": groups,
            "ranks_per_group": ranks,
            "total": len(self.items) + len(self.bad),
            "done": len(self.rendered),
            "skipped": len(self.skipped),
            "failed": len(failures),
            "failures": failures,
            "done_ids": sorted(self.rendered),
            "skipped_ids": [i.id for i in self.skipped],
            "not_run": self.not_run(),  # left when every render group was lost
            "total_time_s": round(elapsed, 3),
            "videos_per_hour": round(len(self.rendered) / elapsed * 3600, 2) if self.rendered else 0.0,
        }
        write_json(s, self.out / "summary.json")
        return s
