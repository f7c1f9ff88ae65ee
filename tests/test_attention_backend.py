"""engine.hooks.attention_backend: the backend lands on the model's layers, not on the process."""

import pytest
from diffusers.models.attention_dispatch import _AttentionBackendRegistry
from helpers import bare_transformer

from engine.hooks.attention_backend import set_attention_backend


def _processors(module):
    return [
        m.processor for m in module.modules() if hasattr(m, "processor") and hasattr(m.processor, "_attention_backend")
    ]


def _tiny():
    return bare_transformer(heads=2)


@pytest.mark.parametrize("on", ["model", "block"])
def test_layers_get_it_process_keeps_its_own(on):
    model = _tiny()
    target = model if on == "model" else model.blocks[0]
    before = _AttentionBackendRegistry._active_backend
    set_attention_backend(target, "_native_math")
    assert _AttentionBackendRegistry._active_backend == before
    procs = _processors(target)
    assert procs and all(p._attention_backend.value == "_native_math" for p in procs)
    if on == "block":  # not on the other block
        assert all(p._attention_backend is None for p in _processors(model.blocks[1]))


def test_unknown_backend_is_refused_and_process_unchanged():
    before = _AttentionBackendRegistry._active_backend
    with pytest.raises(ValueError, match="must be one of"):
        set_attention_backend(_tiny(), "no-such-backend")
    assert _AttentionBackendRegistry._active_backend == before
