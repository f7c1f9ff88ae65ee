import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _offline_cache(tmp_path_factory):
    """Tiny pipelines are built into a per-session folder; nothing touches the network."""
    os.environ["FIS_CACHE"] = str(tmp_path_factory.mktemp("fis-cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield


@pytest.fixture(scope="session")
def tiny_path():
    """Saved tiny pipeline folders, built once per variant per session."""
    from engine.testbed.tiny_wan import ensure_tiny

    return lambda variant="t2v": ensure_tiny(variant)


# One spawned gloo world per size for the whole run, serving tests/test_parallel.py, test_parallel_hunyuan.py and
# test_vae.py (starting a world of CPU processes costs more than most scenarios): tests/scenarios.py, run by
# tests/world.py.
WORLD_SCENARIOS = {
    2: [
        "attention_slices",
        "transformer_sp",
        "pipeline_sp",
        "pipeline_sp_a14b",
        "cfg_parallel",
        "ring_on_cpu",
        "hunyuan_sp",
        "hunyuan_cfg",
        "vae_decode",
        "worker_decode",
        "fa3_ulysses",
        "operators_sp",
        "hunyuan_operators",
        "rank_1_fails",  # last: its failure ends the world, no scenario is left to rerun
    ],
    4: [
        "attention_slices",
        "transformer_sp_4heads",
        "cfg_parallel",
        "bad_heads",
        "hunyuan_sp",
        "hunyuan_cfg",
        "vae_decode",
        "operators_sp",
    ],
}


@pytest.fixture(scope="session")
def spawned(tmp_path_factory):
    """spawned(world, scenario) -> its metrics; the first call for a world size runs all of that world's scenarios."""
    from world import run_world

    cache: dict[int, dict] = {}

    def get(world: int, name: str, failed: bool = False) -> dict:
        """failed=True: the scenario is expected to fail; its {'error': ...} is returned."""
        if world not in cache:
            cache[world] = run_world(world, WORLD_SCENARIOS[world], tmp_path_factory.mktemp(f"world{world}"))
        r = cache[world][name]
        if not failed:
            assert "error" not in r, r.get("error")
        return r

    return get


@pytest.fixture(scope="session")
def ray_cluster():
    """One Ray cluster for the whole run, of two nodes on this machine (a head and a worker node, each a raylet
    with 2 CPUs), shared by the Serve tests, batch rendering on Ray and the multi-node tests (test_cluster.py).
    Yields the ray.cluster_utils.Cluster: a test that removes a node adds one back."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


# Tests that start processes (spawned gloo worlds, a Ray cluster, a wheel build) are `slow`: `make test-fast` leaves
# them out, CI runs everything.
_PROCESS_FIXTURES = {"spawned", "results", "sp_results", "client", "installed", "ray_cluster"}


def pytest_collection_modifyitems(items):
    for item in items:
        if _PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _process_attention_backend_untouched():
    """No engine code may change diffusers' process-wide attention backend: a later model would inherit it (a CPU
    test failed on '_native_flash' left behind by a benchmark test)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    before = _AttentionBackendRegistry._active_backend
    yield
    after = _AttentionBackendRegistry._active_backend
    _AttentionBackendRegistry.set_active_backend(before)  # one leak, one failure: not every later test
    assert after == before, f"the process-wide attention backend changed from {before} to {after}"
