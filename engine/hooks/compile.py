"""torch.compile of the transformer blocks, under the FIS hooks (regional compilation).

Each block's own forward is compiled before any hook wraps it: the FIS/MagCache/parallel hooks stay eager
Python, the block maths (fp32 norms, RoPE, modulation around the GEMMs and attention) is fused. What it gains is
measured in docs/benchmarks.md.
"""

from __future__ import annotations

import torch

from engine.models import adapter_for

MODES = ("off", "static", "auto")


def raise_recompile_limit(limit: int = 64) -> None:
    """One graph per token count is expected (all blocks of both experts share it); leave room for them all."""
    from engine.compat import dynamo_config

    cfg = dynamo_config()
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), limit))


def compile_blocks(transformers, mode: str):
    """`static` compiles once per token count (dense + the 2-3 anchor counts of a stride); `auto` lets dynamo
    mark the token dimension dynamic at the first new count. Must run before any hook is attached (the hooks
    would be compiled into the graphs). Returns the undo (the blocks' own forward back)."""
    if mode not in MODES:
        raise ValueError(f"compile mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off":
        return lambda: None
    blocks = [b for t in transformers for b in getattr(t, adapter_for(t).blocks_attr)]
    if any(getattr(getattr(b, "_diffusers_hook", None), "hooks", None) for b in blocks):
        raise ValueError("compile the blocks before attaching FIS or parallelism (engine.runtime.setup.prepare)")
    raise_recompile_limit()
    for block in blocks:
        block.forward = torch.compile(block.forward, dynamic=None if mode == "auto" else False)

    def undo():
        for block in blocks:
            if "forward" in vars(block):
                del block.forward  # the class's forward again

    return undo
