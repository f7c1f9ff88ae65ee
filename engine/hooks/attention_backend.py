"""Choose a diffusers attention backend for one model without touching the process-wide default.

diffusers' `ModelMixin.set_attention_backend` also sets the registry's *active* backend, which every other model in
the process then inherits (a second pipeline, a test run after a benchmark). We keep its validation and per-layer
effect and put the process default back.
"""

from __future__ import annotations


def set_attention_backend(module, backend: str) -> None:
    """Backend `backend` on every attention layer of `module` (a diffusers model or a bare block)."""
    from diffusers.models.attention import AttentionModuleMixin

    from engine import compat

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
