"""Across nodes, for real: the session's Ray cluster has two nodes on this machine (conftest.ray_cluster: a head
and a worker node, separate raylets with 2 CPUs each). Two Serve replicas, one per node, each driving a worker group
beside it, share the job store actor on the head; jobs run on both; the worker node is killed mid-job: its job
fails with the reason, the other replica goes on serving, nothing completed is lost and the queue drains. Batch
rendering (run first, beside the app) spreads its groups over both nodes."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest
import ray
import requests
from helpers import free_port, run_cli
from ray import serve

from engine.serving.config import DEFAULT_CONFIG, load_config
from engine.serving.jobs import JobStore
from engine.serving.ray_executor import serve_app

QUICK = {"size": "32x32", "num_frames": 5, "num_inference_steps": 1, "fis": "off"}
SLOW = {"size": "128x128", "num_frames": 17, "num_inference_steps": 1000, "fis": "off"}  # minutes: stopped early


def _nodes_of(prefix: str) -> dict[str, str]:
    """Alive actors whose name or class starts with `prefix` -> their node ids. From the GCS's actor table: Ray's
    public state API needs the dashboard, which the test cluster does not start."""
    from ray._private.state import actors

    return {
        a["Name"] or key: a["Address"]["NodeID"]
        for key, a in actors().items()
        if a["State"] == "ALIVE" and (a["Name"].startswith(prefix) or a["ActorClassName"].startswith(prefix))
    }


@pytest.fixture(scope="module")
def app(ray_cluster, tiny_path, tmp_path_factory):
    config = load_config(
        DEFAULT_CONFIG,
        [
            f"model.model={tiny_path('t2v')}",
            "model.device=cpu",
            "serve.replicas=2",
            "serve.max_replicas_per_node=1",
            f"serve.output_dir={tmp_path_factory.mktemp('cluster')}",
            "serve.job_lease_s=3",
            "serve.queue_size=32",
            "limits.max_steps=1000",
        ],
    )
    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    serve.run(serve_app(config), name="fis", route_prefix="/")
    yield f"http://127.0.0.1:{port}", config
    serve.shutdown()


def _submit(url, **fields) -> str:
    r = requests.post(f"{url}/v1/videos", json={"prompt": "a red ball moving left", **fields}, timeout=30)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _wait(url, vid, until=("completed", "failed"), timeout=120) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        j = requests.get(f"{url}/v1/videos/{vid}", timeout=30).json()
        if j["status"] in until:
            return j
        time.sleep(0.2)
    raise AssertionError(f"{vid} did not reach {until}: {j}")


def _owners(config, ids) -> dict[str, str]:
    """Which replica ran each job (the store's own column; the API does not show it)."""
    db = sqlite3.connect(JobStore(config.serve.output_dir).path)
    try:
        return {i: db.execute("SELECT owner FROM jobs WHERE id = ?", (i,)).fetchone()[0] for i in ids}
    finally:
        db.close()


def test_batch_rendering_spans_both_nodes(app, tiny_path, tmp_path):
    """Beside the app (each replica's group holds one of its node's two CPUs), two render groups of one rank find
    one free CPU per node: one group on each."""
    from ray._private.state import available_resources_per_node

    assert sorted(r.get("CPU", 0) for r in available_resources_per_node().values()) == [1.0, 1.0]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"prompt": f"a dog number {i}", **QUICK, "seed": i}) for i in range(4)))
    out = tmp_path / "out"
    args = ["--output-dir", out, "--model", tiny_path("t2v"), "--ray", "--groups", "2", "--device", "cpu"]
    r = run_cli("render.py", manifest, *args, "--no-progress")
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert (s["groups"], s["ranks_per_group"], s["done"], s["failed"], s["not_run"]) == (2, 1, 4, 0, [])


def test_two_nodes_serve_lose_one_and_drain(app, ray_cluster):
    url, config = app
    head = ray.get_runtime_context().get_node_id()
    replicas = _nodes_of("ServeReplica:fis:fis-video")
    workers = _nodes_of("fis-worker-")
    assert len(replicas) == 2 and len(set(replicas.values())) == 2, replicas  # one replica per node
    assert len(workers) == 2 and set(workers.values()) == set(replicas.values())  # each group beside its replica
    assert _nodes_of("fis-jobs-") and set(_nodes_of("fis-jobs-").values()) == {head}  # the store on the head

    done = [_submit(url, **QUICK, seed=i) for i in range(4)]
    assert [_wait(url, v)["status"] for v in done] == ["completed"] * 4
    assert len(set(_owners(config, done).values())) == 2  # both replicas took jobs

    slow = [_submit(url, **SLOW, seed=i) for i in range(2)]  # one on each replica
    end = time.time() + 60
    while {_wait(url, v, ("in_progress", "completed", "failed"))["status"] for v in slow} != {"in_progress"}:
        assert time.time() < end, "both slow jobs should be running, one per replica"
        time.sleep(0.2)
    queued = [_submit(url, **QUICK, seed=10 + i) for i in range(4)]
    worker_node = next(n for n in ray_cluster.worker_nodes)
    ray_cluster.remove_node(worker_node, allow_graceful=False)  # the whole second node: raylet, replica, workers

    end = time.time() + 60
    while not (lost := [j for v in slow if (j := _wait(url, v, ("in_progress", "failed")))["status"] == "failed"]):
        assert time.time() < end, "the lost node's job should fail once its lease runs out"
        time.sleep(0.2)
    assert len(lost) == 1 and lost[0]["error"]["code"] == "interrupted", lost  # the lost node's job, with the reason
    assert "lost node" in lost[0]["error"]["message"]
    survivor = next(v for v in slow if v != lost[0]["id"])
    assert _wait(url, survivor, ("in_progress",))["status"] == "in_progress"  # still going on the head
    requests.delete(f"{url}/v1/videos/{survivor}", timeout=30)  # stop it early: the queue behind it drains
    assert [_wait(url, v, timeout=180)["status"] for v in queued] == ["completed"] * 4  # the survivor drains it
    for v in done:  # nothing completed is lost: the store lives on the head
        r = requests.get(f"{url}/v1/videos/{v}/content", timeout=30)
        assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    ray_cluster.add_node(num_cpus=2)  # the next tests get their two nodes back
    ray_cluster.wait_for_nodes()
