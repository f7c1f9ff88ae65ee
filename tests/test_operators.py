"""The FIS operators (fis/operators.py) on tiny random Wan and HunyuanVideo 1.5 transformers, in one process: the
exactness identities, the tokens that enter each block's self-attention, removal, and the FLOPs counter against
torch's own count of what runs. Sequence parallelism: tests/scenarios.py (operators_sp, hunyuan_operators)."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from helpers import bare_transformer, hunyuan_inputs, tiny_hunyuan_transformer
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from engine.hooks.fis import ATTENTION_HOOK, SparseView, apply_fis, remove_fis, run_operator
from engine.models import BlockArgs, adapter_for
from fis import OPERATORS, FISConfig, FISConfigError
from fis.flops import DiTDims, block_flops
from fis.operators import get as get_operator
from fis.reconstruct import FrameTables

NEW = ("attn", "kv")
WAN_SHAPE = (5, 8, 8)  # latent [F, H, W]: 5 frames of 4 x 4 tokens
HY_SHAPE = (5, 4, 6)  # 5 frames of 24 tokens (patch 1)


_BUILT: dict = {}  # one tiny transformer per family for the module: tests attach and remove hooks, never train


def _built(name, build):
    if name not in _BUILT:
        _BUILT[name] = build()
    return _BUILT[name]


class Wan:
    """A tiny Wan transformer and one forward's inputs."""

    def __init__(self):
        self.m = _built("wan", lambda: bare_transformer(2))
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(1, 16, *WAN_SHAPE, generator=g)
        self.text = torch.randn(1, 7, 32, generator=g)
        self.blocks = self.m.blocks
        self.frames, self.hw = WAN_SHAPE[0], WAN_SHAPE[1] * WAN_SHAPE[2] // 4

    @torch.no_grad()
    def run(self):
        return self.m(self.x, torch.tensor([700]), self.text, return_dict=False)[0]

    def attention(self, block):
        return block.attn1


class Hunyuan:
    def __init__(self, text="full"):
        self.m = _built("hunyuan", tiny_hunyuan_transformer)
        self.args, self.kw = hunyuan_inputs(HY_SHAPE, text)
        self.blocks = self.m.transformer_blocks
        self.frames, self.hw = HY_SHAPE[0], HY_SHAPE[1] * HY_SHAPE[2]

    @torch.no_grad()
    def run(self):
        return self.m(*self.args, **self.kw)[0]

    def attention(self, block):
        return block.attn


MODELS = {"wan": Wan, "hunyuan": Hunyuan}


def _fis(op, stride=2, dense_steps=1):
    return FISConfig(stride=stride, dense_head=1, dense_tail=1, dense_steps=dense_steps, operator=op)


def _block_calls(model, block_index: int = 1):
    """(args, kwargs, output) of every call of one block during a forward (the model unhooked)."""
    calls = []
    block = model.blocks[block_index]
    h = block.register_forward_hook(lambda mod, a, kw, out: calls.append((a, kw, out)), with_kwargs=True)
    try:
        model.run()
    finally:
        h.remove()
    return block, calls


def _view(anchors, frames, device="cpu"):
    t = FrameTables.build(tuple(anchors), frames, device)
    return SparseView(t.anchors, t.num_frames, t)


def _sparse(model, block, op, anchors, args, kwargs):
    adapter = adapter_for(model.m)
    fwd = block.forward
    with torch.no_grad():
        return run_operator(
            get_operator(op), block, fwd, _view(anchors, model.frames), BlockArgs(block), adapter, args, kwargs
        )


def _video(out):
    return out[0] if isinstance(out, tuple) else out


# ---- config --------------------------------------------------------------------------------------------------
def test_operators_are_fis_config_choices():
    assert set(NEW) <= set(OPERATORS)
    assert FISConfig(operator="kv").operator == "kv"
    with pytest.raises(FISConfigError, match="linear, residual, attn, kv"):
        FISConfig(operator="cubic")
    assert [get_operator(o).per_frame for o in OPERATORS] == [False, False, True, True]


def test_quality_preset_is_attn_at_the_balanced_stride_for_every_family():
    from engine.runtime.presets import load_fis

    for family in ("wan-14b", "wan-5b", "wan-1.3b", "hunyuanvideo1.5-8b", "default"):
        quality, balanced = load_fis("quality", family), load_fis("balanced", family)
        assert quality.operator == "attn" and quality.replace(operator="residual", name="balanced") == balanced


# ---- exactness ---------------------------------------------------------------------------------------------
@torch.no_grad()
def test_wan_split_attention_with_every_key_is_the_processor_bit_for_bit():
    from engine.models.wan import split_attention

    model = Wan()
    block, calls = _block_calls(model)
    seen = []
    h = block.attn1.register_forward_hook(lambda mod, a, kw, out: seen.append((a, kw, out)), with_kwargs=True)
    block(*calls[0][0], **calls[0][1])
    h.remove()
    a, kw, ref = seen[0]
    got = split_attention(block.attn1, a, kw, BlockArgs(block.attn1), lambda x, dim: x)
    assert torch.equal(got, ref)


@torch.no_grad()
def test_joint_attention_with_every_key_is_unchanged_bit_for_bit():
    from engine.models.hunyuan15 import JointAttention

    model = Hunyuan("padded")
    block = model.blocks[1]
    seen = []
    h = block.attn.register_forward_hook(lambda mod, a, kw, out: seen.append(kw), with_kwargs=True)
    model.run()
    h.remove()
    kw, proc = seen[0], JointAttention()
    ref = proc(block.attn, **kw)
    got = proc(block.attn, **kw, keys=lambda x, dim: x)
    assert all(torch.equal(g, r) for g, r in zip(got, ref))


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("op", NEW)
def test_stride_one_is_dense_bit_for_bit(family, op):
    model = MODELS[family]()
    dense = model.run()
    apply_fis(model.m, FISConfig(stride=1, dense_head=0, dense_tail=0, dense_steps=0, operator=op)).begin(2)
    try:
        assert torch.equal(model.run(), dense)
    finally:
        remove_fis(model.m)


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("op", NEW)
def test_every_frame_an_anchor_is_the_dense_block(family, op):
    """The operator's own arithmetic with all frames as anchors: slicing, the split attention and Eq. 10 with
    weight 0 change nothing (bit for bit for Wan; HunyuanVideo's 'kv' runs the mask-free JointAttention)."""
    model = MODELS[family]()
    block, calls = _block_calls(model)
    a, kw, ref = calls[0]
    out = _sparse(model, block, op, range(model.frames), a, kw)
    if family == "wan":
        assert torch.equal(out, ref)
    else:
        for o, r in zip(out, ref):
            torch.testing.assert_close(o, r, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("op", NEW)
def test_anchor_frames_get_what_the_block_on_the_anchors_gives(family, op):
    """An anchor frame's queries attend to the anchors under every operator, and everything else in the block is per
    token: the anchors' outputs (and HunyuanVideo's text stream) equal the block-scope operators' exact anchors."""
    model = MODELS[family]()
    block, calls = _block_calls(model)
    a, kw, _ = calls[0]
    anchors = (0, 2, 4)
    ref = _sparse(model, block, "residual", anchors, a, kw)
    out = _sparse(model, block, op, anchors, a, kw)
    frames = lambda y: _video(y).view(1, model.frames, model.hw, -1)[:, list(anchors)]  # noqa: E731
    torch.testing.assert_close(frames(out), frames(ref), rtol=0, atol=1e-5)
    skipped = lambda y: _video(y).view(1, model.frames, model.hw, -1)[:, [1, 3]]  # noqa: E731
    assert (skipped(out) - skipped(ref)).abs().max() > 1e-3  # skipped frames get their own update
    if family == "hunyuan":
        torch.testing.assert_close(out[1], ref[1], rtol=0, atol=1e-5)


# ---- what runs ---------------------------------------------------------------------------------------------
class SelfAttentionTokens:
    """(query tokens, key tokens) of every self-attention call, per block, from diffusers' dispatcher."""

    def __init__(self, model, monkeypatch):
        import diffusers.models.transformers.transformer_hunyuan_video15 as hy
        import diffusers.models.transformers.transformer_wan as wan

        import engine.models.hunyuan15 as ours

        self.calls, self.current = defaultdict(list), None
        for module in (wan, hy, ours):
            real = module.dispatch_attention_fn

            def record(q, k, v, *a, real=real, **kw):
                if self.current is not None:
                    self.calls[self.current].append((q.shape[1], k.shape[1]))
                return real(q, k, v, *a, **kw)

            monkeypatch.setattr(module, "dispatch_attention_fn", record)
        self.handles = []
        for b, block in enumerate(model.blocks):
            attn = model.attention(block)
            self.handles.append(attn.register_forward_pre_hook(lambda *_, b=b: setattr(self, "current", b)))
            self.handles.append(attn.register_forward_hook(lambda *_: setattr(self, "current", None)))

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("op", OPERATORS)
def test_tokens_entering_self_attention_follow_the_plan(family, op, monkeypatch):
    model = MODELS[family]()
    tokens = SelfAttentionTokens(model, monkeypatch)
    cfg = _fis(op)
    state = apply_fis(model.m, cfg)
    steps = 2  # step 0 sparse, step 1 dense (dense_steps=1)
    state.begin(steps)
    try:
        for step in range(steps):
            state.step = step
            model.run()
    finally:
        remove_fis(model.m)
        tokens.close()
    plan = cfg.resolve(len(model.blocks), model.frames, steps)
    n = model.frames * model.hw
    for b in range(len(model.blocks)):
        calls = tokens.calls[b]
        assert len(calls) == steps, (b, calls)
        text = calls[-1][0] - n  # joint attention: the text tokens join both sides
        want = []
        for step in range(steps):
            a = plan.anchors(b, step)
            if a is None:
                want.append((n, n))
            else:
                q, k = get_operator(op).self_attention(n, len(a) * model.hw)
                want.append((q, k))
        assert [(q - text, k - text) for q, k in calls] == want, (b, calls, want)
    assert any(q != k or q < n + text for q, k in tokens.calls[1])  # block 1 was sparse at step 0


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("op", NEW)
def test_remove_restores_the_model_exactly(family, op):
    model = MODELS[family]()
    ref = model.run()
    state = apply_fis(model.m, _fis(op))
    state.begin(2)
    sparse = model.run()
    assert not torch.allclose(sparse, ref)
    # the attention hook lives only inside a sparse block call
    assert all(
        ATTENTION_HOOK not in getattr(model.attention(b), "_diffusers_hook", None).hooks for b in model.blocks[1:3]
    )
    remove_fis(model.m)
    assert torch.equal(model.run(), ref)


# ---- FLOPs ---------------------------------------------------------------------------------------------------
def _dims(model) -> DiTDims:
    c = model.m.config
    if isinstance(model, Wan):
        dim = c.num_attention_heads * c.attention_head_dim
        return DiTDims(num_layers=c.num_layers, dim=dim, ffn_dim=c.ffn_dim, text_len=model.text.shape[1])
    dim = c.num_attention_heads * c.attention_head_dim
    return DiTDims(num_layers=c.num_layers, dim=dim, ffn_dim=int(dim * c.mlp_ratio), joint=True, text_len=0)


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("op", ["dense", *OPERATORS])
def test_flops_counter_counts_what_each_operator_runs(family, op):
    """torch's FLOP counter (matmuls; SDPA through its math kernel) over one block call vs fis/flops.py."""
    model = MODELS[family]()
    block, calls = _block_calls(model)
    a, kw, _ = calls[0]
    anchors = (0, 2, 4)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        if op == "dense":
            block(*a, **kw)
        else:
            _sparse(model, block, op, anchors, a, kw)
    d = _dims(model)
    n = model.frames * model.hw
    extra = 0
    if d.joint:  # the text tokens of this call; the two AdaLayerNormZero modulations are per sample (not counted)
        d = DiTDims(**{**d.__dict__, "text_len": BlockArgs(block).get("encoder_hidden_states", a, kw).shape[1]})
        extra = 2 * 2 * d.dim * 6 * d.dim
    want = block_flops(d, n) if op == "dense" else block_flops(d, n, len(anchors) * model.hw, op)
    assert counter.get_total_flops() == pytest.approx(want + extra, rel=1e-9)


def test_flops_identities():
    d = DiTDims(num_layers=4, dim=64, ffn_dim=256, text_len=8)
    for op in OPERATORS:  # every frame an anchor = dense
        assert block_flops(d, 90, 90, op) == block_flops(d, 90)
    # attn: the self-attention of the block on the anchors plus per-token parts on every token
    c = d.dim
    per_token = 4 * 60 * c * c + 4 * 60 * 8 * c + 4 * 60 * c * d.ffn_dim  # cross-attention (Q, O, scores), FFN
    assert block_flops(d, 90, 30, "attn") - block_flops(d, 30, None) == pytest.approx(per_token)
    assert block_flops(d, 90, 30, "residual") < block_flops(d, 90, 30, "attn") < block_flops(d, 90, 30, "kv")


# ---- the GPU speed benchmark, as a CPU smoke run ------------------------------------------------------------
def test_bench_operators_tiny_writes_block_times_and_speedups(tmp_path):
    from helpers import run_cli

    out = tmp_path / "ops.json"
    args = ["--tiny", "--resolutions", "480p", "--strides", "3", "--warmup", "0", "--repeats", "1", "--out", out]
    r = run_cli("bench_operators.py", *args)
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    res = json.loads(out.read_text())
    times = res["block_ms"]["480p"]
    assert times["latent_frames"] == 21 and times["dense"] > 0
    assert set(times) - {"latent_frames", "tokens", "dense"} == set(OPERATORS)
    assert all(set(times[op]) == {"8", "9"} for op in OPERATORS)  # s = 3 on 21 frames: 8 or 9 anchors
    assert all(e["status"] == "ok" for e in res["entries"])
    for op in OPERATORS:
        assert res["speedup"]["480p"][op]["3"] > 0 and res["flops_speedup"]["480p"][op]["3"] > 1


def test_bench_operators_bad_input_is_one_line(capsys):
    from launch.bench_operators import main

    with pytest.raises(SystemExit) as e:
        main(["--operators", "cubic", "--out", "x.json"])
    assert e.value.code == 2 and "--operators: choose from" in capsys.readouterr().err
