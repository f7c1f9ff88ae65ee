"""parallelize_pipeline: sequence parallelism and CFG parallelism on a diffusers pipeline, removable.

Order with FIS: apply_fis first, then parallelize_pipeline; undo in reverse (handle.remove(), then remove_fis).
diffusers' HookRegistry only unwinds cleanly last-in first-out, and the 'frame' layout swaps the FIS block hooks
for a gathering variant, which needs them in place.
"""

from __future__ import annotations

from .cfg import attach_cfg_parallel
from .context import ParallelContext
from .layout import MODES
from .sequence import attach_sequence_parallel, plan_for


class ParallelHandle:
    """What parallelize_* attached. `shards` (one per transformer) expose the current token layout."""

    def __init__(self):
        self.shards = []
        self._undo = []

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()
        self.shards.clear()


def _transformers(pipe):
    return [t for t in (getattr(pipe, "transformer", None), getattr(pipe, "transformer_2", None)) if t is not None]


def _check(transformers, ctx: ParallelContext, shard: str) -> None:
    if shard not in MODES:
        raise ValueError(f"shard must be one of {', '.join(MODES)}, got {shard!r}")
    for t in transformers:
        ctx.degrees.validate(ctx.world_size, t.config.num_attention_heads)
        if ctx.sp_size > 1:
            plan_for(t)


def parallelize_transformer(transformer, ctx: ParallelContext, shard: str = "spatial",
                            attention_backend: str | None = None) -> ParallelHandle:
    """Sequence parallelism on one transformer (no CFG: that needs the pipeline's two calls)."""
    _check([transformer], ctx, shard)
    handle = ParallelHandle()
    if ctx.sp_size > 1:
        s, undo = attach_sequence_parallel(transformer, ctx, shard, attention_backend)
        handle.shards.append(s)
        handle._undo.append(undo)
    return handle


def parallelize_pipeline(pipe, ctx: ParallelContext, shard: str = "spatial",
                         attention_backend: str | None = None) -> ParallelHandle:
    """Sequence parallelism on every transformer of `pipe` (both Wan 2.2 experts) over ctx's ring x ulysses
    ranks, and CFG parallelism over its 'cfg' axis. Every rank gets the whole prediction of every call, so the
    scheduler keeps identical full latents on all ranks. Errors (degrees, heads, shard) come before any change."""
    transformers = _transformers(pipe)
    if not transformers:
        raise ValueError(f"{type(pipe).__name__} has no transformer to parallelize")
    _check(transformers, ctx, shard)
    handle = ParallelHandle()
    if ctx.sp_size > 1:
        for t in transformers:
            s, undo = attach_sequence_parallel(t, ctx, shard, attention_backend)
            handle.shards.append(s)
            handle._undo.append(undo)
    if ctx.degrees.cfg == 2:
        handle._undo.append(attach_cfg_parallel(pipe, transformers, ctx))
    return handle
