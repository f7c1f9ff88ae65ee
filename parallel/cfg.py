"""CFG parallelism: the cond and uncond branches of one step on two rank groups at the same time.

diffusers' Wan pipelines call the transformer twice per step, inside cache_context("cond") and
cache_context("uncond"). At the 'cond' call, CFG rank 0 computes cond (the prompt it was given) and CFG rank 1
computes uncond (with the negative prompt embeddings), then the two predictions are all-gathered over the 'cfg'
axis: 'cond' returns the first, and the 'uncond' call that follows returns the stashed second without computing.
The negative embeddings are taken from pipe.encode_prompt, which every pipeline call goes through (also when the
caller passes prompt_embeds / negative_prompt_embeds itself).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from engine.fis_hooks import BlockArgs

from .context import ParallelContext

CFG_HOOK = "cfg_parallel"


class NegativeCapture:
    """Keeps the negative prompt embeddings of the latest pipe.encode_prompt call (None when CFG is off)."""

    def __init__(self, pipe):
        self.pipe, self.embeds = pipe, None
        original = pipe.encode_prompt

        @functools.wraps(original)
        def encode_prompt(*args, **kwargs):
            positive, negative = original(*args, **kwargs)
            self.embeds = negative
            return positive, negative

        pipe.encode_prompt = encode_prompt  # instance attribute over the class method; remove() deletes it

    def remove(self) -> None:
        del self.pipe.encode_prompt


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class CFGParallelHook(ModelHook):
    _is_stateful = True  # diffusers' cache_context sets the call's name ('cond' / 'uncond') on stateful hooks

    def __init__(self, ctx: ParallelContext, negatives: NegativeCapture, text_arg: str = "encoder_hidden_states"):
        super().__init__()
        self.group, self.branch = ctx.group("cfg"), ctx.axis_rank("cfg")
        self.negatives, self.text_arg = negatives, text_arg
        self.calls = StateManager(_NoState)
        self._stash: torch.Tensor | None = None  # uncond prediction computed at the 'cond' call

    def initialize_hook(self, module):
        self.args = BlockArgs(module)
        return module

    def reset_state(self, module):
        self._stash = None
        return module

    def new_forward(self, module, *args, **kwargs):
        fwd = self.fn_ref.original_forward
        name = self._call_name()
        if name == "uncond" and self._stash is not None:
            sample, self._stash = self._stash, None
            return _wrap(sample, kwargs)
        negative = self.negatives.embeds
        if name != "cond" or negative is None:  # no CFG on this call: both groups compute it (same result)
            return fwd(*args, **kwargs)
        if self.branch == 1:
            args, kwargs = list(args), dict(kwargs)
            positive = self.args.get(self.text_arg, args, kwargs)  # [B, L, C_text]
            self.args.set(self.text_arg, negative.to(device=positive.device, dtype=positive.dtype), args, kwargs)
        out = fwd(*args, **kwargs)
        sample = out[0] if isinstance(out, tuple) else out.sample  # [B, C, F, H, W], whole on every rank
        both = [torch.empty_like(sample) for _ in range(2)]
        dist.all_gather(both, sample.contiguous(), group=self.group)
        self._stash = both[1]
        return _wrap(both[0], kwargs)

    def _call_name(self) -> str | None:
        try:
            return self.calls.context.name
        except ValueError:  # called outside cache_context (not from a diffusers pipeline loop)
            return None


def _wrap(sample: torch.Tensor, kwargs):
    return Transformer2DModelOutput(sample=sample) if kwargs.get("return_dict", True) else (sample,)


def attach_cfg_parallel(pipe, transformers, ctx: ParallelContext):
    """Put the CFG hook on every transformer of `pipe` (outermost, so the 'uncond' call skips everything).
    Returns an undo function."""
    negatives = NegativeCapture(pipe)
    for t in transformers:
        registry = HookRegistry.check_if_exists_or_initialize(t)
        registry.register_hook(CFGParallelHook(ctx, negatives), CFG_HOOK)
        registry.invalidate_child_registries_cache()

    def undo():
        for t in transformers:
            t._diffusers_hook.remove_hook(CFG_HOOK, recurse=False)
            t._diffusers_hook.invalidate_child_registries_cache()
        negatives.remove()

    return undo
