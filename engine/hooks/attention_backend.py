"""Choose a diffusers attention backend for one model without touching the process-wide default, and the FA3 backend.

diffusers' `ModelMixin.set_attention_backend` also sets the registry's *active* backend, which every other model in
the process then inherits (a second pipeline, a test run after a benchmark). We keep its validation and per-layer
effect and put the process default back.

`fa3`: FlashAttention-3 from the `fa3-fwd` wheel (forward only, abi3, 27.6 MB; 1.18-1.22x cuDNN attention on an
H200 at Wan's 40 x 128 heads). diffusers already has the backend that runs it under Ulysses and ring attention too,
`_flash_3_hub`; it normally downloads its kernel from the Hub through the `kernels` package. Here the kernel slot is
filled with fa3-fwd's functions (engine/compat.point_flash3_hub_at) and the layers get `_flash_3_hub` directly, so
neither `kernels` nor a download is needed. diffusers' `_flash_3` backend is not used: it imports FA3 under the
upstream module name (flash_attn_interface, which fa3-fwd renamed) and has no context-parallel path.
"""

from __future__ import annotations

import importlib.util
import sys

import torch

from engine.errors import UserError

FA3 = "fa3"  # our name for it; the layers carry diffusers' name
FA3_BACKEND = "_flash_3_hub"
FA3_MODULE = "fa3_fwd_interface"
_enabled = False


def fa3_missing(device: torch.device | None = None) -> list[str]:
    """What the fa3 backend lacks on this machine ([] = it can run): the package, a CUDA GPU, a Hopper one."""
    missing = []
    if FA3_MODULE not in sys.modules and importlib.util.find_spec(FA3_MODULE) is None:
        missing.append("the fa3-fwd package (pip install 'fis-engine[fa3]')")
    if (device is not None and device.type != "cuda") or not torch.cuda.is_available():
        missing.append("a CUDA GPU (none is in use)")
    else:
        cap = torch.cuda.get_device_capability(device)
        if cap[0] != 9:  # FA3's kernels are Hopper's (wgmma, TMA)
            missing.append(f"a Hopper GPU, compute capability 9.x (this one is {cap[0]}.{cap[1]})")
    return missing


def check_attention_backend(name: str | None, device: torch.device | None = None) -> None:
    """One line naming what a requested backend lacks (fa3: package, GPU), before any model loads."""
    if name == FA3:
        missing = fa3_missing(device)
        if missing:
            raise UserError(f"attention backend fa3 needs {' and '.join(missing)}", "attention_backend")


def backend_name(name: str) -> str:
    """The diffusers backend name of `name` (fa3 -> _flash_3_hub, with its kernel pointed at fa3-fwd)."""
    if name != FA3:
        return name
    global _enabled
    if not _enabled:
        check_attention_backend(FA3)
        from engine import compat

        compat.point_flash3_hub_at(importlib.import_module(FA3_MODULE))
        _enabled = True
    return FA3_BACKEND


def set_attention_backend(module, backend: str) -> None:
    """Backend `backend` on every attention layer of `module` (a diffusers model or a bare block)."""
    from diffusers.models.attention import AttentionModuleMixin

    from engine import compat

    if backend == FA3:
        _set_on_processors(module, backend_name(backend))
        return
    before = compat.active_backend()
    try:
        if hasattr(module, "set_attention_backend") and not isinstance(module, AttentionModuleMixin):  # a model
            module.set_attention_backend(backend)
            return
        compat.check_backend_requirements(backend)  # a bare block: a missing package fails now
        for m in module.modules():
            if isinstance(m, AttentionModuleMixin):
                m.set_attention_backend(backend)
    finally:
        compat.set_active_backend(before)


def _set_on_processors(module, backend: str) -> None:
    """What ModelMixin.set_attention_backend does to each layer (new-style attention modules and the older
    `Attention` HunyuanVideo 1.5 uses), without its requirement check: for fa3 that check asks for the `kernels`
    package, whose download backend_name made unnecessary; fa3_missing checked what fa3 does need."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_dispatch import AttentionBackendName
    from diffusers.models.attention_processor import Attention

    name = AttentionBackendName(backend)
    for m in module.modules():
        processor = getattr(m, "processor", None) if isinstance(m, (Attention, AttentionModuleMixin)) else None
        if processor is not None and hasattr(processor, "_attention_backend"):
            processor._attention_backend = name
