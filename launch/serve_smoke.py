"""Serving on a real machine, end to end, as an operator would run it: start `launch/serve.py` (Ray Serve, its own
local Ray cluster) as a separate process, then over HTTP only:

  1. /healthz until ready: the worker's device, and on a GPU its name, memory and utilisation (NVML);
  2. a round trip: one video at the given size with FIS (default: 480p, 81 frames, FIS-Balanced), its mp4 fetched;
     /healthz read again while it runs (utilisation under load);
  3. a worker killed mid-job (SIGKILL to its Ray actor process): that job fails with the reason, the replica
     rebuilds its worker group, the next job completes;
  4. a few jobs back to back: jobs per minute, and storing (write_s) against generating (run_s).

Everything goes to OUT/serve_smoke.json (and the server's log to OUT/serve.log); the exit status is 0 only if every
check held. On one GPU (what docs/benchmarks.md records):

  python launch/serve_smoke.py --model random:wan2.1-1.3b --out $OUT
  python launch/serve_smoke.py --model "" --size 64x64 --frames 49 --out /tmp/smoke   # the embedded model, CPU
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere


class Smoke:
    def __init__(self, url: str, key: str | None):
        import requests

        self.http, self.url = requests.Session(), url
        if key:
            self.http.headers["Authorization"] = f"Bearer {key}"

    def get(self, path: str, **kw):
        return self.http.get(self.url + path, timeout=60, **kw)

    def submit(self, body: dict) -> str:
        r = self.http.post(self.url + "/v1/videos", json=body, timeout=60)
        if r.status_code != 202:
            raise RuntimeError(f"POST /v1/videos -> {r.status_code}: {r.text[:300]}")
        return r.json()["id"]

    def wait(self, vid: str, until=("completed", "failed"), timeout=900, step=0, watch=None) -> dict:
        end = time.time() + timeout
        while time.time() < end:
            v = self.get(f"/v1/videos/{vid}").json()
            if v["status"] in until and v["steps"]["done"] >= step:
                return v
            if watch is not None:
                watch()
            time.sleep(0.5)
        raise RuntimeError(f"{vid} did not reach {until} within {timeout} s: {v}")

    def health(self, timeout=900, ok=True, server: subprocess.Popen | None = None) -> dict:
        end = time.time() + timeout
        while time.time() < end:
            if server is not None and server.poll() is not None:  # it will never answer: say so now
                raise RuntimeError(f"the server exited with status {server.returncode} before it was ready")
            try:
                r = self.get("/healthz")
                if (r.status_code == 200) == ok:
                    return r.json()
            except OSError:  # not listening yet
                pass
            time.sleep(1.0)
        raise RuntimeError(f"/healthz did not become {'ready' if ok else 'unready'} within {timeout} s")


def worker_pids() -> list[int]:
    """The Ray worker actors' processes (this smoke test started them all): their title is ray::WorkerActor..."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split(None, 1)[0]) for line in out.splitlines() if "ray::WorkerActor" in line]


def listening() -> dict:
    """TCP sockets listening, by address (from /proc/net/tcp): what a host firewall must cover."""
    out = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            if state == "0A":  # LISTEN
                addr = local.split(":")[0]
                if len(addr) == 8:  # IPv4, little-endian hex
                    shown = ".".join(str(int(addr[i : i + 2], 16)) for i in (6, 4, 2, 0))
                else:
                    shown = "::" if set(addr) == {"0"} else "::1" if addr.endswith("01000000") else addr
                out[shown] = out.get(shown, 0) + 1
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:wan2.1-1.3b", help='the served model ("" = the embedded one)')
    p.add_argument("--size", default="832x480")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--fis", default="balanced")
    p.add_argument("--jobs", type=int, default=3, help="jobs back to back for jobs/minute")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--out", default=os.environ.get("OUT", "outputs/serve-smoke"))
    p.add_argument("--api-key", default=os.environ.get("FIS_API_KEY"))
    p.add_argument("--timeout", type=float, default=900, help="seconds for the model to load")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    store = tempfile.mkdtemp(prefix="fis-smoke-")
    overrides = [
        f"model.model={a.model!r}" if a.model else 'model.model=""',
        f"serve.port={a.port}",
        f"serve.output_dir={store!r}",
        "serve.queue_size=8",
        "serve.job_lease_s=60",
        "limits.max_steps=200",
        *([f"serve.api_key={a.api_key!r}"] if a.api_key else []),
    ]
    log = open(out / "serve.log", "w")
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "launch" / "serve.py"), *overrides],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: stopped as one below
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    report: dict = {"model": a.model or "embedded", "argv": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    checks: dict[str, bool] = {}
    s = Smoke(f"http://127.0.0.1:{a.port}", a.api_key)
    body = {
        "prompt": "a red circle moving right quickly on a dark background",
        "size": a.size,
        "num_frames": a.frames,
        "num_inference_steps": a.steps,
        "fis": a.fis,
        "guidance_scale": 1.0,
    }
    try:
        t0 = time.time()
        report["health_ready"] = s.health(a.timeout, server=server)
        report["ready_s"] = time.time() - t0
        report["model_info"] = s.get("/v1/models").json()["data"][0]
        workers = report["health_ready"]["workers"]
        gpu = workers[0].get("gpu") if workers else None
        checks["healthz_gpu"] = gpu is None or {"name", "memory_total_gib", "utilization_pct"} <= set(gpu)

        # 2. the round trip, /healthz sampled while it runs
        during = []
        vid = s.submit({**body, "seed": 1})
        v = s.wait(vid, watch=lambda: during.append(s.get("/healthz").json()["workers"][0].get("gpu")))
        r = s.get(f"/v1/videos/{vid}/content")
        report["round_trip"] = {"video": v, "mp4_bytes": len(r.content), "healthz_during": during[-3:]}
        checks["round_trip"] = v["status"] == "completed" and r.status_code == 200 and r.content[4:8] == b"ftyp"
        (out / "round_trip.mp4").write_bytes(r.content)

        # 3. a worker killed mid-job; the next job completes
        long = s.submit({**body, "num_inference_steps": 40, "seed": 2})
        s.wait(long, until=("in_progress",), step=1)
        pids = worker_pids()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        killed = s.wait(long)
        after = s.health(a.timeout, server=server)
        nxt = s.wait(s.submit({**body, "seed": 3}))
        report["worker_killed"] = {"pids": pids, "job": killed, "next": nxt, "health_after": after}
        checks["kill_fails_that_job"] = killed["status"] == "failed" and killed["error"]["code"] == "worker_failed"
        checks["next_job_completes"] = nxt["status"] == "completed"

        # 4. jobs per minute, storage against generation
        t0 = time.time()
        ids = [s.submit({**body, "seed": 10 + i}) for i in range(a.jobs)]
        done = [s.wait(i) for i in ids]
        minutes = (time.time() - t0) / 60
        report["throughput"] = {
            "jobs": a.jobs,
            "jobs_per_minute": a.jobs / minutes,
            "run_s": [d["timings"].get("run_s") for d in done],
            "write_s": [d["timings"].get("write_s") for d in done],
            "encode_s": [d["timings"].get("encode_s") for d in done],
        }
        checks["all_completed"] = all(d["status"] == "completed" for d in done)
        checks["write_under_0.2_run"] = all(d["timings"]["write_s"] <= 0.2 * d["timings"]["run_s"] for d in done)
        report["listening"] = listening()
    except Exception as e:  # the report says how far it got
        report["error"] = f"{type(e).__name__}: {e}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
    if "error" in report:  # the server's last words, beside the error
        report["server_log_tail"] = (out / "serve.log").read_text(errors="replace").splitlines()[-5:]
    report["checks"] = checks
    report["ok"] = bool(checks) and all(checks.values()) and "error" not in report
    (out / "serve_smoke.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps({"ok": report["ok"], "checks": checks, "error": report.get("error")}, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
