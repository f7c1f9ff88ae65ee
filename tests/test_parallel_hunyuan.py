"""HunyuanVideo 1.5: sequence parallelism (joint text tokens) in 2 and 4 gloo processes; the mask-free attention.

Every parallel output is compared with the single-process output of the unmodified diffusers model (dense
[B, 1, S, S] mask, its own processor), dense and with FIS stride 3.
"""

from __future__ import annotations

import pytest
import torch
from helpers import hunyuan_run, tiny_hunyuan_transformer
from scenarios import HY_SHAPES as SHAPES
from scenarios import HY_TEXTS as TEXTS

from engine.hooks.fis import apply_fis, remove_fis
from engine.models.hunyuan15 import JointAttention, drop_text_padding, install_joint_attention
from fis import FISConfig
from parallel import Degrees, ParallelContext, parallelize_transformer

TOL = 1e-5
FIS = FISConfig(stride=3, dense_head=1, dense_tail=1)


@pytest.fixture(scope="module")
def sp_results(spawned):
    """(world, scenario) -> the scenario's metrics (tests/scenarios.py; one world per size for the run)."""
    return lambda world, scenario="hunyuan_sp": spawned(world, scenario)


@pytest.mark.parametrize("world", [2, 4])  # ulysses 2 (2 heads), ulysses 4 (4 heads; 4 frame ranks of 7 frames:
@pytest.mark.parametrize("prefix", ["spatial_", "frame_", "removed_"])  # a rank may hold no FIS anchor)
def test_sequence_parallel_equals_single_process(sp_results, world, prefix):
    checked = {k: v for k, v in sp_results(world).items() if k.startswith(prefix)}
    assert len(checked) == (len(SHAPES) * len(TEXTS) * 2 if world == 2 else 2 * 2), checked
    bad = {k: v for k, v in checked.items() if not v <= TOL}
    assert not bad, f"parallel != single process: {bad}"


@pytest.mark.parametrize("world", [2, 4])  # cfg 2 alone; cfg 2 x ulysses 2
def test_cfg_parallel_equals_serial_cfg(sp_results, world):
    r = sp_results(world, "hunyuan_cfg")
    tags = [k[len("cfg_") :] for k in r if k.startswith("cfg_")]
    assert len(tags) == 8, r
    bad = {k: v for k, v in r.items() if k.startswith(("cfg_", "removed_")) and not v <= TOL}
    assert not bad, f"CFG-parallel != serial CFG: {bad}"
    for tag in tags:  # 3 steps; serial: 2 calls per CFG step; parallel: 1 call per step on each rank
        late = tag.startswith("late")
        assert r[f"serial_calls_{tag}"] == (5.0 if late else 6.0) and r[f"calls_{tag}"] == 3.0, (tag, r)
    assert min(r["fis_effect_all"], r["fis_effect_late"]) > 1e-3


@pytest.mark.parametrize("prefix", ["spatial_", "frame_", "removed_"])
def test_attention_scope_operators_sp_equal_single_process(sp_results, prefix):
    r = sp_results(2, "hunyuan_operators")
    checked = {k: v for k, v in r.items() if k.startswith(prefix)}
    assert len(checked) == len(SHAPES) * 2 * 2, checked
    bad = {k: v for k, v in checked.items() if not v <= TOL}
    assert not bad, f"parallel != single process: {bad}"
    assert min(v for k, v in r.items() if k.startswith("fis_effect")) > 1e-3


def test_fis_cases_were_sparse(sp_results):
    assert min(v for k, v in sp_results(2).items() if k.startswith("fis_effect")) > 1e-3


# ---- one process -------------------------------------------------------------------------------------------
def test_bad_degrees_fail_before_anything_is_attached():
    m = tiny_hunyuan_transformer(heads=4)
    ctx = ParallelContext(Degrees(ulysses=8), world_size=8)
    with pytest.raises(ValueError, match="ulysses degree 8 must divide the model's 4 attention heads"):
        parallelize_transformer(m, ctx)
    assert not hasattr(m, "_diffusers_hook")
    assert type(m.transformer_blocks[0].attn.processor).__name__ == "HunyuanVideo15AttnProcessor2_0"


class _NoMask(JointAttention):
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, None, image_rotary_emb)


@torch.no_grad()
def test_no_dense_mask_same_output():
    """JointAttention (padded keys left out, no mask), and padding dropped before the blocks, equal diffusers'
    dense-mask attention; the padding does matter (ignoring the mask changes the output), and the undo restores
    the model exactly."""
    m, shape = tiny_hunyuan_transformer(), SHAPES[1]
    ref = hunyuan_run(m, shape, "padded")
    procs, undo = install_joint_attention(m)
    assert abs(hunyuan_run(m, shape, "padded") - ref).max() <= TOL
    for p in procs:  # the same attention with the mask thrown away: padded tokens act as keys
        p.__class__ = _NoMask
    assert abs(hunyuan_run(m, shape, "padded") - ref).max() > 1e-3
    undo()

    seen = []
    hooks = [
        b.attn.register_forward_pre_hook(
            lambda mod, a, k: seen.append((k["encoder_hidden_states"].shape[1], k["attention_mask"])), with_kwargs=True
        )
        for b in m.transformer_blocks
    ]
    for fis in (False, True):
        if fis:
            apply_fis(m, FIS).begin(4)
            ref = hunyuan_run(m, shape, "padded")
        undo = drop_text_padding(m)
        seen.clear()
        assert abs(hunyuan_run(m, shape, "padded") - ref).max() <= TOL
        assert seen == [(5, None)] * 5  # 12 text tokens, 5 valid: no mask reaches the attention
        undo()
        assert torch.equal(hunyuan_run(m, shape, "padded"), ref)
        if fis:
            remove_fis(m)
    for h in hooks:
        h.remove()
    assert type(m.transformer_blocks[0].attn.processor).__name__ == "HunyuanVideo15AttnProcessor2_0"


@torch.no_grad()
def test_batch_of_unequal_prompts():
    """Two prompts of different lengths in one batch: a [B, 1, 1, S] key mask; trimmed to the longer prompt."""
    m, shape = tiny_hunyuan_transformer(), SHAPES[0]
    ref = hunyuan_run(m, shape, "batch")
    for install in (install_joint_attention, drop_text_padding):
        undo = install(m)
        undo = undo[1] if isinstance(undo, tuple) else undo
        assert abs(hunyuan_run(m, shape, "batch") - ref).max() <= TOL
        undo()
