"""Everything the engine uses of diffusers and torch that they do not promise (private names), in one file, so a
version bump is a one-file diff. A leaf like engine/errors.py: every layer, parallel/ included, may import it.
Pinned against diffusers 0.42.1 and torch 2.11-2.13."""

from __future__ import annotations

# diffusers: the attention backend registry (process-wide active backend, per-backend requirement checks)
from diffusers.hooks.hooks import BaseState, StateManager  # noqa: F401  stateful hooks (CFG parallelism)
from diffusers.hooks.mag_cache import _MAG_CACHE_LEADER_BLOCK_HOOK as MAG_CACHE_LEADER_BLOCK_HOOK  # noqa: F401
from diffusers.models._modeling_parallel import ParallelConfig  # noqa: F401  what enable_parallelism takes
from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements
from diffusers.models.attention_dispatch import _AttentionBackendRegistry as _Registry


def active_backend():
    """The process-wide active attention backend (what a processor without its own backend uses)."""
    return _Registry._active_backend


def set_active_backend(backend) -> None:
    _Registry.set_active_backend(backend)


def default_backend_name() -> str:
    return _Registry.get_active_backend()[0]


def check_backend_requirements(name: str) -> None:
    """Raise (diffusers' message) if the backend's package or hardware is missing."""
    _check_attention_backend_requirements(AttentionBackendName(name))


def point_flash3_hub_at(fa3) -> None:
    """diffusers' `_flash_3_hub` backend (FlashAttention-3, Ulysses and ring included) calls the kernel its hub-kernel
    registry holds once `kernels` has downloaded it. Filling that slot with a locally installed FA3 interface module
    (fa3-fwd's `fa3_fwd_interface`: the upstream `flash_attn_interface` renamed) runs diffusers' own backend code on
    it and nothing is downloaded; no diffusers function is replaced. The context-parallel path calls the module's
    private `_flash_attn_forward` (the custom op that returns the log-sum-exp ring attention merges by)."""
    from diffusers.models.attention_dispatch import _HUB_KERNELS_REGISTRY

    kernel_fn, forward_fn = fa3.flash_attn_func, fa3._flash_attn_forward

    def no_backward(*args, **kwargs):
        raise RuntimeError("the FA3 kernel in use (fa3-fwd) is forward only: inference, no gradients")

    config = _HUB_KERNELS_REGISTRY[AttentionBackendName._FLASH_3_HUB]
    config.kernel_fn, config.wrapped_forward_fn, config.wrapped_backward_fn = kernel_fn, forward_fn, no_backward


def supports_context_parallel(name: str) -> bool:
    return _Registry._is_context_parallel_available(AttentionBackendName(name))


def keep_in_fp32_modules(model) -> list[str]:
    """The module names a diffusers model keeps in fp32 when loaded in bf16 (norms, modulation, time embedder)."""
    return list(getattr(model, "_keep_in_fp32_modules", None) or [])


def flatten_group(mesh):
    """The process group of a multi-dimensional DeviceMesh slice taken as one dimension."""
    return mesh._flatten().get_group()


def dynamo_config():
    import torch._dynamo

    return torch._dynamo.config


def compile_settings():
    """A snapshot of the process-wide compile settings (dynamo, inductor, fp32 matmul precision), for a benchmark that
    lets a library set its own (cache-dit's set_compile_configs) and puts them back after."""
    import torch
    import torch._dynamo.config
    import torch._inductor.config

    return (
        torch._dynamo.config.save_config(),
        torch._inductor.config.save_config(),
        torch.get_float32_matmul_precision(),
    )


def restore_compile_settings(saved) -> None:
    import torch
    import torch._dynamo.config
    import torch._inductor.config

    torch._dynamo.config.load_config(saved[0])
    torch._inductor.config.load_config(saved[1])
    torch.set_float32_matmul_precision(saved[2])


def reset_compiled() -> None:
    """Forget every compiled graph (and the modules their guards hold): before a model is rebuilt in place."""
    import torch._dynamo

    torch._dynamo.reset()


def dynamo_counters():
    from torch._dynamo.utils import counters

    return counters


def reset_stateful_cache(model) -> None:
    """Drop what stateful diffusers hooks (MagCache residuals) kept from the previous generation."""
    model._reset_stateful_cache()
