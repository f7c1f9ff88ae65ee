"""Frame selection and reconstruction over a [B, F, HW, C] view (paper Eq. 7-10).

Vectorised: a reconstruction is two index_selects and one in-place lerp over all frames, no Python
loop over frames. Tables live on the device and are built once per (anchor set, device), so the
block loop never copies from the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .schedule import interp_table


@dataclass(frozen=True)
class FrameTables:
    anchors: torch.Tensor  # [A] long, frame index of each anchor
    left: torch.Tensor  # [F] long, position in the anchor list
    right: torch.Tensor  # [F] long
    weight: torch.Tensor  # [F] float32, 0 on anchor frames
    num_frames: int

    @classmethod
    def build(cls, anchors: tuple[int, ...], num_frames: int, device) -> "FrameTables":
        left, right, w = interp_table(anchors, num_frames)
        long = dict(dtype=torch.long, device=device)
        return cls(
            torch.tensor(anchors, **long),
            torch.tensor(left, **long),
            torch.tensor(right, **long),
            torch.tensor(w, dtype=torch.float32, device=device),
            num_frames,
        )


def select_frames(x: torch.Tensor, anchors: torch.Tensor, num_frames: int, dim: int = 1) -> torch.Tensor:
    """Keep the tokens of the anchor frames. `x` has F*HW tokens (frame-major) along `dim`."""
    shape = x.shape
    hw = shape[dim] // num_frames
    xf = x.reshape(*shape[:dim], num_frames, hw, *shape[dim + 1 :])  # [.., F, HW, ..]
    out = xf.index_select(dim, anchors)  # [.., A, HW, ..]
    return out.reshape(*shape[:dim], anchors.numel() * hw, *shape[dim + 1 :])


def reconstruct(y_a: torch.Tensor, t: FrameTables, x: torch.Tensor | None = None) -> torch.Tensor:
    """Rebuild all F frames from the anchor outputs.

    y_a: [B, A*HW, C] block output on the anchors.
    x:   None -> 'linear' (Eq. 10 on outputs). Otherwise the block input [B, F*HW, C] ->
         'residual': out_f = x_f + lerp(y - x) of the neighbouring anchors; anchors exact.
    returns [B, F*HW, C]
    """
    B, N_a, C = y_a.shape
    A, F = t.anchors.numel(), t.num_frames
    hw = N_a // A
    ya = y_a.view(B, A, hw, C)  # [B, A, HW, C]
    w = t.weight.to(ya.dtype).view(1, F, 1, 1)
    if x is None:
        out = ya.index_select(1, t.left)  # [B, F, HW, C]
        out.lerp_(ya.index_select(1, t.right), w)
        return out.view(B, F * hw, C)
    xf = x.view(B, F, hw, C)
    d = ya - xf.index_select(1, t.anchors)  # [B, A, HW, C] anchor updates
    out = d.index_select(1, t.left)
    out.lerp_(d.index_select(1, t.right), w)
    out += xf
    out.index_copy_(1, t.anchors, ya)  # anchors are the block's own output, bit for bit
    return out.view(B, F * hw, C)
