"""torch.compile of the transformer blocks, under the FIS hooks (regional compilation).

Each block's own forward is compiled before any hook wraps it: the FIS/MagCache/parallel hooks stay eager
Python, the block maths (fp32 norms, RoPE, modulation around the GEMMs and attention) is fused. On an H200
this took the A14B dense forward from 492 to 583 TFLOP/s at 480p (docs/benchmarks.md).
"""

from __future__ import annotations

import torch

from engine.models.spec import adapter_for

MODES = ("off", "static", "auto")


def raise_recompile_limit(limit: int = 64) -> None:
    """One graph per token count is expected (all blocks of both experts share it); leave room for them all."""
    import torch._dynamo

    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), limit))


def compile_blocks(transformers, mode: str) -> None:
    """`static` compiles once per token count (dense + the 2-3 anchor counts of a stride); `auto` lets dynamo
    mark the token dimension dynamic at the first new count. Call before apply_fis."""
    if mode not in MODES:
        raise ValueError(f"compile mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off":
        return
    raise_recompile_limit()
    for t in transformers:
        for block in getattr(t, adapter_for(t).blocks_attr):
            block.forward = torch.compile(block.forward, dynamic=None if mode == "auto" else False)
