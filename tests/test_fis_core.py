"""fis/: schedule, gates, reconstruction, config validation (no model involved)."""

import pytest
import torch

from fis import FISConfig, FISConfigError, anchor_frames, interp_table, parse_blocks
from fis.reconstruct import FrameTables, reconstruct, select_frames


@pytest.mark.parametrize("F", [5, 9, 21, 31])
@pytest.mark.parametrize("s", [2, 3, 4, 5])
def test_interleaved_schedule_covers_every_frame_once_per_s_blocks(F, s):
    if s >= F:
        pytest.skip("stride must be below the frame count")
    plan = FISConfig(stride=s, dense_head=2, dense_tail=2).resolve(40, F, 4)
    blocks = plan.sparse_blocks
    for start in range(len(blocks) - s + 1):
        window = blocks[start : start + s]
        counts = {f: 0 for f in range(1, F - 1)}
        for b in window:
            a = plan.anchors(b, 0)
            assert a[0] == 0 and a[-1] == F - 1  # boundary frames are always anchors
            for f in a:
                if 0 < f < F - 1:
                    counts[f] += 1
        assert set(counts.values()) == {1}, (window, counts)


def test_offset_formula_and_fixed_anchors():
    plan = FISConfig(stride=3, dense_head=4, dense_tail=0).resolve(10, 12, 4)
    # Eq. 11: offset (l - l0) mod s, l0 = 4
    assert [plan.offset(b) for b in range(4, 10)] == [0, 1, 2, 0, 1, 2]
    assert plan.anchors(5, 0) == (0, 1, 4, 7, 10, 11)
    fixed = FISConfig(stride=3, dense_head=4, dense_tail=0, interleave=False).resolve(10, 12, 4)
    assert len({fixed.anchors(b, 0) for b in range(4, 10)}) == 1


def test_block_and_step_gates():
    plan = FISConfig(stride=2, dense_head=1, dense_tail=2, dense_steps=1).resolve(8, 9, 4)
    assert plan.sparse_blocks == (1, 2, 3, 4, 5)
    for b in range(8):
        for step in range(4):
            sparse = plan.anchors(b, step) is not None
            assert sparse == (1 <= b <= 5 and step < 3), (b, step)
    # explicit block list; no step protection
    plan = FISConfig(stride=2, dense_head=0, dense_tail=0, blocks="0,3-4", dense_steps=0).resolve(8, 9, 4)
    assert [b for b in range(8) if plan.anchors(b, 3) is not None] == [0, 3, 4]


def test_stride_one_is_dense():
    plan = FISConfig(stride=1).resolve(6, 9, 4)
    assert all(plan.anchors(b, 0) is None for b in range(6))


def test_interp_table_weights():
    anchors = anchor_frames(7, 3, 0)  # (0, 3, 6)
    left, right, w = interp_table(anchors, 7)
    assert anchors == (0, 3, 6)
    assert left == [0, 0, 0, 1, 1, 1, 2] and right == [0, 1, 1, 1, 2, 2, 2]
    assert w == pytest.approx([0, 1 / 3, 2 / 3, 0, 1 / 3, 2 / 3, 0])


@pytest.mark.parametrize("operator", ["linear", "residual"])
@pytest.mark.parametrize("offset", [0, 1, 2])
def test_reconstruction_exact_for_linear_in_time_states(operator, offset):
    torch.manual_seed(0)
    B, F, HW, C = 2, 11, 6, 8
    f = torch.arange(F, dtype=torch.float64).view(1, F, 1, 1)
    a, b = torch.randn(B, 1, HW, C, dtype=torch.float64), torch.randn(B, 1, HW, C, dtype=torch.float64)
    y = (a + b * f).reshape(B, F * HW, C)  # block output, linear in time
    x = (b - 2 * a * f).reshape(B, F * HW, C)  # block input, also linear: so is the update y - x
    anchors = anchor_frames(F, 3, offset)
    t = FrameTables.build(anchors, F, "cpu")
    w64 = torch.tensor(interp_table(anchors, F)[2], dtype=torch.float64)  # exact weights for an exact check
    t = FrameTables(t.anchors, t.left, t.right, w64, F)
    y_a = select_frames(y, t.anchors, F)  # what the block computes on anchors only
    out = reconstruct(y_a, t, None if operator == "linear" else x)
    torch.testing.assert_close(out, y, rtol=0, atol=1e-12)
    # anchors are copied bit for bit
    assert torch.equal(select_frames(out, t.anchors, F), y_a)


def test_reconstruction_differs_on_nonlinear_states():
    torch.manual_seed(0)
    F, HW, C = 9, 4, 4
    y = torch.randn(1, F * HW, C)
    t = FrameTables.build(anchor_frames(F, 2, 0), F, "cpu")
    assert not torch.allclose(reconstruct(select_frames(y, t.anchors, F), t), y)


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(stride=0), "stride must be >= 1"),
        (dict(operator="cubic"), "operator must be one of"),
        (dict(stride="3"), "expected an integer"),
        (dict(blocks="1,1"), "duplicate"),
        (dict(blocks="5-2"), "empty"),
        (dict(blocks="x"), "cannot parse"),
    ],
)
def test_config_errors(kwargs, msg):
    with pytest.raises(FISConfigError, match=msg):
        FISConfig(**kwargs)


@pytest.mark.parametrize(
    "cfg, args, msg",
    [
        (FISConfig(stride=9), (40, 9, 4), "smaller than the number of latent frames"),
        (FISConfig(dense_steps=5), (40, 21, 4), "exceeds the number of steps"),
        (FISConfig(blocks="0-10"), (40, 21, 4), "overlap the protected head/tail"),
        (FISConfig(blocks="30-45", dense_tail=0), (40, 21, 4), "out of range"),
        (FISConfig(dense_head=30, dense_tail=20), (40, 21, 4), "exceed the model"),
    ],
)
def test_resolve_errors(cfg, args, msg):
    with pytest.raises(FISConfigError, match=msg):
        cfg.resolve(*args)


def test_toml_roundtrip(tmp_path):
    cfg = FISConfig(
        stride=4,
        dense_head=2,
        dense_tail=0,
        blocks=parse_blocks("2-10,12"),
        dense_steps=2,
        operator="linear",
        interleave=False,
    )
    p = tmp_path / "my.toml"
    p.write_text(cfg.to_toml())
    assert FISConfig.from_toml(p) == cfg
    p.write_text("[fis]\nstrde = 3\n")
    with pytest.raises(FISConfigError, match="unknown fis setting"):
        FISConfig.from_toml(p)
    p.write_text("stride = = 3")
    with pytest.raises(FISConfigError, match="not valid TOML"):
        FISConfig.from_toml(p)


def test_presets_load_for_every_family():
    from engine.runtime.presets import PRESET_DIR, load_fis

    for family in ("wan-14b", "wan-5b", "wan-1.3b", "hunyuanvideo1.5-8b", "default"):
        assert load_fis("balanced", family).stride == 3
        assert load_fis("fast", family).stride == 5
    assert load_fis("off") is None
    for path in PRESET_DIR.glob("*.toml"):
        FISConfig.from_toml(path).resolve(40, 21, 4)
    with pytest.raises(FISConfigError, match="unknown FIS preset"):
        load_fis("turbo")


@pytest.mark.parametrize("operator", ["linear", "residual"])
def test_fused_reconstruction_matches_eager(operator):
    """The single-pass form the GPU compiles computes what the eager ops compute; anchors stay exact."""
    from fis.reconstruct import fused_reconstruct, reconstruct_eager

    torch.manual_seed(1)
    B, F, HW, C = 2, 9, 5, 6
    x = torch.randn(B, F * HW, C)
    t = FrameTables.build(anchor_frames(F, 3, 1), F, "cpu")
    A = t.anchors.numel()
    y_a = torch.randn(B, A * HW, C)
    xin = None if operator == "linear" else x
    ref = reconstruct_eager(y_a, t, xin)
    out = fused_reconstruct(
        y_a.view(B, A, HW, C),
        None if xin is None else x.view(B, F, HW, C),
        t.left,
        t.right,
        t.a_left,
        t.a_right,
        t.weight,
        t.is_anchor,
    ).reshape(B, F * HW, C)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(select_frames(out, t.anchors, F), y_a)


@pytest.mark.slow
def test_fused_reconstruction_compiles():
    """torch.compile of the fused form (what runs on CUDA) gives the same result; here on CPU inductor."""
    from fis.reconstruct import fused_reconstruct, reconstruct_eager

    torch.manual_seed(2)
    B, F, HW, C = 1, 7, 4, 8
    x = torch.randn(B, F, HW, C)
    t = FrameTables.build(anchor_frames(F, 3, 0), F, "cpu")
    y_a = torch.randn(B, t.anchors.numel(), HW, C)
    fn = torch.compile(fused_reconstruct, dynamic=False, fullgraph=True)
    out = fn(y_a, x, t.left, t.right, t.a_left, t.a_right, t.weight, t.is_anchor)
    ref = reconstruct_eager(y_a.reshape(B, -1, C), t, x.reshape(B, -1, C)).view(B, F, HW, C)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
