"""Which video tokens each sequence-parallel rank holds, and how to put them back together.

Tokens are frame-major: F latent frames of HW tokens each. Both layouts keep every rank's tokens frame-major with
the same count per frame, which is what the FIS block hook needs (it derives HW = N // F):
  spatial  rank r holds a slice [lo_r, hi_r) of the HW tokens of EVERY frame   -> [F, HW_r]
  frame    rank r holds whole frames [lo_r, hi_r)                               -> [F_r, HW]
Sizes that do not divide evenly are split like torch.tensor_split (the first ranks get one more); diffusers'
"anything" attention handles the unequal lengths (sequence.py switches it on).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.distributed as dist
import torch.nn.functional as F

MODES = ("spatial", "frame")


@dataclass(frozen=True)
class TokenLayout:
    mode: str
    frames: int  # F, latent frames after patching
    hw: int  # tokens per frame
    parts: int  # sequence-parallel degree
    rank: int  # this rank's index in the sequence-parallel group

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"shard must be one of {', '.join(MODES)}, got {self.mode!r}")

    @cached_property
    def bounds(self) -> tuple[tuple[int, int], ...]:
        """Per rank, [lo, hi) along the split axis (frames or per-frame tokens)."""
        length = self.frames if self.mode == "frame" else self.hw
        q, extra = divmod(length, self.parts)
        out, lo = [], 0
        for r in range(self.parts):
            hi = lo + q + (r < extra)
            out.append((lo, hi))
            lo = hi
        return tuple(out)

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        """Tokens held by each rank."""
        other = self.hw if self.mode == "frame" else self.frames
        return tuple((hi - lo) * other for lo, hi in self.bounds)

    @property
    def even(self) -> bool:
        return len(set(self.sizes)) == 1

    def local(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's tokens of `x`, which holds all F*HW tokens along `dim`."""
        lo, hi = self.bounds[self.rank]
        v = x.unflatten(dim, (self.frames, self.hw))  # [.., F, HW, ..]
        v = v.narrow(dim if self.mode == "frame" else dim + 1, lo, hi - lo)
        return v.flatten(dim, dim + 1).contiguous()

    def assemble(self, pieces: list[torch.Tensor], dim: int) -> torch.Tensor:
        """Inverse of `local`: every rank's piece (rank order) -> all F*HW tokens along `dim`."""
        if self.mode == "frame":
            return torch.cat(pieces, dim)
        views = [p.unflatten(dim, (self.frames, hi - lo)) for p, (lo, hi) in zip(pieces, self.bounds)]
        return torch.cat(views, dim + 1).flatten(dim, dim + 1)  # [.., F, HW, ..] -> [.., F*HW, ..]


def all_gather_varlen(x: torch.Tensor, dim: int, sizes: tuple[int, ...], group) -> list[torch.Tensor]:
    """Every rank's `x` (sizes[r] long along `dim`), in rank order. Pads to the longest so that gloo and nccl,
    which gather equal shapes, both work; sizes are known to every rank, so no size exchange is needed."""
    longest = max(sizes)
    pad = longest - x.shape[dim]
    if pad:
        x = F.pad(x, (0, 0) * (x.ndim - 1 - dim) + (0, pad))
    x = x.contiguous()
    bufs = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(bufs, x, group=group)
    return [b.narrow(dim, 0, s) for b, s in zip(bufs, sizes)]
