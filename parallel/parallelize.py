"""parallelize_pipeline: sequence parallelism and CFG parallelism on a diffusers pipeline, removable.

Order with FIS: apply_fis first, then parallelize_pipeline; undo in reverse (handle.remove(), then remove_fis).
diffusers' HookRegistry only unwinds cleanly last-in first-out, and the 'frame' layout swaps the FIS block hooks
for a gathering variant, which needs them in place.
"""

from __future__ import annotations

from engine.models import sp_plan_for, transformers_of

from .cfg import attach_cfg_parallel
from .context import ParallelContext
from .layout import MODES
from .sequence import attach_sequence_parallel

ATTENTIONS = ("diffusers", "xfuser")  # whose sequence-parallel attention: diffusers' CP dispatcher, or xDiT's USP


class ParallelHandle:
    """What parallelize_* attached; remove() takes it off, last attached first."""

    def __init__(self):
        self._undo = []

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()


def _check(transformers, ctx: ParallelContext, shard: str, attention: str) -> None:
    if shard not in MODES:
        raise ValueError(f"shard must be one of {', '.join(MODES)}, got {shard!r}")
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
    if attention == "xfuser" and ctx.device.type != "cuda":
        raise ValueError("attention='xfuser' (xDiT USP) runs on CUDA only; use attention='diffusers'")
    for t in transformers:
        ctx.degrees.validate(ctx.world_size, t.config.num_attention_heads)
        if ctx.sp_size > 1:
            sp_plan_for(t)


def parallelize_transformer(
    transformer,
    ctx: ParallelContext,
    shard: str = "spatial",
    attention: str = "diffusers",
    attention_backend: str | None = None,
) -> ParallelHandle:
    """Sequence parallelism on one transformer (no CFG: that needs the pipeline's two calls)."""
    return _parallelize([transformer], None, ctx, shard, attention, attention_backend)


def parallelize_pipeline(
    pipe,
    ctx: ParallelContext,
    shard: str = "spatial",
    attention: str = "diffusers",
    attention_backend: str | None = None,
) -> ParallelHandle:
    """Sequence parallelism on every transformer of `pipe` (both Wan 2.2 experts) over ctx's ring x ulysses
    ranks, and CFG parallelism over its 'cfg' axis. Every rank gets the whole prediction of every call, so the
    scheduler keeps identical full latents on all ranks. Errors (degrees, heads, shard) come before any change.

    attention: 'diffusers' (default; CPU and GPU) or 'xfuser' (xDiT USP, CUDA only, equal token counts only).
    attention_backend: a diffusers backend name set on the transformers (ring defaults to '_native_cudnn')."""
    transformers = transformers_of(pipe)
    if not transformers:
        raise ValueError(f"{type(pipe).__name__} has no transformer to parallelize")
    return _parallelize(transformers, pipe, ctx, shard, attention, attention_backend)


def _parallelize(transformers, pipe, ctx, shard, attention, attention_backend) -> ParallelHandle:
    _check(transformers, ctx, shard, attention)
    handle = ParallelHandle()
    if ctx.sp_size > 1:
        for t in transformers:
            handle._undo.append(attach_sequence_parallel(t, ctx, shard, attention, attention_backend))
    if ctx.degrees.cfg == 2 and pipe is not None:
        handle._undo.append(attach_cfg_parallel(pipe, transformers, ctx))
    return handle
