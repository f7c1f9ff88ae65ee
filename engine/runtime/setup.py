"""Everything the engine attaches to a pipeline's transformers, in one fixed order (like torchtitan's parallelize):

  0. quantisation        FP8 weights of the blocks' linears (engine/hooks/quantize.py): weights are final before
                         compile traces the blocks; LoRAs were fused at load, before this; not undone by remove()
  1. attention backend   on each model's attention layers, never process-wide (engine/hooks/attention_backend.py)
  2. torch.compile       each block's own forward, before any hook wraps it, so the hooks stay eager Python
  3. FIS                 one FISState shared by every transformer (both Wan 2.2 experts see the same step)
  4. family speed-ups    single-process and exact (HunyuanVideo 1.5: text padding dropped, no dense mask)
  5. parallelism         sequence parallelism, then CFG parallelism (outermost: a deferred cond call skips all)

FIS goes before parallelism because the frame layout swaps the FIS block hooks for a gathering variant, and
diffusers' HookRegistry only unwinds cleanly last in, first out. `Prepared.remove()` takes everything off in
reverse. The Worker, the benchmarks and the profiler all attach through `prepare`; a benchmark that keeps its
compiled blocks across rows calls it twice (stages 1-2 once, then 3-5 per row), which keeps the order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.hooks.attention_backend import set_attention_backend
from engine.hooks.compile import compile_blocks
from engine.hooks.fis import FISState, apply_fis, remove_fis
from engine.hooks.quantize import quantize_blocks
from engine.models import family_of
from fis import FISConfig
from parallel import parallelize_pipeline, parallelize_transformer

_UNSET = object()


@dataclass
class Prepared:
    """What prepare attached. `state` is the shared FISState (None when FIS was not attached); `parallel` the
    parallel handle (None in one process)."""

    state: FISState | None = None
    parallel: object | None = None
    quantized: dict | None = None  # what stage 0 converted (engine.hooks.quantize.quantize_blocks)
    _undo: list = field(default_factory=list)

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()


def prepare(
    transformers,
    pipe=None,
    *,
    quantize: str = "off",
    attention_backend: str | None = None,
    compile: str = "off",
    fis: FISConfig | None | object = _UNSET,
    optimise: bool = False,
    ctx=None,
    shard: str = "spatial",
    sp_attention: str = "diffusers",
) -> Prepared:
    """Attach the stages asked for, in the order above. quantize: 'off' or 'fp8' (every block but the family's
    `fp8_keep` ones). fis: a config (or None = hooks attached with FIS off, so a later request can turn it on); left
    out = no FIS hooks. optimise: the family's exact speed-ups. ctx: a parallel.ParallelContext with more than one
    rank = parallelism (pipe given: CFG parallelism too). Errors (a missing backend package, bad degrees) come before
    anything is left attached (quantisation, once done, stays: check it first, engine.hooks.quantize)."""
    out = Prepared()
    try:
        if quantize != "off":
            keep = family_of(transformers[0]).fp8_keep(transformers[0].config) or ()
            out.quantized = quantize_blocks(transformers, quantize, keep)
        if attention_backend and not (ctx is not None and ctx.is_distributed):  # under SP, parallelize sets it
            for t in transformers:
                set_attention_backend(t, attention_backend)
        out._undo.append(compile_blocks(transformers, compile))
        if fis is not _UNSET:
            num_blocks = len(getattr(transformers[0], family_of(transformers[0]).adapter.blocks_attr))
            out.state = FISState(fis, num_blocks)
            for t in transformers:
                apply_fis(t, fis, out.state)
                out._undo.append(lambda t=t: remove_fis(t))
        if optimise:
            for t in transformers:
                undo = family_of(t).optimise(t)
                if undo is not None:
                    out._undo.append(undo)
        if ctx is not None and ctx.is_distributed:
            if pipe is not None:
                out.parallel = parallelize_pipeline(pipe, ctx, shard, sp_attention, attention_backend)
                out._undo.append(out.parallel.remove)
            else:
                for t in transformers:
                    handle = parallelize_transformer(t, ctx, shard, sp_attention, attention_backend)
                    out._undo.append(handle.remove)
    except BaseException:
        out.remove()
        raise
    return out
