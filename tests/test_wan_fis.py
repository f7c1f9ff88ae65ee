"""FIS hooks on real diffusers Wan pipelines (tiny, random weights), through the engine's Worker."""

from collections import defaultdict

import numpy as np
import pytest
import torch

from engine.hooks.fis import apply_fis, remove_fis
from engine.runtime.request import GenerationRequest
from engine.runtime.worker import Worker, WorkerConfig
from engine.testbed.tiny_wan import VARIANTS
from fis import FISConfig

H = W = 32  # latent 4x4 -> 2x2 tokens per frame after patching
FRAMES = 17  # 5 latent frames


@pytest.fixture(scope="module")
def worker(tiny_path, tmp_path_factory):
    cache = {}
    image = tmp_path_factory.mktemp("img") / "ref.png"
    from PIL import Image

    Image.fromarray((np.random.default_rng(0).random((H, W, 3)) * 255).astype("uint8")).save(image)

    def get(variant):
        if variant not in cache:
            cache[variant] = Worker(WorkerConfig(model=str(tiny_path(variant))))
            cache[variant].image = str(image) if variant == "i2v" else None
        return cache[variant]

    return get


def latents(w, fis, guidance=1.0, steps=4):
    req = GenerationRequest(
        prompt="a red circle moving right",
        height=H,
        width=W,
        num_frames=FRAMES,
        steps=steps,
        guidance=guidance,
        seed=3,
        fis=fis,
        image=w.image,
    )
    return w.generate(req, decode=False)["latents"]


class TokenCounter:
    """Counts the video tokens entering each block's self-attention, per call."""

    def __init__(self, worker):
        self.calls = defaultdict(list)  # (expert, block) -> [tokens, ...]
        self.handles = []
        for e, t in enumerate(worker.transformers):
            for b, block in enumerate(t.blocks):
                self.handles.append(
                    block.attn1.register_forward_pre_hook(
                        lambda m, args, e=e, b=b: self.calls[(e, b)].append(args[0].shape[1])
                    )
                )

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("variant", VARIANTS)
def test_stride_one_is_bit_identical_to_dense(worker, variant):
    w = worker(variant)
    dense = latents(w, None)
    assert torch.equal(latents(w, FISConfig(stride=1, dense_head=0, dense_tail=0, dense_steps=0)), dense)


@pytest.mark.parametrize("variant", VARIANTS)
def test_sparse_fis_runs_fewer_tokens_and_differs(worker, variant):
    w = worker(variant)
    cfg = FISConfig(stride=3, dense_head=1, dense_tail=1, dense_steps=1)
    dense = latents(w, None)
    counter = TokenCounter(w)
    try:
        out = latents(w, cfg)
    finally:
        counter.close()
    assert not torch.allclose(out, dense)
    assert torch.isfinite(out).all()
    # the expected token count per call, from the plan: anchors * tokens-per-frame on sparse (block, step)
    plan = cfg.resolve(6, 5, 4)
    hw = (H // 8 // 2) * (W // 8 // 2)
    steps_of = _steps_per_expert(w, variant)
    seen_sparse = 0
    for (e, b), calls in counter.calls.items():
        want = [hw * (5 if plan.anchors(b, s) is None else len(plan.anchors(b, s))) for s in steps_of[e]]
        assert calls == want, (e, b, calls, want)
        seen_sparse += sum(c < 5 * hw for c in calls)
    assert seen_sparse > 0
    assert len({e for e, _ in counter.calls}) == len(w.transformers)  # both Wan 2.2 experts ran


def _steps_per_expert(w, variant):
    """Which steps each transformer serves (Wan 2.2 A14B: high-noise expert for t >= 875)."""
    if variant != "a14b":
        return {0: [0, 1, 2, 3]}
    w.pipe.scheduler.set_timesteps(4)
    ts = w.pipe.scheduler.timesteps.tolist()
    return {0: [i for i, t in enumerate(ts) if t >= 875], 1: [i for i, t in enumerate(ts) if t < 875]}


def test_step_gate_follows_pipeline_steps_under_cfg(worker):
    """With CFG each step calls the transformer twice; both calls of a step share its gate."""
    w = worker("t2v")
    cfg = FISConfig(stride=2, dense_head=0, dense_tail=0, dense_steps=2)
    counter = TokenCounter(w)
    try:
        latents(w, cfg, guidance=3.0)
    finally:
        counter.close()
    calls = counter.calls[(0, 0)]
    assert len(calls) == 8  # 4 steps x (cond, uncond)
    hw = 4
    assert calls[:4] == [hw * 3] * 4  # steps 0-1 sparse: anchors {0, 2, 4} at offset 0
    assert calls[4:] == [hw * 5] * 4  # steps 2-3 dense
    assert torch.equal(latents(w, FISConfig(stride=1), guidance=3.0), latents(w, None, guidance=3.0))


def test_remove_restores_the_dense_model_exactly():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    m = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=8,
        freq_dim=16,
        ffn_dim=16,
        num_layers=4,
        rope_max_seq_len=32,
    ).eval()
    x, t, e = torch.randn(1, 4, 7, 8, 8), torch.tensor([700]), torch.randn(1, 5, 8)
    with torch.no_grad():
        ref = m(x, t, e, return_dict=False)[0]
        state = apply_fis(m, FISConfig(stride=2))
        state.begin(4)
        sparse = m(x, t, e, return_dict=False)[0]
        with pytest.raises(ValueError, match="already applied"):
            apply_fis(m, FISConfig(stride=2))
        remove_fis(m)
        again = m(x, t, e, return_dict=False)[0]
    assert not torch.allclose(sparse, ref)
    assert torch.equal(again, ref)
    assert not hasattr(m.blocks[0], "_diffusers_hook") or not m.blocks[0]._diffusers_hook.hooks


def test_adapter_rejects_unknown_models():
    with pytest.raises(ValueError, match="no adapter"):
        apply_fis(torch.nn.Linear(2, 2), FISConfig())


@pytest.mark.slow
def test_compiled_blocks_under_fis_match_eager(tiny_path, worker):
    """--compile static: the blocks' own maths is compiled, the FIS hooks stay eager around it."""
    eager = worker("t2v")
    compiled = Worker(WorkerConfig(model=str(tiny_path("t2v")), compile="static"))
    compiled.image = None
    cfg = FISConfig(stride=2, dense_head=1, dense_tail=1)
    torch.testing.assert_close(latents(compiled, cfg, steps=2), latents(eager, cfg, steps=2), rtol=1e-4, atol=1e-4)
    with pytest.raises(Exception, match="compile mode must be one of"):
        Worker(WorkerConfig(model=str(tiny_path("t2v")), compile="max"))
