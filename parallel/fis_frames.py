"""FIS under the 'frame' layout: ranks own contiguous frame ranges, so a skipped frame's neighbouring anchors may
live on another rank. Each rank runs a sparse block on the anchors it owns, the anchor updates are all-gathered
over the sequence-parallel group (ranks own increasing frame ranges, so rank order is anchor order), and each
rank rebuilds its own frames from all anchors with the same arithmetic as fis/reconstruct.py.

(The 'spatial' layout needs none of this: every rank holds every frame, and the plain FIS hook runs unchanged.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.hooks.fis import FISBlockHook, sparse_forward
from fis.reconstruct import FrameTables, add_updates, reconstruct

from .layout import all_gather_varlen


@dataclass(frozen=True)
class _AnchorView:
    """One anchor set seen from one rank."""

    anchors: torch.Tensor  # [A_r] long, this rank's anchors as local frame indices
    num_frames: int  # F_r, frames this rank owns
    tables: FrameTables  # this rank's frames interpolated from ALL A anchors
    sizes: tuple[int, ...]  # anchor tokens on each rank (A_r * HW)


class FrameShardFISHook(FISBlockHook):
    """The FIS block hook under the frame layout: the block runs on the anchors this rank owns (sparse_forward, as
    in one process); the rebuild all-gathers what gets interpolated (anchor updates y - x for 'residual', anchor
    outputs for 'linear') over the sequence-parallel group and interpolates this rank's frames from all anchors
    (fis/reconstruct.py). Swapped in for FISBlockHook by parallel/sequence.py, and back on undo."""

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
        uneven = len(set(v.sizes)) > 1  # anchors per rank differ even when frames split evenly

        def run(*a, **kw):
            with self.shard.uneven(uneven):
                return fwd(*a, **kw)

        residual = self.state.config.operator == "residual"

        def rebuild(y, x_a, x):  # y, x_a: [B, A_r*HW, C]; x: [B, F_r*HW, C]
            d = y - x_a if residual else y  # what gets interpolated
            d_all = torch.cat(all_gather_varlen(d, 1, v.sizes, self.shard.ctx.sp_group), 1)  # [B, A*HW, C]
            out = reconstruct(d_all, v.tables)  # [B, F_r*HW, C]
            return add_updates(out, x, y, v.anchors) if residual else out

        return sparse_forward(
            run, args, kwargs, self.args, self.adapter, v.anchors, v.num_frames, rebuild, self.state.reused
        )

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
