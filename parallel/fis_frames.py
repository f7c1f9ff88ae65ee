"""FIS under the 'frame' layout: ranks own contiguous frame ranges, so a skipped frame's neighbouring anchors may
live on another rank. Each rank runs a sparse block on the anchors it owns, what gets interpolated (anchor updates,
outputs, or attention outputs) is all-gathered over the sequence-parallel group (ranks own increasing frame ranges,
so rank order is anchor order), and each rank rebuilds its own frames from all anchors with the same arithmetic as
fis/reconstruct.py. Under 'kv' every rank's queries attend to the anchors of all ranks: the Ulysses all-to-all
gathers the anchors' keys and values like any sequence, in its 'anything' variant (anchor counts differ per rank).

(The 'spatial' layout needs none of this: every rank holds every frame, and the plain FIS hook runs unchanged.)
"""

from __future__ import annotations

import torch

from engine.hooks.fis import FISBlockHook, SparseView
from fis.reconstruct import FrameTables

from .layout import all_gather_varlen


class FrameShardFISHook(FISBlockHook):
    """The FIS block hook under the frame layout: the same operators (engine/hooks/fis.py run_operator) on the view
    of this rank: the anchors it owns, tables from ALL anchors to its frames, a gather of every rank's anchors and
    the all-to-all's uneven switch. Swapped in for FISBlockHook by parallel/sequence.py, and back on undo."""

    def __init__(self, base: FISBlockHook, shard, views: dict):
        super().__init__(base.state, base.adapter, base.index)
        self.shard = shard
        self.views = views  # shared by the blocks of one transformer: (anchors, layout, device) -> SparseView

    def view(self, anchors: tuple[int, ...], device) -> SparseView:
        layout = self.shard.layout
        key = (anchors, layout, str(device))
        v = self.views.get(key)
        if v is None:
            lo, hi = layout.bounds[layout.rank]
            t = self.state.tables(anchors, device)  # global tables over all F frames
            counts = [sum(a_lo <= a < a_hi for a in anchors) for a_lo, a_hi in layout.bounds]
            local = torch.tensor([a - lo for a in anchors if lo <= a < hi], dtype=torch.long, device=device)
            tables = FrameTables(t.anchors, t.left[lo:hi], t.right[lo:hi], t.weight[lo:hi], hi - lo)
            sizes = tuple(c * layout.hw for c in counts)  # anchor tokens on each rank
            shard, group = self.shard, self.shard.ctx.sp_group
            anchors_uneven = len(set(sizes)) > 1  # anchors per rank differ even when frames split evenly

            def gather(x):  # [B, A_r*HW, C] -> [B, A*HW, C]
                return torch.cat(all_gather_varlen(x, 1, sizes, group), 1)

            def around(all_queries: bool):  # all_queries: every local frame queries ('kv'), not only the anchors
                return shard.uneven(anchors_uneven or (all_queries and not layout.even))

            v = self.views[key] = SparseView(local, hi - lo, tables, gather, around)
        return v
