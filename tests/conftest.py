import os
import sys
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


def run_cli(script: str, *args, nproc: int | None = None, cwd=None, timeout=300):
    """launch/<script> in a subprocess; nproc: under torchrun with that many processes (gloo on CPU)."""
    import subprocess

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    torchrun = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run(
        [sys.executable, *torchrun, str(ROOT / "launch" / script), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_hunyuan_transformer(heads: int = 2):
    """A tiny random HunyuanVideo15Transformer3DModel (5 dual-stream blocks), seed 0."""
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(0)
    return HunyuanVideo15Transformer3DModel(
        in_channels=9,
        out_channels=4,
        num_attention_heads=heads,
        attention_head_dim=16,
        num_layers=5,
        num_refiner_layers=1,
        text_embed_dim=16,
        text_embed_2_dim=8,
        image_embed_dim=8,
        rope_axes_dim=(4, 6, 6),
        target_size=32,
    ).eval()


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
