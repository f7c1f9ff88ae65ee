"""Optional GPU path: xDiT's USP attention (xfuser) in place of diffusers' Ulysses / ring, with the same hooks,
layouts and process layout. xfuser loads CUDA kernels (yunchang, flash-attn) at import, so it is imported lazily
and only on CUDA. Its rank order 'tp-sp-pp-cfg-dp' with Ulysses ranks lowest is our ('cfg', 'ring', 'ulysses')
mesh, so its sequence groups hold the same ranks as ctx.sp_group.

Not exercised on the CPU test host (xfuser does not import there); launch/sp_bench.py compares it on GPUs.
"""

from __future__ import annotations

import diffusers.models.transformers.transformer_wan as wan

from .context import ParallelContext


class USPConfig:
    """Put on Wan's processors where diffusers' ParallelConfig would go; marks self-attention for xfuser's USP.
    SequenceShard reads the degrees and the uneven switches: xfuser needs equal token counts on every rank."""

    def __init__(self, ring: int, ulysses: int):
        self.ring_degree, self.ulysses_degree = ring, ulysses

    @property
    def ulysses_anything(self) -> bool:
        return False

    @ulysses_anything.setter
    def ulysses_anything(self, on: bool) -> None:
        if on:
            raise ValueError("xfuser USP needs equal token counts per rank: use attention='diffusers' for this size")

    @property
    def ring_anything(self) -> bool:
        return False

    @ring_anything.setter
    def ring_anything(self, on: bool) -> None:
        self.ulysses_anything = on


_diffusers_dispatch = wan.dispatch_attention_fn


def usp_attention(query, key, value):
    """xfuser's USP over [B, S_local, H, D] tensors (it works in [B, H, S, D])."""
    from xfuser.model_executor.layers.usp import USP

    out = USP(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
    return out.transpose(1, 2)


def dispatch(query, key, value, *args, parallel_config=None, **kwargs):
    """In place of Wan's dispatch_attention_fn: self-attention carries our marker and goes to USP."""
    if not isinstance(parallel_config, USPConfig):
        return _diffusers_dispatch(query, key, value, *args, parallel_config=parallel_config, **kwargs)
    return usp_attention(query, key, value)


def enable_xfuser_usp(ctx: ParallelContext, processors) -> USPConfig:
    from xfuser.core.distributed import (
        init_distributed_environment,
        initialize_model_parallel,
        model_parallel_is_initialized,
    )

    if not model_parallel_is_initialized():  # reuses our default process group
        init_distributed_environment(world_size=ctx.world_size, rank=ctx.rank, local_rank=ctx.local_rank)
        initialize_model_parallel(
            classifier_free_guidance_degree=ctx.degrees.cfg,
            sequence_parallel_degree=ctx.sp_size,
            ulysses_degree=ctx.degrees.ulysses,
            ring_degree=ctx.degrees.ring,
        )
    # Wan's processor looks dispatch_attention_fn up in its module at every call; the wrapper passes everything
    # but our marked self-attention through to diffusers, so it stays installed.
    wan.dispatch_attention_fn = dispatch
    config = USPConfig(ctx.degrees.ring, ctx.degrees.ulysses)
    for p in processors:
        p._parallel_config = config
    return config
