"""parallel/: degrees and layouts in-process; sequence and CFG parallelism in 2 and 4 spawned gloo processes.

The multi-process scenarios live in tests/scenarios.py; one spawn per world size runs them all for this module and
test_parallel_hunyuan.py (process start-up dominates on CPU) and the tests below read their results.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from parallel import Degrees, ParallelContext, TokenLayout, init_parallel, parallelize_pipeline

TOL = 1e-5  # float32; Ulysses changes only the order of the attention sums (spatial) or nothing (frame)


@pytest.fixture(scope="module")
def results(spawned):
    """results(world, scenario) -> its metrics (one spawned world per size for the whole run: conftest.py)."""
    return spawned


def _assert_close(r: dict, prefix: str = "") -> None:
    checked = {k: v for k, v in r.items() if k.startswith(prefix)}
    assert checked, f"no metrics starting with {prefix!r}"
    bad = {k: v for k, v in checked.items() if not v <= TOL}
    assert not bad, f"parallel != single process: {bad}"


# ---- in-process ------------------------------------------------------------------------------------------
def test_degrees_validation_messages():
    assert Degrees(cfg=2, ulysses=2).validate(4, num_heads=40).world_size == 4
    with pytest.raises(ValueError, match=r"cfg=1 x ring=1 x ulysses=2 = 2 must equal the number of processes \(4\)"):
        Degrees(ulysses=2).validate(4)
    with pytest.raises(ValueError, match="ulysses degree 4 must divide the model's 2 attention heads"):
        Degrees(ulysses=4).validate(4, num_heads=2)
    with pytest.raises(ValueError, match="cfg degree must be 1 or 2"):
        Degrees(cfg=3)
    with pytest.raises(ValueError, match="ulysses must be an integer >= 1"):
        Degrees(ulysses=0)


def test_init_parallel_rejects_before_starting(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="must equal the number of processes"):
        init_parallel(Degrees(ulysses=2))
    assert not dist.is_initialized()


def test_single_process_short_circuits():
    from engine.testbed.tiny_wan import build_pipeline

    ctx = init_parallel(Degrees())
    assert isinstance(ctx, ParallelContext) and not ctx.is_distributed and ctx.is_main
    assert ctx.group("cfg") is None and ctx.sp_group is None and ctx.axis_rank("ulysses") == 0 and ctx.sp_rank == 0
    with pytest.raises(ValueError, match="unknown mesh axis"):
        ctx.group("tp")
    pipe = build_pipeline("t2v")
    handle = parallelize_pipeline(pipe, ctx)
    assert not hasattr(pipe.transformer, "_diffusers_hook")
    handle.remove()
    with pytest.raises(ValueError, match="shard must be one of spatial, frame"):
        parallelize_pipeline(pipe, ctx, shard="rows")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="xDiT USP\\) runs on CUDA only"):
            parallelize_pipeline(pipe, ctx, attention="xfuser")


@pytest.mark.parametrize("mode", ["spatial", "frame"])
@pytest.mark.parametrize("frames,hw,parts", [(5, 16, 2), (5, 9, 4), (3, 2, 4), (7, 12, 4)])
def test_layout_roundtrip(mode, frames, hw, parts):
    x = torch.arange(2 * frames * hw * 3, dtype=torch.float32).view(2, frames * hw, 3)  # [B, N, C]
    layouts = [TokenLayout(mode, frames, hw, parts, r) for r in range(parts)]
    pieces = [lay.local(x, 1) for lay in layouts]
    assert [p.shape[1] for p in pieces] == list(layouts[0].sizes)
    assert sum(layouts[0].sizes) == frames * hw
    assert torch.equal(layouts[0].assemble(pieces, 1), x)
    if mode == "spatial":  # every rank holds every frame, frame-major: the FIS hook's HW = N // F holds
        for lay, p in zip(layouts, pieces):
            lo, hi = lay.bounds[lay.rank]
            assert torch.equal(p.view(2, frames, hi - lo, 3), x.view(2, frames, hw, 3)[:, :, lo:hi])


# ---- 2 and 4 processes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [2, 4])
def test_attention_slice_equals_full_attention_slice(results, world):
    _assert_close(results(world, "attention_slices"))


def test_transformer_sp_equals_single_process_2(results):
    r = results(2, "transformer_sp")
    _assert_close(r, "spatial_")
    _assert_close(r, "frame_")
    _assert_close(r, "removed_")
    assert min(v for k, v in r.items() if k.startswith("fis_effect")) > 1e-3  # the FIS cases were sparse
    assert "call apply_fis before parallelize_pipeline" in r["order_guard"]


def test_transformer_sp_equals_single_process_4(results):
    r = results(4, "transformer_sp_4heads")
    _assert_close(r, "spatial_")
    _assert_close(r, "frame_")
    _assert_close(r, "removed_")
    assert min(v for k, v in r.items() if k.startswith("fis_effect")) > 1e-3


@pytest.mark.parametrize("world", [2, 4])  # 4 frame ranks of 5 frames: a rank may own no anchor
def test_attention_scope_operators_sp_equal_single_process(results, world):
    r = results(world, "operators_sp")
    for prefix in ("spatial_", "frame_", "removed_"):
        _assert_close(r, prefix)
    assert min(v for k, v in r.items() if k.startswith("fis_effect")) > 1e-3


@pytest.mark.parametrize("scenario", ["pipeline_sp", "pipeline_sp_a14b"])  # TI2V, A14B (two experts)
def test_pipeline_sp_equals_single_process(results, scenario):
    r = results(2, scenario)
    _assert_close(r, "spatial_")
    _assert_close(r, "frame_")
    assert min(v for k, v in r.items() if k.startswith("fis_effect")) > 1e-3


@pytest.mark.parametrize("world", [2, 4])
def test_cfg_parallel_equals_serial_cfg(results, world):
    r = results(world, "cfg_parallel")
    for prefix in ("cfg_", "nocfg_", "embeds_", "removed_"):
        _assert_close(r, prefix)
    assert {v for k, v in r.items() if k.startswith("calls_")} == {3.0}  # one forward per step per rank


def test_heads_not_divisible_by_ulysses_fails_before_work(results):
    r = results(4, "bad_heads")
    assert "ulysses degree 4 must divide the model's 2 attention heads" in r["message"]
    assert r["hooked"] == 0.0


def test_ring_needs_cuda(results):
    assert "needs CUDA attention kernels" in results(2, "ring_on_cpu")["message"]


def test_a_rank_that_fails_reports_its_own_error(results):
    """Not rank 0's timeout in the collective it was left in (120 s), but rank 1's traceback."""
    r = results(2, "rank_1_fails", failed=True)
    assert r["error"].startswith("rank1: ") and "RuntimeError: rank 1 failed on purpose" in r["error"], r
