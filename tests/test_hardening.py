"""What a hostile client did to the endpoint (../shared/reference/adversarial-http.md, issue 18), one test per
finding, each failing on the code before the fix: against the real app over real sockets (helpers.LocalServer,
the embedded model, an API key set), and the store, schema and image checks directly where that is the finding.
The findings about Ray worker groups (a request error must not restart the group, cancellation under sequence
parallelism) are in test_serve.py."""

from __future__ import annotations

import json
import pickle
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import openai
import pytest
import requests
from helpers import LocalServer

from engine.errors import Cancelled, UserError
from engine.serving.config import DEFAULT_CONFIG, load_config
from engine.serving.jobs import JobStore, QueueFull

KEY = "sk-test-0123456789"
# one step of ~30 s on a quiet 2-core machine, always stopped early (320x320x17 took 4.6 s: inside a 6 s deadline)
LONG_STEP = {"size": "384x384", "num_frames": 33, "num_inference_steps": 1, "guidance_scale": 1.0, "fis": "off"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    config = load_config(
        DEFAULT_CONFIG,
        [
            f"serve.output_dir={tmp_path_factory.mktemp('hardening')}",
            f"serve.api_key={KEY!r}",
            "serve.queue_size=4",
            "serve.body_timeout_s=1.5",
            "limits.max_job_s=6.0",
        ],
    )
    s = LocalServer(config)
    s.http = requests.Session()
    s.http.headers["Authorization"] = f"Bearer {KEY}"
    yield s
    s.close()


def _post(server, body: bytes | dict, **kw):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json", **kw.pop("headers", {})}
    return server.http.post(f"{server.url}/v1/videos", data=data, headers=headers, timeout=30, **kw)


def _error(r, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    return r.json()["error"]


def _wait(server, vid: str, timeout=120) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        v = server.http.get(f"{server.url}/v1/videos/{vid}", timeout=30).json()
        if v["status"] in ("completed", "failed"):
            return v
        time.sleep(0.05)
    raise AssertionError(f"{vid} did not finish: {v}")


# ---- 1. a lone surrogate ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, param",
    [
        (rb'{"prompt": "x", "negative_prompt": "\ud800"}', "negative_prompt"),
        (rb'{"prompt": "x\udfff"}', "prompt"),
        (rb'{"prompt": "x", "\ud800": 1}', "\\ud800"),
        (rb'{"prompt": "x", "fis": {"\udfff": 1}}', "fis.\\udfff"),
    ],
)
def test_a_lone_surrogate_is_refused_before_anything_is_stored(server, raw, param):
    before = server.store.counts()
    err = _error(_post(server, raw), 422)
    assert err["param"] == param and "not valid Unicode" in err["message"], err
    assert server.store.counts() == before
    assert server.http.get(f"{server.url}/v1/videos", timeout=30).status_code == 200


def test_surrogate_bytes_and_a_stored_surrogate(server):
    r = _post(server, b'{"prompt": "' + bytes([0xED, 0xA0, 0x80]) + b'"}')  # the surrogate as raw (invalid) UTF-8
    assert _error(r, 400)["message"] == "request body is not valid UTF-8"
    # a record an older server stored: every response that shows it still renders, for every client
    request = {
        "prompt": "old \ud800",
        "negative_prompt": "",
        "height": 64,
        "width": 64,
        "num_frames": 9,
        "steps": 1,
        "guidance": 1.0,
        "seed": 0,
        "fis": None,
        "image": None,
        "image_fit": "crop",
    }
    vid = server.store.submit(request, 100)["id"]
    server.store.cancel(vid)
    for path in (f"/v1/videos/{vid}", "/v1/videos"):
        r = server.http.get(server.url + path, timeout=30)
        assert r.status_code == 200 and "old \\ud800" in r.text
    server.store.cancel(vid)


# ---- 2. block ranges ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("blocks", ["1-10000000", "0-1023,0-1023", ",".join(["1"] * 2000), "٣"])
def test_block_ranges_are_bounded_before_they_are_built(server, blocks):
    t0 = time.perf_counter()
    r = _post(server, {"prompt": "x", "size": "64x64", "fis": {"preset": "balanced", "blocks": blocks}})
    err = _error(r, 422)
    assert time.perf_counter() - t0 < 2 and len(r.content) < 600 and err["param"] == "fis", err


# ---- 3. what the model's pipeline refuses -------------------------------------------------------------------------


def test_a_size_the_pipeline_refuses_is_refused_before_it_is_queued(server):
    before = server.store.counts()
    err = _error(_post(server, {"prompt": "x", "size": "72x72", "num_frames": 9}), 422)
    assert err["param"] == "size" and "multiple of 16" in err["message"], err  # Wan's pipeline wants 16, VAE x patch 8
    assert server.store.counts() == before


def test_a_request_error_inside_the_worker_fails_that_job_only(server):
    """Should validation miss a rule, the pipeline's own input check fails the job with the request's error, and
    the worker (group) stays: the same one runs the next job."""
    import dataclasses

    group, worker = server.service.group, server.service.group.member.worker
    info = worker.info
    loose = dataclasses.replace(info, pipeline_multiple=1)  # forget Wan's multiple of 16 on both sides
    server.service.info, worker.info = loose, loose
    try:
        v = _wait(server, _post(server, {"prompt": "x", "size": "72x72", "num_frames": 9, "fis": "off"}).json()["id"])
    finally:
        server.service.info, worker.info = info, info
    assert v["status"] == "failed" and v["error"]["code"] == "invalid_request", v
    assert "the pipeline refused the request" in v["error"]["message"] and "divisible by 16" in v["error"]["message"]
    assert server.service.group is group  # not rebuilt
    assert _wait(server, _post(server, {"prompt": "x", "num_frames": 9}).json()["id"])["status"] == "completed"


# ---- 4. compute: budget, deadline, cancellation inside a step -----------------------------------------------------


def test_a_request_over_the_compute_budget_is_refused_up_front(server):
    err = _error(_post(server, {"prompt": "x", "size": "1280x1280", "num_frames": 17, "num_inference_steps": 1}), 422)
    assert "PFLOP" in err["message"] and "limits.max_pflops" in err["message"], err


@pytest.mark.slow  # a step of ~30 s, stopped early
def test_delete_stops_a_long_step_within_seconds(server):
    vid = _post(server, {"prompt": "x", **LONG_STEP}).json()["id"]
    end = time.time() + 60
    while server.http.get(f"{server.url}/v1/videos/{vid}", timeout=30).json()["status"] != "in_progress":
        assert time.time() < end
        time.sleep(0.05)
    time.sleep(1.0)  # well inside the step
    t0 = time.time()
    assert server.http.delete(f"{server.url}/v1/videos/{vid}", timeout=30).json()["cancel_requested"]
    v = _wait(server, vid, timeout=30)
    assert v["error"]["code"] == "cancelled" and v["steps"]["done"] == 0 and time.time() - t0 < 5, v


@pytest.mark.slow  # a step of ~30 s, stopped early
def test_a_job_past_the_deadline_is_stopped(server):
    t0 = time.time()
    v = _wait(server, _post(server, {"prompt": "x", **LONG_STEP, "seed": 1}).json()["id"], timeout=60)
    assert v["status"] == "failed" and v["error"]["code"] == "deadline_exceeded", v
    assert "limits.max_job_s" in v["error"]["message"] and time.time() - t0 < 6 + 5


@pytest.mark.slow  # a step of ~30 s, stopped early
def test_a_cancelled_step_leaves_the_worker_exact(server):
    """The worker a block-level cancel interrupted makes the same video as before it."""
    from engine.runtime.request import GenerationRequest

    w = server.service.group.member.worker
    small = GenerationRequest(prompt="a red circle", height=64, width=64, num_frames=9, steps=2, seed=4)
    first = w.generate(small, decode=False)["latents"]
    flag = threading.Event()
    threading.Timer(0.5, flag.set).start()
    t0 = time.time()
    long = GenerationRequest(prompt="x", height=320, width=320, num_frames=17, steps=1)
    with pytest.raises(Cancelled):
        w.generate(long, cancel=flag.is_set, in_step=True, decode=False)
    assert time.time() - t0 < 5
    assert (w.generate(small, decode=False)["latents"] == first).all()


# ---- 5. an image bomb on a text-to-video model --------------------------------------------------------------------


def _bomb(w=8192, h=4880, rows=None) -> bytes:
    """A 1-bit PNG of w x h (a few KB); rows: only that many rows of pixel data (a truncated image)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = (b"\0" * (1 + (w + 7) // 8)) * (h if rows is None else rows)
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


class PeakRSS:
    """This process's resident memory above where it started, sampled every 2 ms (the server runs in it)."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.mib = (self.peak - self.base) / 2**20

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        import os

        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_an_image_on_a_text_to_video_model_is_never_decoded(server):
    import base64

    bomb = base64.b64encode(_bomb()).decode()  # 8192x4880: ~120 MB as RGB, 5 KB as sent
    with PeakRSS() as mem:
        for _ in range(4):
            err = _error(_post(server, {"prompt": "x", "image": bomb}), 422)
    assert "text-to-video" in err["message"] and mem.mib < 40, (err, mem.mib)


def test_image_checks_from_the_header():
    """What the image-to-video path does before it decodes (tests/test_api.py runs the I2V pipeline itself)."""
    from engine.runtime import images

    with PeakRSS() as mem, pytest.raises(UserError, match="8192x4880; images up to 8192 pixels a side and 16.7772"):
        images.embed(_bomb(), max_pixels=4096 * 4096)
    assert mem.mib < 40
    with pytest.raises(UserError, match="is 20000x20000"):  # PIL's own check would say only "decompression bomb"
        images.header(_bomb(20000, 20000, rows=1))
    with pytest.raises(UserError, match=r"truncated: its pixel data ends after 10 of 4880 rows"):
        images.decode(_bomb(rows=10))


# ---- 6. key, content type, host -----------------------------------------------------------------------------------


def test_the_api_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = requests.get(f"{server.url}/v1/videos", headers=headers, timeout=30)
        err = _error(r, 401)
        assert err["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
    assert requests.post(f"{server.url}/v1/videos", json={"prompt": "x"}, timeout=30).status_code == 401
    assert server.http.get(f"{server.url}/v1/videos", timeout=30).status_code == 200
    for public in ("/healthz", "/", "/page.js"):  # liveness and the page itself (which asks for the key)
        assert requests.get(server.url + public, timeout=30).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).videos.list()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    v = client.videos.create_and_poll(prompt="a green square", extra_body={"num_frames": 9, "num_inference_steps": 1})
    assert v.status == "completed"


@pytest.mark.parametrize("ctype", ["text/plain", None, "application/x-www-form-urlencoded"])
def test_bodies_must_be_json_or_multipart(server, ctype):
    headers = {"content-type": ctype} if ctype else {}
    r = server.http.post(f"{server.url}/v1/videos", data=b'{"prompt": "x"}', headers=headers, timeout=30)
    if ctype is None:  # requests sends none for bytes: the same as a page's fetch(..., {mode: "no-cors"})
        assert "content-type" not in r.request.headers
    assert _error(r, 415)["code"] == "unsupported_media_type"


def test_a_foreign_host_is_refused(server):
    for host in ("attacker.example", "attacker.example:8000", "127.0.0.1.nip.io"):
        r = server.http.get(f"{server.url}/v1/videos", headers={"Host": host}, timeout=30)
        assert _error(r, 421)["code"] == "misdirected_request"
    assert server.http.get(f"{server.url}/healthz", headers={"Host": "localhost:1234"}, timeout=30).status_code == 200


# ---- 7. bounded state ---------------------------------------------------------------------------------------------


def _request(**kw):
    from engine.runtime.request import GenerationRequest

    return GenerationRequest(prompt="x", height=64, width=64, num_frames=9, steps=1, **kw).to_dict()


def test_retention_removes_old_jobs_and_their_files(tmp_path):
    store = JobStore(tmp_path, retention_s=0.5)
    vid = store.submit(_request(), 10)["id"]
    assert store.claim("me")[0] == vid
    store.save_outputs(vid, b"an mp4", {"id": vid})
    store.finish(vid, "completed")
    v = store.get(vid)
    assert 0 <= v["expires_at"] - v["completed_at"] <= 1
    assert store.purge() == 0  # not yet
    time.sleep(0.6)
    assert store.purge() == 1 and store.get(vid) is None
    assert not store.video_path(vid).exists() and not store.metrics_path(vid).exists()


def test_cancelled_jobs_hold_their_place_in_the_queue(tmp_path):
    store = JobStore(tmp_path)
    a, b = (store.submit(_request(), 2)["id"] for _ in range(2))
    assert store.cancel(a) == "cancelled" and store.cancel(b) == "cancelled"
    with pytest.raises(QueueFull):  # submit + cancel cannot grow the store past the queue
        store.submit(_request(), 2)
    assert store.cancel(a) == "deleted"  # removed: its place is free
    store.submit(_request(), 2)


def test_lists_are_paged_with_a_bounded_limit(server):
    err = _error(server.http.get(f"{server.url}/v1/videos?limit=1000", timeout=30), 422)
    assert err["param"] == "limit" and "between 1 and 100" in err["message"]
    err = _error(_post(server, {"prompt": "x" * 4001}), 422)
    assert err["param"] == "prompt" and "4000" in err["message"]


# ---- the low ones -------------------------------------------------------------------------------------------------


def test_queue_full_reads_the_same_after_crossing_ray():
    e = pickle.loads(pickle.dumps(QueueFull(16)))  # Ray rebuilds a remote exception from its pickle
    assert str(e) == "the queue is full (16 jobs waiting); retry later"


def test_a_slow_body_gets_408(server):
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        head = f"POST /v1/videos HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
        s.sendall((head + "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n").encode() + b'{"prompt":')
        t0 = time.time()
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408") and time.time() - t0 < 5, answer[:200]


def test_methods_redirects_docs_and_health(server):
    r = server.http.options(f"{server.url}/v1/videos", timeout=30)
    assert r.status_code == 405 and set(r.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD", "POST"}
    h = server.http.head(f"{server.url}/healthz", timeout=30)
    assert h.status_code == 200 and h.content == b""
    r = server.http.get(f"{server.url}/v1/videos/", timeout=30, allow_redirects=False)
    assert r.status_code == 404 and "location" not in r.headers
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert server.http.get(server.url + path, timeout=30).status_code == 404
    workers = server.http.get(f"{server.url}/healthz", timeout=30).json()["workers"]
    assert workers and all(set(w) <= {"rank", "alive", "device", "step", "steps", "gpu"} for w in workers)


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"prompt": "x", "size": "1x1"}, "size", "from 16 to 1280"),
        ({"prompt": "x", "size": "６４x６４"}, "size", "WIDTHxHEIGHT"),
    ],
)
def test_confusing_values_name_the_field_sent(server, body, param, words):
    err = _error(_post(server, body), 422)
    assert err["param"] == param and words in err["message"], err


def test_duplicate_keys_are_refused(server):
    err = _error(_post(server, b'{"prompt": "x", "size": "64x64", "size": "1280x1280"}'), 400)
    assert "given twice" in err["message"]


def test_a_cancel_interrupted_by_shutdown_stays_cancelled(tmp_path):
    store = JobStore(tmp_path)
    vid = store.submit(_request(), 10)["id"]
    store.claim("replica")
    assert store.cancel(vid) == "cancelling"
    store.interrupt("replica")  # the replica stops before the step ends
    assert store.get(vid)["error"] == {"code": "cancelled", "message": "cancelled by the client"}


def test_batch_summary_not_run_lists_only_lines_without_an_outcome(tmp_path):
    from engine.runtime.worker import WorkerConfig
    from engine.serving.batch import Batch

    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"prompt": f"p{i}", "id": f"l{i}"}) for i in range(3)) + "\n")
    batch = Batch(manifest, tmp_path / "out", "off", WorkerConfig(), progress=False)
    batch.rendered.append("l0")  # as render_local does under torchrun: lines by position, the queue untouched
    batch.failed(batch.items[1], "bad")
    assert batch.summary("torchrun", 1, 1)["not_run"] == ["l2"]
