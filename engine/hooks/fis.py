"""FIS as diffusers hooks: no model code copied, removable, no feature cache.

    state = apply_fis(transformer, FISConfig(stride=3))   # one FISState per pipeline
    state.begin(num_steps)  ...  state.step = i + 1         # the engine does this per step
    remove_fis(transformer)                                  # the dense model again, exactly

A model hook reads the latent geometry on every transformer forward; a block hook on every block
asks the shared state whether this (block, step) is sparse and runs the config's operator (fis/operators.py):

  block scope      slices the hidden states and the per-frame arguments to the anchor frames, runs the block's
                   own forward, and rebuilds the skipped frames (fis/reconstruct.py)
  attention scope  runs the block on every frame with a SparseAttentionHook on its self-attention module (the
                   adapter's AttentionSite) for the duration of this one call: 'attn' runs the module on the anchors
                   and interpolates its output, 'kv' gives every query the anchors' keys and values only

The attention hook exists only inside a sparse block call, so the dense model, a compiled block graph and
`remove_fis` never see it; such a block runs its eager forward (a compiled graph would trace the hook).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.hooks import HookRegistry, ModelHook

from engine.models import BlockArgs, FISAdapter, SliceRule, adapter_for
from fis import FISConfig, FISPlan
from fis.operators import Operator
from fis.operators import get as get_operator
from fis.reconstruct import FrameTables, add_updates, reconstruct, select_frames

MODEL_HOOK = "fis_model"
BLOCK_HOOK = "fis_block"
ATTENTION_HOOK = "fis_attention"
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


@dataclass(frozen=True)
class SparseView:
    """One sparse block call's anchors as this process sees them. In one process (and under the spatial layout, where
    every rank holds every frame) the anchors are the plan's; under the frame layout parallel/fis_frames.py gives each
    rank its own anchors, tables over all anchors, a gather and the all-to-all's uneven switch."""

    anchors: torch.Tensor  # [A_r] long, the anchor frames this process holds (indices into its num_frames)
    num_frames: int  # frames this process holds
    tables: FrameTables  # this process's frames interpolated from ALL anchors
    gather: Callable | None = None  # [B, A_r*HW, C] -> [B, A*HW, C] from every rank; None: all anchors are here
    around: Callable = contextlib.nullcontext  # (queries_uneven: bool) -> context around the self-attention call

    @property
    def local(self) -> bool:
        return self.gather is None

    def interpolate(self, v_a: torch.Tensor) -> torch.Tensor:
        """Eq. 10 on per-anchor values [B, A_r*HW, C] -> this process's frames [B, F_r*HW, C]."""
        return reconstruct(v_a if self.local else self.gather(v_a), self.tables)


class FISBlockHook(ModelHook):
    """On one transformer block: run it sparse (the config's operator) when the gates say so."""

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
        view = self.view(anchors, hidden.device)
        op = get_operator(self.state.config.operator)
        return run_operator(op, module, fwd, view, self.args, self.adapter, args, kwargs, self.state.reused)

    def view(self, anchors: tuple[int, ...], device) -> SparseView:
        t = self.state.tables(anchors, device)
        return SparseView(t.anchors, t.num_frames, t)


def run_operator(
    op: Operator,
    block,
    fwd,
    view: SparseView,
    names: BlockArgs,
    adapter: FISAdapter,
    args,
    kwargs,
    reused: dict | None = None,
):
    """One sparse call of `block` with operator `op` on the anchors of `view`; fwd is the block's forward (compiled
    or not) for the block-scope operators. The FIS block hooks and the §3.2 probe both run operators through here."""
    if op.per_frame:
        return attention_forward(op, block, view, adapter, args, kwargs, reused)
    if view.local:
        rebuild = local_rebuild(view.tables, op.name)
    else:
        rebuild = _gathered_rebuild(view, op.rebuild == "residual")
        uneven = fwd

        def fwd(*a, **kw):  # the anchors-only attention: anchor counts differ between ranks
            with view.around(False):
                return uneven(*a, **kw)

    return sparse_forward(fwd, args, kwargs, names, adapter, view.anchors, view.num_frames, rebuild, reused)


def _gathered_rebuild(view: SparseView, residual: bool) -> Callable:
    """The frame layout's rebuild: the anchors' updates (or outputs) of every rank, then this rank's frames."""

    def rebuild(y, x_a, x):  # y, x_a: [B, A_r*HW, C]; x: [B, F_r*HW, C]
        out = view.interpolate(y - x_a if residual else y)  # [B, F_r*HW, C]
        return add_updates(out, x, y, view.anchors) if residual else out

    return rebuild


def attention_forward(op: Operator, block, view: SparseView, adapter: FISAdapter, args, kwargs, reused=None):
    """An attention-scope operator: the block's eager forward on every frame, with a SparseAttentionHook on its
    self-attention module for this call only."""
    site = adapter.attention
    if site is None or (op.name == "kv" and site.split is None):
        raise ValueError(f"FIS operator {op.name!r} has no self-attention site for {adapter.name} models")
    registry = HookRegistry.check_if_exists_or_initialize(block.get_submodule(site.module))
    registry.register_hook(SparseAttentionHook(op, site, view, reused), ATTENTION_HOOK)
    try:
        return type(block).forward(block, *args, **kwargs)
    finally:
        registry.remove_hook(ATTENTION_HOOK, recurse=False)


class SparseAttentionHook(ModelHook):
    """On a block's self-attention module during one sparse call (attention_forward).

    attn: the module on the anchor frames (its video tokens and per-frame arguments sliced, as the block-scope
          operators slice the block's), its video output interpolated to every frame (Eq. 10); a joint-attention
          text stream gets the output of attending to the anchors.
    kv:   the site's split: every query against the keys and values of the anchor frames."""

    def __init__(self, op: Operator, site, view: SparseView, reused: dict | None):
        super().__init__()
        self.op, self.site, self.view, self.reused = op, site, view, reused

    def initialize_hook(self, module):
        self.names = BlockArgs(module)
        return module

    def new_forward(self, module, *args, **kwargs):
        v, site, names = self.view, self.site, self.names
        hidden = names.get(site.hidden, args, kwargs)  # [B, F*HW, C]
        if self.op.name == "kv":

            def keys(x, dim):  # the anchor frames' tokens of x (every token along dim)
                return select_frames(x, v.anchors, v.num_frames, dim)

            with v.around(True):  # queries: every frame this rank holds
                return site.split(module, args, kwargs, names, keys)
        args, kwargs = list(args), dict(kwargs)
        with _glue():
            names.set(site.hidden, select_frames(hidden, v.anchors, v.num_frames), args, kwargs)  # [B, A*HW, C]
            for name, rule in site.per_frame.items():
                value = names.get(name, args, kwargs)
                if value is not None:
                    names.set(name, slice_frames(name, value, rule, v.anchors, v.num_frames, self.reused), args, kwargs)
        with v.around(False):
            out = self.fn_ref.original_forward(*args, **kwargs)
        i = site.output_index
        y = out if i is None else out[i]  # [B, A*HW, C]
        with _glue():
            y = v.interpolate(y)  # [B, F*HW, C]
        return y if i is None else (*out[:i], y, *out[i + 1 :])


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
    [B, F*HW, C]) into [B, F*HW, C]. local_rebuild is the one-process rebuild; under the frame layout the rebuild
    first gathers anchors from the other ranks (run_operator).

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
