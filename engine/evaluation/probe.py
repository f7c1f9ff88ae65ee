"""Measuring a model the way the paper's §3.2 does, with forward hooks, streamed.

Per (prompt, step, block) it keeps only the adjacent-frame relative-change curve (Eq. 1-3, F-1
numbers) and, for each FIS operator (fis/operators.py), the per-frame error of a sparse evaluation of that
block on the same input (Eq. 6, F numbers), and for the block-scope operators the error of the reconstruction
alone fed exact anchor outputs. No feature map outlives its hook.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.distributed as dist

from engine.errors import UserError
from engine.hooks.fis import SparseView, run_operator
from engine.models import BlockArgs, adapter_for
from engine.runtime import timing
from engine.runtime.request import GenerationRequest
from fis import OPERATORS, anchor_frames
from fis.analysis import (
    coefficient_of_variation,
    magnitude_map,
    per_frame_error,
    per_frame_error_parts,
    relative_change,
    relative_change_parts,
)
from fis.operators import get as get_operator
from fis.reconstruct import FrameTables, reconstruct, select_frames

BLOCK_OPERATORS = tuple(op for op in OPERATORS if not get_operator(op).per_frame)  # interp_error: these only


class BlockProbe:
    def __init__(self, worker, stride: int):
        self.w, self.stride = worker, stride
        self.adapter = adapter_for(worker.transformers[0])
        self.curves: dict = {}  # (prompt, step, block) -> [F-1]
        self.errors: dict = {}  # (operator, prompt, step, block) -> [F], sparse evaluation (Eq. 6)
        self.interp_errors: dict = {}  # same keys, reconstruction from exact anchor outputs
        self.prompt = 0
        self.num_frames = 0
        self._handles = []
        for t in worker.transformers:
            self._handles.append(t.register_forward_pre_hook(self._geometry, with_kwargs=True))
            for b, block in enumerate(getattr(t, self.adapter.blocks_attr)):
                self._handles.append(
                    block.register_forward_hook(functools.partial(self._measure, b, BlockArgs(block)), with_kwargs=True)
                )

    def close(self):
        for h in self._handles:
            h.remove()

    def _geometry(self, module, args, kwargs):
        latents = kwargs.get(self.adapter.input_arg, args[0] if args else None)
        self.num_frames, _ = self.adapter.geometry(module, latents)

    def _sum(self, parts):
        """Under sequence parallelism each rank holds a spatial slice of every frame: the squared sums
        behind Eq. 3 and Eq. 6 add up over the ranks, so the numbers equal one process's."""
        group = self.w.ctx.sp_group
        if group is not None:
            for p in parts:
                dist.all_reduce(p, group=group)
        return parts

    @torch.no_grad()
    def _measure(self, b, names, module, args, kwargs, output):
        step, F = self.w.fis.step, self.num_frames
        key = (self.prompt, step, b)
        if key in self.curves:  # the CFG 'uncond' call of the same step: measure the cond call only
            return
        i = self.adapter.output_index
        y_full = output if i is None else output[i]  # [B, F*HW, C] video tokens
        parts = self._sum(relative_change_parts(magnitude_map(y_full, F)))
        self.curves[key] = relative_change(None, parts).mean(0).cpu()  # [F-1]
        t = FrameTables.build(anchor_frames(F, self.stride, b % self.stride), F, y_full.device)
        fwd = functools.partial(type(module).forward, module)  # the block itself, past any hook
        x = names.get(self.adapter.hidden, args, kwargs)
        y_anchor = select_frames(y_full, t.anchors, F)  # the dense outputs of the anchor frames
        view = SparseView(t.anchors, F, t)
        for op in OPERATORS:
            # what FIS runs: anchors see only anchors in attention, so they too drift a little
            y = run_operator(get_operator(op), module, fwd, view, names, self.adapter, args, kwargs)
            y = y if i is None else y[i]
            self.errors[(op, *key)] = self._error(y, y_full, F)  # [F]
            if op not in BLOCK_OPERATORS:
                continue
            # the operator alone, fed exact anchors: zero on anchors by construction
            y = reconstruct(y_anchor, t, x if op == "residual" else None)
            self.interp_errors[(op, *key)] = self._error(y, y_full, F)

    def _error(self, y, y_full, F):
        return per_frame_error(None, None, F, self._sum(per_frame_error_parts(y, y_full, F))).cpu()


def profile(worker, prompts: list[str], req: GenerationRequest, stride: int, progress=None) -> dict:
    """Run every prompt dense and measure. Returns plain lists for JSON."""
    req = worker.validate(req)
    if worker.ctx.sp_size > 1 and worker.cfg.shard != "spatial":
        raise UserError("profiling needs every rank to hold every frame: use --shard spatial")
    probe = BlockProbe(worker, stride)
    timing.reset_peak(worker.device)
    seconds = []
    try:
        for p, prompt in enumerate(prompts):
            probe.prompt = p
            r = GenerationRequest(**{**req.__dict__, "prompt": prompt, "fis": None})
            t0 = timing.now(worker.device)
            worker.generate(r, decode=False)
            seconds.append(timing.now(worker.device) - t0)
            if progress:
                progress(p + 1, len(prompts))
    finally:
        probe.close()
    P, T, L, F = len(prompts), req.steps, worker.info.num_blocks, probe.num_frames
    curves = torch.stack([probe.curves[(p, t, b)] for p in range(P) for t in range(T) for b in range(L)])
    curves = curves.view(P, T, L, F - 1)
    cv = coefficient_of_variation(curves).mean(0)  # Eq. 5: [T, L]

    def table(d, ops=OPERATORS):
        return {
            op: torch.stack([d[(op, p, t, b)] for p in range(P) for t in range(T) for b in range(L)])
            .view(P, T, L, F)
            .tolist()
            for op in ops
        }

    return {
        "model": worker.describe(),
        "dims": dataclasses.asdict(worker.dims()),
        "request": req.to_dict(),
        "prompts": prompts,
        "stride": stride,
        "num_frames": F,
        "num_blocks": L,
        "steps": T,
        "seconds_per_prompt": seconds,
        "peak_memory_gib": timing.peak_memory_gib(worker.device),
        "gpu": timing.gpu_info(worker.device),
        "curves": curves.tolist(),
        "cv": cv.tolist(),
        "frame_error": table(probe.errors),
        "interp_error": table(probe.interp_errors, BLOCK_OPERATORS),
    }


def block_error(prof: dict, operator: str, dense_steps: int) -> list[float]:
    """Mean Eq. 6 error over skipped (non-anchor) frames, prompts and the sparse steps, per block."""
    err = torch.tensor(prof["frame_error"][operator])  # [P, T, L, F]
    P, T, L, F = err.shape
    s = prof["stride"]
    out = []
    for b in range(L):
        skipped = [f for f in range(F) if f not in anchor_frames(F, s, b % s)]
        out.append(err[:, : max(1, T - dense_steps), b][..., skipped].mean().item() if skipped else 0.0)
    return out
