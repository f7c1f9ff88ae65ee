"""The analytic FLOPs counter against the paper's Table 1 dense baselines and against itself."""

import pytest

from fis import UNIT, FISConfig, generation_flops
from fis.flops import HUNYUAN_VIDEO_15, WAN_A14B, DiTDims, block_flops, forward_flops


@pytest.mark.parametrize("h, w, paper", [(720, 1280, 26.09), (480, 832, 6.71)])
def test_wan_a14b_dense_matches_paper_table1(h, w, paper):
    got = generation_flops(WAN_A14B, 81, h, w, 4) / UNIT
    assert got == pytest.approx(paper, rel=0.02)


def test_latent_grid_of_wan():
    assert WAN_A14B.latent_grid(81, 720, 1280) == (21, 45 * 80)
    assert WAN_A14B.latent_grid(81, 480, 832) == (21, 30 * 52)  # 32,760 tokens


def test_fis_counts_anchor_tokens_in_sparse_blocks_only():
    d = DiTDims(num_layers=6, dim=64, ffn_dim=128, text_len=8, text_dim=16)
    plan = FISConfig(stride=3, dense_head=1, dense_tail=1, dense_steps=1).resolve(6, 9, 4)
    f, hw = d.latent_grid(33, 128, 128)
    assert f == 9
    dense_fwd = forward_flops(d, f, hw)
    # step 3 is dense, steps 0-2 sparse: blocks 1-4 run on their anchor counts
    expect = dense_fwd
    for _ in range(3):
        expect += dense_fwd - sum(
            block_flops(d, f * hw) - block_flops(d, len(plan.anchors(b, 0)) * hw) for b in range(1, 5)
        )
    assert generation_flops(d, 33, 128, 128, 4, plan) == pytest.approx(expect)
    assert generation_flops(d, 33, 128, 128, 4, plan, cfg_passes=2) == pytest.approx(2 * expect)
    assert generation_flops(d, 33, 128, 128, 4, skipped_steps={1}) == pytest.approx(3 * dense_fwd)


def test_fis_presets_save_flops_on_a14b():
    dense = generation_flops(WAN_A14B, 81, 720, 1280, 4)
    bal = generation_flops(WAN_A14B, 81, 720, 1280, 4, FISConfig(stride=3).resolve(40, 21, 4))
    fast = generation_flops(WAN_A14B, 81, 720, 1280, 4, FISConfig(stride=5).resolve(40, 21, 4))
    assert fast < bal < dense / 2


def test_hunyuanvideo15_dense_matches_paper():
    """Paper Table 1: 5.47 P for HunyuanVideo 1.5 I2V, 480p (848x480), 81 frames, 8 steps."""
    assert generation_flops(HUNYUAN_VIDEO_15, 81, 480, 848, 8) / UNIT == pytest.approx(5.47, rel=0.03)
    # joint attention: context tokens add to the attended sequence, they are not a cross-attention
    no_text = DiTDims(**{**HUNYUAN_VIDEO_15.__dict__, "text_len": 0})
    assert generation_flops(no_text, 81, 480, 848, 8) < generation_flops(HUNYUAN_VIDEO_15, 81, 480, 848, 8)


def test_hunyuanvideo15_presets_save_flops():
    from engine.models import preset_family
    from engine.runtime.presets import load_fis

    family = preset_family({"num_layers": 54, "num_attention_heads": 16, "attention_head_dim": 128})
    assert family == "hunyuanvideo1.5-8b"
    dense = generation_flops(HUNYUAN_VIDEO_15, 81, 480, 848, 8)
    got = [
        generation_flops(HUNYUAN_VIDEO_15, 81, 480, 848, 8, load_fis(p, family).resolve(54, 21, 8)) / UNIT
        for p in ("balanced", "fast")
    ]
    assert got[1] < got[0] < dense / UNIT / 2  # paper: 2.33 and 2.06 P (our anchors add the first/last frame)
