"""Anchor schedule and gates (paper Eq. 11-14), resolved for one model and one request.

Pure Python: the interpolation tables are lists here; reconstruct.py turns them into tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # config.py imports this module (lazily): no cycle at run time
    from .config import FISConfig


@lru_cache(maxsize=1024)  # asked once per sparse block call: keep the block loop free of set building
def anchor_frames(num_frames: int, stride: int, offset: int) -> tuple[int, ...]:
    """Eq. 12: frames f with f = offset (mod s), plus the first and last frame (always anchors)."""
    if num_frames <= 0:
        return ()
    picked = set(range(offset % stride, num_frames, stride)) | {0, num_frames - 1}
    return tuple(sorted(picked))


def interp_table(anchors: tuple[int, ...], num_frames: int):
    """For every frame f: (left, right, weight) with left/right positions *in the anchor list*.

    Eq. 10: y_f = (1 - w) y_left + w y_right, w = (f - a_l) / (a_r - a_l). Anchor frames get
    left == right and w = 0, so they are copied exactly.
    """
    left, right, weight = [], [], []
    j = 0
    for f in range(num_frames):
        while j + 1 < len(anchors) and anchors[j + 1] <= f:
            j += 1
        if anchors[j] == f or j + 1 == len(anchors):
            left.append(j), right.append(j), weight.append(0.0)
        else:
            a_l, a_r = anchors[j], anchors[j + 1]
            left.append(j), right.append(j + 1), weight.append((f - a_l) / (a_r - a_l))
    return left, right, weight


@dataclass(frozen=True)
class FISPlan:
    """A config checked against (num_blocks, latent frames, steps); answers the two gates.

    block gate (Eq. 13): sparse only for blocks in `sparse_blocks`.
    step gate  (Eq. 14): sparse only for step < num_steps - dense_steps.
    """

    config: FISConfig
    sparse_blocks: tuple[int, ...]
    num_frames: int
    num_steps: int

    @cached_property
    def _rank(self) -> dict[int, int]:
        return {b: i for i, b in enumerate(self.sparse_blocks)}

    def step_is_sparse(self, step: int) -> bool:
        return step < self.num_steps - self.config.dense_steps

    def offset(self, block: int) -> int:
        """Eq. 11: (l - l0) mod s, counted over the sparse set so that gaps in an explicit block
        list keep the coverage property; identical to Eq. 11 for a contiguous range."""
        if not self.config.interleave:
            return 0
        return self._rank[block] % self.config.stride

    def anchors(self, block: int, step: int | None = None) -> tuple[int, ...] | None:
        """Anchor frames of `block` at `step`, or None when the block runs dense."""
        if block not in self._rank or (step is not None and not self.step_is_sparse(step)):
            return None
        a = anchor_frames(self.num_frames, self.config.stride, self.offset(block))
        return None if len(a) == self.num_frames else a

    def anchor_counts(self, step: int) -> list[int | None]:
        """Per block (in block order up to the last sparse block): anchor count or None (dense)."""
        n = max(self.sparse_blocks, default=-1) + 1
        return [None if (a := self.anchors(b, step)) is None else len(a) for b in range(n)]
