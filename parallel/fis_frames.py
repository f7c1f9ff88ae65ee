"""FIS under the 'frame' layout: ranks own contiguous frame ranges, so a skipped frame's neighbouring anchors may
live on another rank. Each rank runs a sparse block on the anchors it owns, the anchor updates are all-gathered
over the sequence-parallel group (ranks own increasing frame ranges, so rank order is anchor order), and each
rank rebuilds its own frames from all anchors with the same arithmetic as fis/reconstruct.py.

(The 'spatial' layout needs none of this: every rank holds every frame, and the plain FIS hook runs unchanged.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.hooks.fis import FISBlockHook, slice_frames
from fis.reconstruct import FrameTables, reconstruct, select_frames

from .layout import all_gather_varlen


@dataclass(frozen=True)
class _AnchorView:
    """One anchor set seen from one rank."""

    anchors: torch.Tensor  # [A_r] long, this rank's anchors as local frame indices
    num_frames: int  # F_r, frames this rank owns
    tables: FrameTables  # this rank's frames interpolated from ALL A anchors
    sizes: tuple[int, ...]  # anchor tokens on each rank (A_r * HW)


class FrameShardFISHook(FISBlockHook):
    def __init__(self, base: FISBlockHook, shard, views: dict):
        super().__init__(base.state, base.adapter, base.index)
        self.shard = shard
        self.views = views  # shared by the blocks of one transformer: (anchors, layout, device) -> _AnchorView

    def new_forward(self, module, *args, **kwargs):
        fwd = self.fn_ref.original_forward
        anchors = self.state.anchors(self.index)
        if anchors is None:
            return fwd(*args, **kwargs)
        hidden = self.args.get(self.adapter.hidden, args, kwargs)  # [B, F_r*HW, C]
        v = self._view(anchors, hidden.device)
        args, kwargs = list(args), dict(kwargs)
        x_a = select_frames(hidden, v.anchors, v.num_frames)  # [B, A_r*HW, C]
        self.args.set(self.adapter.hidden, x_a, args, kwargs)
        for name, rule in self.adapter.per_frame.items():
            value = self.args.get(name, args, kwargs)
            if value is not None:
                self.args.set(
                    name, slice_frames(name, value, rule, v.anchors, v.num_frames, self.state._reused), args, kwargs
                )
        with self.shard.uneven(len(set(v.sizes)) > 1):  # anchors per rank differ even when frames split evenly
            y = fwd(*args, **kwargs)
        i = self.adapter.output_index  # dual-stream blocks return (video, text): the text stream passes as is
        y, outs = (y, None) if i is None else (y[i], y)  # y: [B, A_r*HW, C]
        residual = self.state.config.operator == "residual"
        d = y - x_a if residual else y  # what gets interpolated: anchor updates (residual) or outputs (linear)
        d_all = torch.cat(all_gather_varlen(d, 1, v.sizes, self.shard.ctx.sp_group), 1)  # [B, A*HW, C]
        out = reconstruct(d_all, v.tables)  # [B, F_r*HW, C]
        if residual:
            B, _, C = out.shape
            hw = self.shard.layout.hw
            out += hidden
            y_a = y.view(B, v.anchors.numel(), hw, C)
            out.view(B, v.num_frames, hw, C).index_copy_(1, v.anchors, y_a)  # anchors are the block's own output
        return out if i is None else (*outs[:i], out, *outs[i + 1 :])

    def _view(self, anchors: tuple[int, ...], device) -> _AnchorView:
        layout = self.shard.layout
        key = (anchors, layout, str(device))
        v = self.views.get(key)
        if v is None:
            lo, hi = layout.bounds[layout.rank]
            t = self.state.tables(anchors, device)  # global tables over all F frames
            counts = [sum(a_lo <= a < a_hi for a in anchors) for a_lo, a_hi in layout.bounds]
            local = torch.tensor([a - lo for a in anchors if lo <= a < hi], dtype=torch.long, device=device)
            tables = FrameTables(t.anchors, t.left[lo:hi], t.right[lo:hi], t.weight[lo:hi], hi - lo)
            v = self.views[key] = _AnchorView(local, hi - lo, tables, tuple(c * layout.hw for c in counts))
        return v
