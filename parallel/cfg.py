"""CFG parallelism: the cond and uncond branches of one step on two rank groups at the same time.

diffusers' pipelines call the transformer twice per step, cond first, each inside a cache_context: Wan names them
'cond' / 'uncond', the guider-driven ones (HunyuanVideo 1.5) 'pred_cond' / 'pred_uncond'. Neither reads the cond
prediction before the uncond call returns. So the cond call is deferred: it returns a NaN-filled tensor of the
output's shape and keeps its inputs; at the uncond call CFG rank 0 computes cond (with the kept inputs) while CFG
rank 1 computes uncond (with the inputs it was just given), the two are all-gathered over the 'cfg' axis, the cond
one is written into the tensor returned earlier and the uncond one is returned. No model or pipeline argument is
named, so any pipeline with this call pattern works; whether an uncond call follows comes from the pipeline
(`do_classifier_free_guidance`, or its guider's `num_conditions` for this step).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from engine.compat import BaseState, StateManager

from .context import ParallelContext

CFG_HOOK = "cfg_parallel"
COND, UNCOND = ("cond", "pred_cond"), ("uncond", "pred_uncond")


def uncond_follows(pipe) -> bool:
    """Will this step's cond call be followed by an uncond call? Asked at the cond call."""
    guider = getattr(pipe, "guider", None)
    if guider is not None:  # set_state(step) ran before this step's calls; CFG may be off for some steps
        return guider.num_conditions > 1
    return bool(getattr(pipe, "do_classifier_free_guidance", False))


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class CFGParallelHook(ModelHook):
    _is_stateful = True  # diffusers' cache_context sets the call's name on stateful hooks

    def __init__(self, ctx: ParallelContext, pipe):
        super().__init__()
        self.group, self.branch, self.pipe = ctx.group("cfg"), ctx.axis_rank("cfg"), pipe
        self.calls = StateManager(_NoState)
        self._pending = None  # (args, kwargs, returned tensor) of the deferred cond call

    def reset_state(self, module):
        self._pending = None
        return module

    def new_forward(self, module, *args, **kwargs):
        fwd = self.fn_ref.original_forward
        name = self._call_name()
        if name in COND and uncond_follows(self.pipe):
            out = _placeholder(module, args, kwargs)
            self._pending = (args, kwargs, out)  # replaces any left by a call that failed half-way
            return _wrap(out, kwargs)
        if name in UNCOND and self._pending is not None:
            cond_args, cond_kwargs, cond_out = self._pending
            self._pending = None
            mine = fwd(*cond_args, **cond_kwargs) if self.branch == 0 else fwd(*args, **kwargs)
            sample = mine[0] if isinstance(mine, tuple) else mine.sample  # [B, C, F, H, W], whole on every rank
            both = [torch.empty_like(sample) for _ in range(2)]
            dist.all_gather(both, sample.contiguous(), group=self.group)
            if cond_out.shape != both[0].shape or cond_out.dtype != both[0].dtype:
                raise RuntimeError(
                    f"CFG parallelism: expected a {tuple(cond_out.shape)} {cond_out.dtype} prediction, "
                    f"the model returned {tuple(both[0].shape)} {both[0].dtype}"
                )
            cond_out.copy_(both[0])
            return _wrap(both[1], kwargs)
        return fwd(*args, **kwargs)  # no CFG this step, or outside a pipeline loop: both groups compute it

    def _call_name(self) -> str | None:
        try:
            return self.calls.context.name
        except ValueError:  # called outside cache_context (not from a diffusers pipeline loop)
            return None


def _placeholder(module, args, kwargs) -> torch.Tensor:
    """NaNs shaped like the prediction: [B, out_channels, F, H, W] of the input's [B, in_channels, F, H, W], in the
    dtype of the output projection (NaN, so a prediction that is never filled cannot pass unnoticed)."""
    x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # [B, C_in, F, H, W]
    channels = getattr(module.config, "out_channels", None) or x.shape[1]
    proj = getattr(module, "proj_out", None)
    dtype = proj.weight.dtype if isinstance(proj, torch.nn.Linear) else x.dtype
    return torch.full((x.shape[0], channels, *x.shape[2:]), float("nan"), dtype=dtype, device=x.device)


def _wrap(sample: torch.Tensor, kwargs):
    return Transformer2DModelOutput(sample=sample) if kwargs.get("return_dict", True) else (sample,)


def attach_cfg_parallel(pipe, transformers, ctx: ParallelContext):
    """Put the CFG hook on every transformer of `pipe` (outermost, so a deferred call skips everything).
    Returns an undo function."""
    for t in transformers:
        registry = HookRegistry.check_if_exists_or_initialize(t)
        registry.register_hook(CFGParallelHook(ctx, pipe), CFG_HOOK)
        registry.invalidate_child_registries_cache()

    def undo():
        for t in transformers:
            t._diffusers_hook.remove_hook(CFG_HOOK, recurse=False)
            t._diffusers_hook.invalidate_child_registries_cache()

    return undo
