"""cache-dit, set up as its users set it up, for the end-to-end benchmark's same-run comparison (issue 14).

cache-dit 1.5.x (vipshop/cache-dit) is what a user would pick instead of this engine for a diffusers Wan pipeline on
one GPU. Its fastest *dense* setting (no cache: its DBCache skips computation, which is a different trade) is what
its own example runner applies for `--attn _flash_3 --quantize --quantize-type float8_per_row --compile`
(cache_dit/_utils/utils.py: maybe_apply_optimization): torchao float8 per-row on the transformers' repeated blocks
(`cache_dit.quantize`, both Wan 2.2 experts), the FA3 attention backend, `cache_dit.set_compile_configs()` plus
`torch.set_float32_matmul_precision("high")`, and diffusers' regional compile (`compile_repeated_blocks`, static
shapes) on each transformer. Everything goes through cache-dit's and diffusers' public API.

FA3: cache-dit's own `_flash_3` backend imports FlashAttention-3 as `flash_attn_interface` (the upstream build's
module), and diffusers refuses `_flash_3` unless the upstream `flash_attn_3` distribution is installed. The kernel on
this GPU is fa3-fwd's (the same FlashAttention-3 forward, module renamed), so cache-dit's transformers get it the way
ours do: diffusers' `_flash_3_hub` backend on fa3-fwd (engine/hooks/attention_backend.py). Same kernel on both sides
of the ratio. cache-dit's `set_attn_backend` is not called: it re-registers diffusers' attention backends
process-wide, which would change every row measured after it.

Order: cache-dit's compile settings are process-wide (inductor tuning) and its quantiser patches torchao, so the
cache-dit phase runs last in a benchmark process, on experts rebuilt from the same seeds (the same weights).
"""

from __future__ import annotations

import importlib.util

import torch

from engine.hooks.attention_backend import FA3, fa3_missing, set_attention_backend
from engine.hooks.quantize import fp8_missing


def missing() -> str | None:
    """Why cache-dit cannot run here, or None."""
    if importlib.util.find_spec("cache_dit") is None:
        return "cache-dit is not installed (pip install 'fis-engine[bench]')"
    return None


def version() -> str | None:
    try:
        import cache_dit

        return cache_dit.__version__
    except ImportError:
        return None


def apply(transformers, device: torch.device, compile: bool = True) -> dict:
    """cache-dit's fastest dense single-GPU setting on `transformers` (in place), as far as this machine allows.
    Returns what was applied: {'fp8', 'attention', 'compile'} (a part this machine cannot run says why)."""
    import cache_dit
    from cache_dit import QuantizeConfig

    done = {}
    no_fp8 = fp8_missing(device)
    if no_fp8:
        done["fp8"] = "skipped: needs " + " and ".join(no_fp8)
    else:
        for t in transformers:
            # cache-dit's float8_per_row asserts that every Linear of the model is bf16, so the modules diffusers
            # keeps in fp32 (time embedder, modulation) are cast as a cache-dit user must
            t.to(torch.bfloat16)
            cache_dit.quantize(t, quantize_config=QuantizeConfig(quant_type="float8_per_row"))
        done["fp8"] = "cache_dit.quantize float8_per_row (regional: repeated blocks; model cast wholly to bf16 first)"
    no_fa3 = fa3_missing(device)
    if no_fa3:
        done["attention"] = "default (PyTorch SDPA): fa3 needs " + " and ".join(no_fa3)
    else:
        for t in transformers:
            set_attention_backend(t, FA3)
        done["attention"] = "FA3 (fa3-fwd through diffusers' _flash_3_hub, as the engine's rows)"
    if compile:
        cache_dit.set_compile_configs()
        torch.set_float32_matmul_precision("high")
        for t in transformers:
            t.compile_repeated_blocks(fullgraph=False, dynamic=False)
        done["compile"] = "cache_dit.set_compile_configs + compile_repeated_blocks (static)"
    else:
        done["compile"] = "off"
    return done
