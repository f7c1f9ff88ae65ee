"""The Ray Serve endpoint end to end: a real local Ray cluster, real HTTP on 127.0.0.1, the tiny model on a
2-rank gloo worker group (two CPU actors). One app serves the whole module; tests run in file order, and the
last one restarts it."""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import requests
from helpers import chunked_body, free_port, run_cli
from ray import serve

from engine.errors import UserError
from engine.runtime.io import read_mp4
from engine.serving.config import DEFAULT_CONFIG, load_config
from engine.serving.jobs import JobStore
from engine.serving.ray_executor import serve_app

QUEUE = 24
SMALL = {"size": "32x32", "num_frames": 17, "num_inference_steps": 2}  # the default FIS preset: balanced
FAST = {"size": "32x32", "num_frames": 1, "num_inference_steps": 1, "fis": "off"}
LONG = {"size": "128x128", "num_frames": 17, "num_inference_steps": 400, "fis": "off"}  # cancelled or killed early


def _actor(prefix: str):
    """A named actor, wherever its namespace (replicas create their workers in their own)."""
    a = next(a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))
    return ray.get_actor(a["name"], namespace=a["namespace"])


def _workers() -> list[str]:
    """The worker actors' names, rank 0 first (/healthz no longer names them: issue 18)."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    return sorted(n for n in names if n.startswith("fis-worker-"))


def _pids() -> list[int]:
    return [ray.get(_actor(n).health.remote())["pid"] for n in _workers()]


class Client:
    def __init__(self, url: str, store: JobStore):
        self.url, self.store = url, store

    def post(self, body, **kw):
        return requests.post(f"{self.url}/v1/videos", json=body, timeout=30, **kw)

    def submit(self, **fields) -> str:
        r = self.post({"prompt": "a red ball moving left", **fields})
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "queued"
        return r.json()["id"]

    def get(self, path: str):
        return requests.get(f"{self.url}{path}", timeout=30)

    def job(self, vid: str) -> dict:
        r = self.get(f"/v1/videos/{vid}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait(self, vid: str, until=("completed", "failed"), timeout=120, step=0) -> dict:
        end = time.time() + timeout
        while time.time() < end:
            j = self.job(vid)
            if j["status"] in until and j["steps"]["done"] >= step:
                return j
            time.sleep(0.1)
        raise AssertionError(f"{vid} did not reach {until} in {timeout} s: {j}")

    def healthy(self, replacing: list[str], timeout=120) -> list[dict]:
        """Wait for a healthy worker group other than `replacing` (the worker actors before a kill)."""
        old = set(replacing)
        end = time.time() + timeout
        while time.time() < end:
            try:
                r = self.get("/healthz")
                if r.status_code == 200 and old.isdisjoint(_workers()):
                    return r.json()["workers"]
            except (requests.ConnectionError, requests.Timeout):  # the replica is restarting
                pass
            time.sleep(0.5)
        raise AssertionError("no new healthy worker group")


def test_config_file_and_overrides(tmp_path, capsys):
    c = load_config(
        DEFAULT_CONFIG,
        [
            "serve.queue_size=3",
            "parallel.ulysses=2",
            "model.model=/models/wan",
            "limits.max_steps=8",
            f"serve.output_dir={tmp_path / 'o'}",
        ],
    )
    assert (c.serve.queue_size, c.model.ulysses, c.model.model, c.limits.max_steps) == (3, 2, "/models/wan", 8)
    assert c.model.lora is None and c.serve.output_dir == str(tmp_path / "o")  # "" -> None; absolute
    for overrides, words in [
        (["serve.queue_size=lots"], "serve.queue_size must be an integer"),
        (["serve.colour=red"], "unknown setting serve.colour"),
        (["model.ulysses=2"], "unknown setting model.ulysses"),
        (["parallel.ring=0"], "parallel.ring must be an integer >= 1"),
        (["serve.fis=turbo"], "serve.fis must be one of"),
        (["queue_size=3"], "section.key=value"),
    ]:
        with pytest.raises(UserError, match=words):
            load_config(DEFAULT_CONFIG, overrides)
    from launch.serve import main

    with pytest.raises(SystemExit) as e:
        main(["--config", str(tmp_path / "missing.toml")])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err


@pytest.fixture(scope="module")
def config(tiny_path, tmp_path_factory):
    return load_config(
        DEFAULT_CONFIG,
        [
            f"model.model={tiny_path('t2v')}",
            "model.device=cpu",
            "parallel.ulysses=2",
            f"serve.output_dir={tmp_path_factory.mktemp('serve')}",
            f"serve.queue_size={QUEUE}",
            "serve.job_lease_s=4",
            "limits.max_steps=1000",
        ],
    )


@pytest.fixture(scope="module")
def client(config, ray_cluster):
    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    serve.run(serve_app(config), name="fis", route_prefix="/")
    yield Client(f"http://127.0.0.1:{port}", JobStore(config.serve.output_dir))
    serve.shutdown()


def test_round_trip(client):
    vid = client.submit(**SMALL)
    j = client.wait(vid)
    assert j["status"] == "completed", j
    assert j["progress"] == 100 and j["steps"] == {"done": 2, "total": 2}
    assert j["request"]["size"] == "32x32" and j["request"]["fis"]["name"] == "balanced"
    assert {"queued_s", "run_s", "denoise_s", "decode_s"} <= set(j["timings"])
    r = client.get(f"/v1/videos/{vid}/content")
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    path = client.store.video_path(vid)
    assert r.content == path.read_bytes()
    assert read_mp4(path).shape == (17, 32, 32, 3)
    assert json.loads(client.store.metrics_path(vid).read_text())["id"] == vid
    assert vid in [v["id"] for v in client.get("/v1/videos").json()["data"]]
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and [w["rank"] for w in health["workers"]] == [0, 1]
    assert all(w["alive"] and w["device"] == "cpu" and w["gpu"] is None for w in health["workers"])
    model = client.get("/v1/models").json()["data"][0]
    assert model["world_size"] == 2 and model["degrees"]["ulysses"] == 2 and model["default_fis"] == "balanced"


def _raw(body: bytes):
    return {"data": body, "headers": {"content-type": "application/json"}}


P = {"prompt": "a cat"}
BAD = [  # (id, method, path, request kwargs, status, param, words in the message)
    ("not-json", "POST", "/v1/videos", _raw(b"{"), 400, "body", "not valid JSON"),
    ("not-object", "POST", "/v1/videos", {"json": ["a cat"]}, 422, "body", "JSON object"),
    ("no-prompt", "POST", "/v1/videos", {"json": {"size": "32x32"}}, 422, "prompt", "required"),
    ("prompt-int", "POST", "/v1/videos", {"json": {"prompt": 7}}, 422, "prompt", "must be a string"),
    ("prompt-blank", "POST", "/v1/videos", {"json": {"prompt": "   "}}, 422, "prompt", "non-empty"),
    ("frames-str", "POST", "/v1/videos", {"json": {**P, "num_frames": "17"}}, 422, "num_frames", "integer"),
    ("frames-4k+1", "POST", "/v1/videos", {"json": {**P, "num_frames": 18}}, 422, "num_frames", "4k+1"),
    ("frames-huge", "POST", "/v1/videos", {"json": {**P, "num_frames": 10**12}}, 422, "num_frames", "between"),
    ("height-neg", "POST", "/v1/videos", {"json": {**P, "height": -32, "width": 32}}, 422, "height", "between"),
    ("width-huge", "POST", "/v1/videos", {"json": {**P, "width": 99999}}, 422, "width", "between"),
    ("height-multiple", "POST", "/v1/videos", {"json": {**P, "height": 40}}, 422, "height", "multiple of 16"),
    ("size-words", "POST", "/v1/videos", {"json": {**P, "size": "huge"}}, 422, "size", "WIDTHxHEIGHT"),
    ("size-huge", "POST", "/v1/videos", {"json": {**P, "size": "99999x99999"}}, 422, "size", "between"),
    ("size-and-height", "POST", "/v1/videos", {"json": {**P, "size": "32x32", "height": 32}}, 422, "size", "not both"),
    (
        "steps-zero",
        "POST",
        "/v1/videos",
        {"json": {**P, "num_inference_steps": 0}},
        422,
        "num_inference_steps",
        "between",
    ),
    (
        "steps-bool",
        "POST",
        "/v1/videos",
        {"json": {**P, "num_inference_steps": True}},
        422,
        "num_inference_steps",
        "integer",
    ),
    ("guidance-str", "POST", "/v1/videos", {"json": {**P, "guidance_scale": "high"}}, 422, "guidance_scale", "number"),
    ("seed-neg", "POST", "/v1/videos", {"json": {**P, "seed": -1}}, 422, "seed", "between"),
    ("fis-unknown", "POST", "/v1/videos", {"json": {**P, "fis": "turbo"}}, 422, "fis.preset", "unknown FIS preset"),
    ("fis-path", "POST", "/v1/videos", {"json": {**P, "fis": "../../etc/passwd"}}, 422, "fis.preset", "unknown FIS"),
    (
        "fis-setting-path",
        "POST",
        "/v1/videos",
        {"json": {**P, "fis": {"file": "/etc/passwd"}}},
        422,
        "fis.file",
        "unknown fis setting",
    ),
    (
        "fis-stride",
        "POST",
        "/v1/videos",
        {"json": {**P, **SMALL, "fis": {"stride": 9}}},
        422,
        "fis",
        "smaller than the number of latent frames",
    ),
    ("id-path", "POST", "/v1/videos", {"json": {**P, "id": "../../etc/passwd"}}, 422, "id", "unknown field"),
    ("unknown-field", "POST", "/v1/videos", {"json": {**P, "colour": "red"}}, 422, "colour", "unknown field"),
    ("model-unknown", "POST", "/v1/videos", {"json": {**P, "model": "other"}}, 404, "model", "not served here"),
    ("body-too-large", "POST", "/v1/videos", {"json": {"prompt": "x" * 100_000}}, 413, None, "limit"),
    ("body-too-large-chunked", "POST", "/v1/videos", {**_raw(b""), "data": chunked_body}, 413, None, "limit"),
    ("id-unknown", "GET", "/v1/videos/video_" + "0" * 32, {}, 404, "video_id", "no video"),
    ("id-malformed", "GET", "/v1/videos/not-an-id", {}, 404, "video_id", "no video"),
    ("id-path-encoded", "GET", "/v1/videos/..%2F..%2Fetc%2Fpasswd", {}, 404, None, "Not Found"),
    ("id-path-dots", "GET", "/v1/videos/..passwd/content", {}, 404, "video_id", "no video"),
    ("delete-unknown", "DELETE", "/v1/videos/video_" + "f" * 32, {}, 404, "video_id", "no video"),
    ("list-limit", "GET", "/v1/videos?limit=0", {}, 422, "limit", "between"),
    ("list-limit-type", "GET", "/v1/videos?limit=lots", {}, 422, "limit", "integer"),
]


@pytest.mark.parametrize("method, path, kw, status, param, words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input(client, method, path, kw, status, param, words):
    kw = {k: v() if callable(v) else v for k, v in kw.items()}
    r = requests.request(method, client.url + path, timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["param"] == param, err
    assert len(err["message"]) < 300


def test_still_serving_and_path_like_text_is_only_text(client):
    """After the bad inputs: healthy, and a path-like prompt is just a prompt; the file is named by the id."""
    assert client.get("/healthz").status_code == 200
    vid = client.submit(**FAST, negative_prompt="../../etc/passwd")
    assert client.wait(vid)["status"] == "completed"
    assert sorted(p.name for p in client.store.videos.glob(f"{vid}*")) == [f"{vid}.metrics.json", f"{vid}.mp4"]


def test_queue_full_then_cancel(client):
    running = client.submit(**LONG)
    client.wait(running, until=("in_progress",))
    queued = [client.submit(**FAST) for _ in range(QUEUE)]
    r = client.post({"prompt": "one too many", **FAST})
    assert r.status_code == 429 and "queue is full" in r.json()["error"]["message"]
    assert r.headers["retry-after"] == "5"
    for vid in queued:  # DELETE on a queued job cancels it
        assert requests.delete(f"{client.url}/v1/videos/{vid}").json()["status"] == "cancelled"
    r = requests.delete(f"{client.url}/v1/videos/{running}").json()  # on a running one: stops at the next step
    assert r["cancel_requested"] and not r["deleted"]
    j = client.wait(running)
    assert j["status"] == "failed" and j["error"]["code"] == "cancelled" and j["steps"]["done"] < 400, j
    assert client.job(queued[0])["error"] == {"code": "cancelled", "message": "cancelled by the client"}
    r = requests.delete(f"{client.url}/v1/videos/{queued[0]}").json()  # on a finished one: deletes it
    assert r["deleted"]
    assert client.get(f"/v1/videos/{queued[0]}").status_code == 404
    for vid in queued[1:]:  # cancelled before they started, they hold their queue places until removed (issue 18)
        assert requests.delete(f"{client.url}/v1/videos/{vid}").json()["deleted"]


def test_concurrent_submissions_all_complete(client):
    n = 22
    prompts = [f"a red ball number {i}" for i in range(n)]
    with ThreadPoolExecutor(n) as pool:
        responses = list(pool.map(lambda p: client.post({"prompt": p, **FAST, "seed": len(p)}), prompts))
    assert [r.status_code for r in responses] == [202] * n
    ids = [r.json()["id"] for r in responses]
    assert len(set(ids)) == n
    jobs = [client.wait(vid) for vid in ids]
    assert [j["status"] for j in jobs] == ["completed"] * n
    assert [j["request"]["prompt"] for j in jobs] == prompts  # each id kept its own request
    listed, page = [], {"has_more": True, "last_id": None}
    while page["has_more"]:  # pages of at most 100 (issue 18)
        after = {"after": page["last_id"]} if page["last_id"] else {}
        page = requests.get(f"{client.url}/v1/videos", params={"limit": 100, **after}, timeout=30).json()
        listed += [v["id"] for v in page["data"]]
    assert all(listed.count(vid) == 1 for vid in ids)
    for vid in ids:
        assert client.get(f"/v1/videos/{vid}/content").status_code == 200
    assert read_mp4(client.store.video_path(ids[-1])).shape == (1, 32, 32, 3)


def test_replicas_share_one_store_actor_on_the_head_node(client, config, tmp_path):
    """Replicas reach the queue, records and videos only through the cluster's store actor, so a replica on
    another node needs no shared disk: the actor answers for the output directory it owns."""
    from engine.serving.jobs import QueueFull
    from engine.serving.ray_executor import shared_store

    done = client.submit(size="32x32", num_frames=17, num_inference_steps=1)
    assert client.wait(done)["status"] == "completed"
    store = shared_store(config.serve.output_dir)  # the same actor the replicas use
    assert done in {j["id"] for j in store.list(100)[0]}
    assert store.video_bytes(done) == client.store.video_path(done).read_bytes()
    other = shared_store(str(tmp_path / "other"))  # another output directory: another actor, its own queue
    from engine.runtime.request import GenerationRequest

    request = GenerationRequest(prompt="a cat", height=32, width=32, num_frames=17, steps=2).to_dict()
    other.submit(request, 1)
    with pytest.raises(QueueFull):  # the store's own exceptions cross the actor boundary as themselves
        other.submit(request, 1)
    job_id, _ = other.claim("test")
    other.save_outputs(job_id, b"not really an mp4", {"id": job_id})
    assert other.video_bytes(job_id) == b"not really an mp4"
    assert (tmp_path / "other" / "videos" / f"{job_id}.mp4").read_bytes() == b"not really an mp4"


def test_a_request_error_does_not_restart_the_group(client):
    """72x72 fits the embedded model's VAE x patch (8) but not Wan's pipeline (16): refused before it is queued,
    and the worker group is the same processes before and after (issue 18: it used to be killed and rebuilt)."""
    before = _pids()
    r = client.post({"prompt": "a red circle", "size": "72x72", **{k: v for k, v in FAST.items() if k != "size"}})
    assert r.status_code == 422 and r.json()["error"]["param"] == "size", r.text
    assert client.wait(client.submit(**FAST))["status"] == "completed" and _pids() == before


def test_cancel_inside_one_step_under_sequence_parallelism(client):
    """One step of ~20 s over 2 gloo ranks: DELETE stops it within seconds (every rank at the same block), and
    the group goes on serving."""
    before = _pids()
    vid = client.submit(size="640x640", num_frames=65, num_inference_steps=1, fis="off", guidance_scale=1.0)
    client.wait(vid, until=("in_progress",))
    time.sleep(1.0)
    t0 = time.time()
    assert requests.delete(f"{client.url}/v1/videos/{vid}", timeout=30).json()["cancel_requested"]
    j = client.wait(vid, timeout=30)
    assert j["error"]["code"] == "cancelled" and j["steps"]["done"] == 0 and time.time() - t0 < 5, j
    assert client.wait(client.submit(**SMALL))["status"] == "completed" and _pids() == before


@pytest.mark.slow
def test_worker_killed_mid_job(client):
    before = _workers()
    vid = client.submit(**LONG)
    client.wait(vid, until=("in_progress",), step=1)
    ray.kill(_actor(before[1]))
    j = client.wait(vid)
    assert j["status"] == "failed" and "worker rank 1" in j["error"]["message"] and "died" in j["error"]["message"], j
    assert j["error"]["code"] == "worker_failed" and "fis-worker" not in j["error"]["message"]  # no internals
    assert len(client.healthy(replacing=before)) == 2  # the replica rebuilt its worker group
    assert client.wait(client.submit(**SMALL))["status"] == "completed"


@pytest.mark.slow
def test_restart_keeps_jobs(client):
    """Kill the replica (a crash: no shutdown code runs). Serve starts a new one on the same job store: completed
    jobs are still listed and downloadable; the job that was running is reported failed ('interrupted') once its
    lease runs out. Then a clean shutdown reports its running job interrupted at once."""
    done = client.submit(**SMALL)
    assert client.wait(done)["status"] == "completed"
    before = _workers()
    running = client.submit(**LONG)
    client.wait(running, until=("in_progress",), step=1)
    ray.kill(_actor("SERVE_REPLICA::fis#fis-video"), no_restart=True)
    client.healthy(replacing=before)
    j = client.wait(running, timeout=60)
    assert j["status"] == "failed" and j["error"]["code"] == "interrupted", j
    assert done in [v["id"] for v in client.get("/v1/videos").json()["data"]]
    r = client.get(f"/v1/videos/{done}/content")
    assert r.status_code == 200 and r.content == client.store.video_path(done).read_bytes()
    assert read_mp4(client.store.video_path(done)).shape == (17, 32, 32, 3)

    last = client.submit(**LONG)
    client.wait(last, until=("in_progress",), step=1)
    serve.delete("fis")
    j = client.store.get(last)
    assert j["status"] == "failed" and j["error"]["code"] == "interrupted", j


def test_serve_without_a_working_ray_says_so_in_one_line(monkeypatch):
    """Ray missing, or installed against other versions of its dependencies (seen on a GPU machine: grpcio-reflection
    newer than grpcio): one line naming the cause and the way out, exit 2, no traceback."""
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    r = run_cli("serve.py")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("serve: error: Ray Serve cannot be imported") and "--executor local" in lines[0]
