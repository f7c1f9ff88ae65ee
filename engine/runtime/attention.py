"""`--attention-backend auto`: the fastest attention backend measured on this GPU at this model's heads.

A few candidates (PyTorch's SDPA default, cuDNN, and fa3 where its package and a Hopper GPU are present) time one
attention call each at the model's heads and head size and the token count of its default video size, once at
start-up (well under a second on an H200); the fastest wins. On a CPU there is nothing to choose: SDPA. The
benchmark's `--attention-backend auto` times whole blocks instead (engine/bench/kernels.py).
"""

from __future__ import annotations

import torch

from engine.errors import one_line
from engine.hooks.attention_backend import FA3, backend_name, fa3_missing

from .timing import time_fn

CANDIDATES = ("native", "_native_cudnn", FA3)  # SDPA's own pick, cuDNN, FlashAttention-3 (fa3-fwd)


def pick_backend(heads: int, head_dim: int, tokens: int, device: torch.device) -> tuple[str | None, str]:
    """(backend or None = the default, why): the fastest candidate at [1, tokens, heads, head_dim] bf16."""
    if device.type != "cuda":
        return None, "auto on CPU: PyTorch SDPA"
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

    q, k, v = (torch.randn(1, tokens, heads, head_dim, device=device, dtype=torch.bfloat16) for _ in "qkv")
    times, skipped = {}, []
    for name in CANDIDATES:
        if name == FA3 and fa3_missing(device):
            skipped.append(f"{FA3}: {', '.join(fa3_missing(device))}")
            continue
        try:
            backend = AttentionBackendName(backend_name(name))
            times[name] = time_fn(lambda b=backend: dispatch_attention_fn(q, k, v, backend=b), device, 2, 5)
        except Exception as e:  # a backend that cannot run here is not a candidate
            skipped.append(f"{name}: {one_line(e, 80)}")
    if not times:
        return None, "auto: no candidate ran (" + "; ".join(skipped) + "), PyTorch SDPA"
    best = min(times, key=times.get)
    measured = ", ".join(f"{n} {t * 1e3:.2f} ms" for n, t in sorted(times.items(), key=lambda x: x[1]))
    return best, f"auto: fastest attention at {tokens:,} tokens x {heads} heads ({measured})"
