"""Sequence parallelism on a diffusers video transformer, attached from outside with hooks.

Each rank keeps a share of the video tokens (layout.py) from the patch embedding to the output projection:
  transformer  per-token inputs (Wan 2.2 TI2V timestep [B, N]) -> this rank's tokens
  patch embed  output [B, C, F, H, W] -> [B, C, N_r]; the model's own flatten(2).transpose(1, 2) gives [B, N_r, C]
  rope         output (cos, sin), each [1, N, 1, D] (Wan) or [N, D] (HunyuanVideo 1.5) -> this rank's N_r
  proj_out     output [B, N_r, C] -> all-gathered [B, N, C]: every rank gets the whole prediction
Self-attention runs through diffusers' context-parallel dispatcher (Ulysses all-to-all, ring), enabled with an
empty cp_plan because the split and gather above are ours. Wan's cross-attention keeps its local queries against
the replicated text context (its processor passes no parallel config there), as in xDiT. HunyuanVideo 1.5's
joint attention over [video, text] gets joint.SequenceJoint, which adds each rank's slice of the replicated text
to the sequence, so the gathered sequence holds every text token once.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from diffusers import ContextParallelConfig
from diffusers.hooks import HookRegistry, ModelHook

from engine import compat
from engine.hooks.attention_backend import set_attention_backend
from engine.hooks.fis import BLOCK_HOOK, FISBlockHook
from engine.models import BlockArgs, SPPlan, adapter_for, sp_plan_for

from .context import ParallelContext
from .fis_frames import FrameShardFISHook
from .joint import SequenceJoint
from .layout import TokenLayout, all_gather_varlen

INPUT_HOOK, EMBED_HOOK, ROPE_HOOK, OUTPUT_HOOK = "sp_input", "sp_embed", "sp_rope", "sp_output"


class SequenceShard:
    """Per transformer: the token layout of the current forward and the CP config it steers (diffusers'
    ContextParallelConfig, or xdit.USPConfig)."""

    def __init__(self, ctx: ParallelContext, mode: str, cp):
        self.ctx, self.mode, self.cp = ctx, mode, cp
        self.layout: TokenLayout | None = None

    def begin(self, frames: int, hw: int) -> None:
        if self.layout is None or (self.layout.frames, self.layout.hw) != (frames, hw):
            self.layout = TokenLayout(self.mode, frames, hw, self.ctx.sp_size, self.ctx.sp_rank)
        self.set_uneven(not self.layout.even)

    def set_uneven(self, uneven: bool) -> None:
        """diffusers' plain Ulysses / ring need the same length on every rank; its 'anything' variants take any
        lengths at the price of a size exchange per attention, so they are on only when needed."""
        cp = self.cp
        if uneven and cp.ring_degree > 1 and cp.ulysses_degree > 1:
            raise ValueError(
                f"ring x ulysses attention needs equal token counts per rank, but {self.mode} sharding gives "
                f"{list(self.layout.sizes)}; pick degrees that divide the latent size or use one of ring/ulysses"
            )
        cp.ulysses_anything = uneven and cp.ulysses_degree > 1
        cp.ring_anything = uneven and cp.ring_degree > 1

    @contextmanager
    def uneven(self, uneven: bool):
        saved = self.cp.ulysses_anything, self.cp.ring_anything
        self.set_uneven(uneven)
        try:
            yield
        finally:
            self.cp.ulysses_anything, self.cp.ring_anything = saved

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        pieces = all_gather_varlen(x, dim, self.layout.sizes, self.ctx.sp_group)
        return self.layout.assemble(pieces, dim)


class _InputHook(ModelHook):
    """On the transformer: reads this forward's latent geometry and shards per-token inputs."""

    def __init__(self, shard: SequenceShard, plan: SPPlan, blocks):
        super().__init__()
        self.shard, self.plan, self.blocks = shard, plan, blocks

    def initialize_hook(self, module):
        self.adapter, self.args = adapter_for(module), BlockArgs(module)
        return module

    def pre_forward(self, module, *args, **kwargs):
        args = list(args)
        latents = self.args.get(self.adapter.input_arg, args, kwargs)  # [B, C, F, H, W], whole on every rank
        self.shard.begin(*self.adapter.geometry(module, latents))
        if self.shard.mode == "frame" and type(_hook(self.blocks[0], BLOCK_HOOK)) is FISBlockHook:
            raise RuntimeError(
                "frame sharding: call apply_fis before parallelize_pipeline (FIS must see global frames)"
            )
        for name in self.plan.per_token_inputs:
            value = self.args.get(name, args, kwargs)
            if torch.is_tensor(value) and value.ndim == 2:  # [B, N]; Wan 2.1 passes [B]
                self.args.set(name, self.shard.layout.local(value, 1), args, kwargs)
        return tuple(args), kwargs


class _EmbedHook(ModelHook):
    def __init__(self, shard: SequenceShard):
        super().__init__()
        self.shard = shard

    def post_forward(self, module, output):  # [B, C, F, H, W] -> [B, C, N_r]
        return self.shard.layout.local(output.flatten(2), 2)


class _RopeHook(ModelHook):
    def __init__(self, shard: SequenceShard, dim: int):
        super().__init__()
        self.shard, self.dim = shard, dim

    def post_forward(self, module, output):  # (cos, sin), each [1, N, 1, D] or [N, D] -> N_r tokens
        return type(output)(self.shard.layout.local(t, self.dim) for t in output)


class _GatherHook(ModelHook):
    def __init__(self, shard: SequenceShard):
        super().__init__()
        self.shard = shard

    def post_forward(self, module, output):  # [B, N_r, C] -> [B, N, C] on every rank
        return self.shard.gather(output, 1)


def _hook(module, name):
    registry = getattr(module, "_diffusers_hook", None)
    return None if registry is None else registry.get_hook(name)


def _processors(transformer):
    for m in transformer.modules():
        p = getattr(m, "processor", None)
        if p is not None and hasattr(p, "_parallel_config"):
            yield p


def _enable_context_parallel(transformer, ctx: ParallelContext, attention_backend: str | None) -> ContextParallelConfig:
    cp = ContextParallelConfig(ring_degree=ctx.degrees.ring, ulysses_degree=ctx.degrees.ulysses, mesh=ctx.sp_mesh)
    config = compat.ParallelConfig(context_parallel_config=cp)
    if attention_backend is None and ctx.degrees.ring > 1:
        attention_backend = "_native_cudnn"  # ring merges partial outputs by log-sum-exp: needs an LSE backend
    if attention_backend is not None:
        set_attention_backend(transformer, attention_backend)
    if torch.accelerator.device_count() > 0:
        # cp_plan={}: diffusers only wires the attention; the token split / gather is ours (layout.py)
        transformer.enable_parallelism(config=config, cp_plan={})
        return cp
    # CPU host: enable_parallelism computes `rank % torch.accelerator.device_count()` (division by zero in
    # diffusers 0.42.1), so do its two steps here: set the config up on our mesh, hand it to the processors.
    for p in _processors(transformer):
        backend = p._attention_backend or compat.default_backend_name()
        if not compat.supports_context_parallel(backend):
            raise ValueError(f"attention backend {backend!r} has no context-parallel support in diffusers")
    config.setup(ctx.rank, ctx.world_size, ctx.device, mesh=ctx.sp_mesh)
    transformer._parallel_config = config
    for p in _processors(transformer):
        p._parallel_config = config
    return cp


def _disable_context_parallel(transformer) -> None:
    transformer._parallel_config = None
    for p in _processors(transformer):
        p._parallel_config = None


def attach_sequence_parallel(
    transformer, ctx: ParallelContext, mode: str, attention: str = "diffusers", attention_backend: str | None = None
):
    """Shard `transformer`'s tokens over ctx's ring x ulysses ranks. Returns the undo function."""
    plan = sp_plan_for(transformer)
    blocks = getattr(transformer, adapter_for(transformer).blocks_attr)
    backends = [(p, p._attention_backend) for p in _processors(transformer)]
    joint, undo_joint = plan.joint_attention(transformer) if plan.joint_attention else ([], None)
    try:
        if attention == "xfuser":
            from .xdit import enable_xfuser_usp

            cp = enable_xfuser_usp(ctx, list(_processors(transformer)))
        else:
            cp = _enable_context_parallel(transformer, ctx, attention_backend)
    except Exception:
        if undo_joint is not None:
            undo_joint()
        raise
    shard = SequenceShard(ctx, mode, cp)
    for p in joint:
        p.sequence = SequenceJoint(shard)
    swapped, views = [], {}
    if mode == "frame":  # FIS must rebuild frames from anchors on other ranks: swap in the gathering variant
        for block in blocks:
            base = _hook(block, BLOCK_HOOK)
            if type(base) is FISBlockHook:
                _replace_hook(block, BLOCK_HOOK, FrameShardFISHook(base, shard, views))
                swapped.append((block, base))
    placed = [
        (transformer, _InputHook(shard, plan, blocks), INPUT_HOOK),
        (transformer.get_submodule(plan.embed), _EmbedHook(shard), EMBED_HOOK),
        (transformer.get_submodule(plan.rope), _RopeHook(shard, plan.rope_dim), ROPE_HOOK),
        (transformer.get_submodule(plan.out), _GatherHook(shard), OUTPUT_HOOK),
    ]
    for module, hook, name in placed:
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)

    def undo():
        for module, _, name in reversed(placed):
            module._diffusers_hook.remove_hook(name, recurse=False)
        for block, base in swapped:
            _replace_hook(block, BLOCK_HOOK, base)
        _disable_context_parallel(transformer)
        for p in joint:
            p.sequence = None
        if undo_joint is not None:
            undo_joint()
        for p, backend in backends:
            p._attention_backend = backend
        HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()

    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
    return undo


def _replace_hook(module, name: str, hook: ModelHook) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.remove_hook(name, recurse=False)
    registry.register_hook(hook, name)
