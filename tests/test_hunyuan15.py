"""FIS hooks on diffusers' HunyuanVideo15Transformer3DModel (tiny, random): dual-stream blocks."""

import pytest
import torch
from helpers import tiny_hunyuan_transformer

from engine.hooks.fis import apply_fis, remove_fis
from fis import FISConfig


@pytest.fixture(scope="module")
def model_and_inputs():
    m = tiny_hunyuan_transformer()
    mask = torch.ones(1, 5, dtype=torch.long)
    mask[:, 4] = 0  # a padded text token, as the pipeline produces
    args = (torch.randn(1, 9, 7, 4, 6), torch.tensor([600.0]), torch.randn(1, 5, 16), mask)
    kw = dict(
        encoder_hidden_states_2=torch.randn(1, 3, 8),
        encoder_attention_mask_2=torch.ones(1, 3, dtype=torch.long),
        image_embeds=torch.randn(1, 4, 8),
        return_dict=False,
    )
    return m, args, kw


@torch.no_grad()
def test_stride_one_dense_sparse_and_remove(model_and_inputs):
    m, args, kw = model_and_inputs
    ref = m(*args, **kw)[0]
    state = apply_fis(m, FISConfig(stride=1))
    try:
        state.begin(4)
        assert torch.equal(m(*args, **kw)[0], ref)
        seen = []
        hooks = [
            b.attn.register_forward_pre_hook(
                lambda mod, a, k: seen.append(k["hidden_states"].shape[1]), with_kwargs=True
            )
            for b in m.transformer_blocks
        ]
        state.begin(4, FISConfig(stride=3, dense_head=1, dense_tail=1))
        out = m(*args, **kw)[0]
        for h in hooks:
            h.remove()
        hw = 4 * 6
        # blocks 1-3 sparse with offsets 0, 1, 2 over 7 frames: anchors {0,3,6}, {0,1,4,6}, {0,2,5,6}
        assert seen == [7 * hw, 3 * hw, 4 * hw, 4 * hw, 7 * hw]
        assert not torch.allclose(out, ref) and torch.isfinite(out).all()
    finally:
        remove_fis(m)
    assert torch.equal(m(*args, **kw)[0], ref)
