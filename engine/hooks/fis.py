"""FIS as diffusers hooks: no model code copied, removable, no feature cache.

    state = apply_fis(transformer, FISConfig(stride=3))   # one FISState per pipeline
    state.begin(num_steps)  ...  state.step = i + 1         # the engine does this per step
    remove_fis(transformer)                                  # the dense model again, exactly

A model hook reads the latent geometry on every transformer forward; a block hook on every block
asks the shared state whether this (block, step) is sparse, slices the per-frame arguments to the
anchor frames, runs the block's own forward, and rebuilds the skipped frames (fis/reconstruct.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook

from engine.models import BlockArgs, FISAdapter, SliceRule, adapter_for
from fis import FISConfig, FISPlan
from fis.reconstruct import FrameTables, reconstruct, select_frames

MODEL_HOOK = "fis_model"
BLOCK_HOOK = "fis_block"
_KEEP = object()  # begin(): keep the current config
_GLUE = {"label": None}  # profile_glue: a torch.profiler label around FIS's own work in a sparse block


@contextlib.contextmanager
def profile_glue(label: str = "fis_glue"):
    """Tag FIS's frame selection and reconstruction with record_function(label) for torch.profiler, in every
    sparse block (one process or the frame layout) while the context is open."""
    _GLUE["label"] = label
    try:
        yield
    finally:
        _GLUE["label"] = None


def _glue():
    label = _GLUE["label"]
    return contextlib.nullcontext() if label is None else torch.profiler.record_function(label)


class FISState:
    """Shared by the hooks of every transformer of one pipeline (both Wan 2.2 experts).

    config None = FIS off: the hooks call the dense forward. `step` is the pipeline's real step
    index, set by the engine from callback_on_step_end (so CFG's two calls and the expert switch
    see the same step).
    """

    def __init__(self, config: FISConfig | None = None, num_blocks: int = 0):
        self.config = config
        self.num_blocks = num_blocks
        self.step = 0
        self.num_steps = 1
        self.plan: FISPlan | None = None
        # (anchors, device) -> FrameTables, kept across forwards. Not keyed by the frame count: the last frame is
        # always an anchor, so an anchor tuple fixes it.
        self._tables: dict = {}
        self.reused: dict = {}  # per forward: sliced block-invariant args (RoPE)

    def begin(self, num_steps: int, config: FISConfig | None = _KEEP) -> None:
        """A new generation of `num_steps` steps, with `config` from now on if given (None: FIS off)."""
        if config is not _KEEP:
            self.config = config
        self.step, self.num_steps, self.plan = 0, num_steps, None

    def step_callback(self, pipe, i, t, kwargs):
        """Use as (or call from) callback_on_step_end."""
        self.step = i + 1
        return {}

    def start_forward(self, num_frames: int) -> None:
        self.reused.clear()
        if self.config is None:
            self.plan = None
        elif self.plan is None or self.plan.num_frames != num_frames or self.plan.num_steps != self.num_steps:
            self.plan = self.config.resolve(self.num_blocks, num_frames, self.num_steps)

    def anchors(self, block: int):
        return None if self.plan is None else self.plan.anchors(block, self.step)

    def tables(self, anchors: tuple[int, ...], device) -> FrameTables:
        key = (anchors, str(device))
        t = self._tables.get(key)
        if t is None:
            t = self._tables[key] = FrameTables.build(anchors, self.plan.num_frames, device)
        return t


class FISModelHook(ModelHook):
    """On the transformer: records the latent geometry of this forward for the block hooks."""

    def __init__(self, state: FISState, adapter: FISAdapter):
        super().__init__()
        self.state, self.adapter = state, adapter

    def pre_forward(self, module, *args, **kwargs):
        latents = kwargs[self.adapter.input_arg] if self.adapter.input_arg in kwargs else args[0]
        self.state.start_forward(self.adapter.geometry(module, latents)[0])
        return args, kwargs


class FISBlockHook(ModelHook):
    """On one transformer block: run it on anchor frames only when the gates say so."""

    def __init__(self, state: FISState, adapter: FISAdapter, index: int):
        super().__init__()
        self.state, self.adapter, self.index = state, adapter, index

    def initialize_hook(self, module):
        self.args = BlockArgs(module)
        return module

    def new_forward(self, module, *args, **kwargs):
        fwd = self.fn_ref.original_forward
        anchors = self.state.anchors(self.index)
        if anchors is None:
            return fwd(*args, **kwargs)
        hidden = self.args.get(self.adapter.hidden, args, kwargs)
        t = self.state.tables(anchors, hidden.device)
        rebuild = local_rebuild(t, self.state.config.operator)
        return sparse_forward(
            fwd, args, kwargs, self.args, self.adapter, t.anchors, t.num_frames, rebuild, self.state.reused
        )


def sparse_forward(
    fwd,
    args,
    kwargs,
    names: BlockArgs,
    adapter: FISAdapter,
    anchors: torch.Tensor,
    num_frames: int,
    rebuild: Callable,
    reused: dict | None = None,
):
    """Run a block on the frames `anchors` ([A] long, indices into this call's `num_frames`) and rebuild all frames
    (Eq. 7-10): the hidden states and every per-frame argument are sliced to the anchors, the block's own forward
    runs, and rebuild(y_a, x_a, x) turns its anchor output [B, A*HW, C] (x_a: its anchor input, x: the whole input
    [B, F*HW, C]) into [B, F*HW, C]. local_rebuild is the one-process rebuild; parallel/fis_frames.py gives one that
    first gathers anchors from the other ranks.

    `reused` caches slices of block-invariant arguments (RoPE) for the duration of one forward."""
    hidden = names.get(adapter.hidden, args, kwargs)  # [B, F*HW, C]
    args, kwargs = list(args), dict(kwargs)
    with _glue():
        x_a = select_frames(hidden, anchors, num_frames)  # [B, A*HW, C]
        names.set(adapter.hidden, x_a, args, kwargs)
        for name, rule in adapter.per_frame.items():
            value = names.get(name, args, kwargs)
            if value is not None:
                names.set(name, slice_frames(name, value, rule, anchors, num_frames, reused), args, kwargs)
    out = fwd(*args, **kwargs)
    i = adapter.output_index  # dual-stream blocks return (video, text): the text stream passes as is
    y = out if i is None else out[i]  # [B, A*HW, C]
    with _glue():
        y = rebuild(y, x_a, hidden)
    return y if i is None else (*out[:i], y, *out[i + 1 :])


def local_rebuild(t: FrameTables, operator: str) -> Callable:
    """Every frame from this process's anchors (fis/reconstruct.py; one fused kernel on CUDA)."""
    residual = operator == "residual"
    return lambda y_a, x_a, x: reconstruct(y_a, t, x if residual else None)


def slice_frames(name: str, value, rule: SliceRule, anchors: torch.Tensor, num_frames: int, reused: dict | None = None):
    """The anchor frames of one per-frame block argument (a tensor or a tuple of them, e.g. RoPE's
    (cos, sin)). Block-invariant arguments (rule.reuse) are sliced once per anchor set and forward."""
    key = (name, anchors.data_ptr())
    if rule.reuse and reused is not None and key in reused:
        return reused[key]

    def one(x):
        if not torch.is_tensor(x) or (rule.ndim is not None and x.ndim != rule.ndim):
            return x
        return select_frames(x, anchors, num_frames, rule.dim)

    out = type(value)(one(v) for v in value) if isinstance(value, (tuple, list)) else one(value)
    if rule.reuse and reused is not None:
        reused[key] = out
    return out


def apply_fis(transformer, config: FISConfig | None, state: FISState | None = None) -> FISState:
    """Attach FIS to a transformer. Pass the same `state` to both experts of a Wan 2.2 pipeline."""
    adapter = adapter_for(transformer)
    blocks = getattr(transformer, adapter.blocks_attr)
    if state is None:
        state = FISState(config, len(blocks))
    elif state.num_blocks != len(blocks):
        raise ValueError(f"shared FIS state is for {state.num_blocks} blocks, this transformer has {len(blocks)}")
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    if registry.get_hook(MODEL_HOOK) is not None:
        raise ValueError("FIS is already applied to this transformer; call remove_fis first")
    registry.register_hook(FISModelHook(state, adapter), MODEL_HOOK)
    for i, block in enumerate(blocks):
        HookRegistry.check_if_exists_or_initialize(block).register_hook(FISBlockHook(state, adapter, i), BLOCK_HOOK)
    registry.invalidate_child_registries_cache()
    return state


def remove_fis(transformer) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.remove_hook(MODEL_HOOK, recurse=False)
    for block in getattr(transformer, adapter_for(transformer).blocks_attr):
        HookRegistry.check_if_exists_or_initialize(block).remove_hook(BLOCK_HOOK, recurse=False)
    registry.invalidate_child_registries_cache()
