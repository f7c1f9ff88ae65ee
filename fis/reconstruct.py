"""Frame selection and reconstruction over a [B, F, HW, C] view (paper Eq. 7-10).

Vectorised: a reconstruction is two index_selects and one in-place lerp over all frames, no Python
loop over frames. Tables live on the device and are built once per (anchor set, device), so the
block loop never copies from the host.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from functools import cached_property

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
    def build(cls, anchors: tuple[int, ...], num_frames: int, device) -> FrameTables:
        left, right, w = interp_table(anchors, num_frames)
        long = dict(dtype=torch.long, device=device)
        return cls(
            torch.tensor(anchors, **long),
            torch.tensor(left, **long),
            torch.tensor(right, **long),
            torch.tensor(w, dtype=torch.float32, device=device),
            num_frames,
        )

    # derived once per table (tables are cached per anchor set), never per block call
    @cached_property
    def is_anchor(self) -> torch.Tensor:  # [F] bool
        return self.left.eq(self.right) & self.weight.eq(0)

    @cached_property
    def a_left(self) -> torch.Tensor:  # [F] frame index of the left anchor
        return self.anchors[self.left]

    @cached_property
    def a_right(self) -> torch.Tensor:
        return self.anchors[self.right]


def select_frames(x: torch.Tensor, anchors: torch.Tensor, num_frames: int, dim: int = 1) -> torch.Tensor:
    """Keep the tokens of the anchor frames. `x` has F*HW tokens (frame-major) along `dim`."""
    shape = x.shape
    hw = shape[dim] // num_frames
    xf = x.reshape(*shape[:dim], num_frames, hw, *shape[dim + 1 :])  # [.., F, HW, ..]
    out = xf.index_select(dim, anchors)  # [.., A, HW, ..]
    return out.reshape(*shape[:dim], anchors.numel() * hw, *shape[dim + 1 :])


def reconstruct(y_a: torch.Tensor, t: FrameTables, x: torch.Tensor | None = None) -> torch.Tensor:
    """See reconstruct_eager. On CUDA the same arithmetic runs as one fused kernel (torch.compile of
    `fused_reconstruct`): the eager form makes ~13 passes over a hidden-state-sized tensor, the fused
    one reads x once and writes the output once."""
    if y_a.is_cuda and _FUSED["on"]:
        try:
            return _fused_call(y_a, t, x)
        except Exception as e:  # no triton, an inductor bug: FIS must still run
            _FUSED["on"] = False
            warnings.warn(
                f"fused FIS reconstruction unavailable ({type(e).__name__}: {e}); using eager ops", stacklevel=2
            )
    return reconstruct_eager(y_a, t, x)


def fused_reconstruct(ya, x, left, right, a_left, a_right, w, is_anchor):
    """All frames at once, one pointwise pass with indirect loads (what inductor fuses).

    ya [B, A, HW, C] anchor outputs; x [B, F, HW, C] block input or None (linear); left/right [F]
    positions in the anchor list, a_left/a_right [F] their frame indices; w [F]; is_anchor [F].
    """
    w = w.view(1, -1, 1, 1)
    lo, hi = ya.index_select(1, left), ya.index_select(1, right)  # [B, F, HW, C]
    if x is None:
        return torch.lerp(lo.float(), hi.float(), w).to(ya.dtype)
    d_lo = lo.float() - x.index_select(1, a_left).float()  # anchor updates y - x
    d_hi = hi.float() - x.index_select(1, a_right).float()
    out = x.float() + torch.lerp(d_lo, d_hi, w)
    return torch.where(is_anchor.view(1, -1, 1, 1), lo, out.to(ya.dtype))  # anchors bit for bit


_FUSED = {"on": os.environ.get("FIS_FUSED_GLUE", "1") != "0", "fn": None}


def set_fused(on: bool) -> bool:
    """The fused CUDA reconstruction on or off for this process (FIS_FUSED_GLUE=0 at start-up: off); returns the
    previous setting. A sweep over many token counts turns it off: each count would compile its own kernel."""
    before, _FUSED["on"] = _FUSED["on"], bool(on)
    return before


def _fused_call(y_a, t: FrameTables, x):
    if _FUSED["fn"] is None:
        _FUSED["fn"] = torch.compile(fused_reconstruct, dynamic=False, fullgraph=True)
    B, N_a, C = y_a.shape
    A, F = t.anchors.numel(), t.num_frames
    hw = N_a // A
    xf = None if x is None else x.view(B, F, hw, C)
    out = _FUSED["fn"](y_a.view(B, A, hw, C), xf, t.left, t.right, t.a_left, t.a_right, t.weight, t.is_anchor)
    return out.view(B, F * hw, C)


def reconstruct_eager(y_a: torch.Tensor, t: FrameTables, x: torch.Tensor | None = None) -> torch.Tensor:
    """Rebuild all F frames from the anchor outputs (the reference the fused kernel is tested against).

    y_a: [B, A*HW, C] block output on the anchors.
    x:   None -> 'linear' (Eq. 10 on outputs). Otherwise the block input [B, F*HW, C] ->
         'residual': out_f = x_f + lerp(y - x) of the neighbouring anchors; anchors exact.
    returns [B, F*HW, C]
    """
    if x is None:
        return interpolate(y_a, t)
    d = y_a - select_frames(x, t.anchors, t.num_frames)  # [B, A*HW, C] anchor updates
    return add_updates(interpolate(d, t), x, y_a, t.anchors)


def interpolate(v_a: torch.Tensor, t: FrameTables) -> torch.Tensor:
    """Eq. 10 on any per-anchor values: [B, A*HW, C] -> [B, F*HW, C]; anchor frames get their own value."""
    B, N_a, C = v_a.shape
    A, F = t.anchors.numel(), t.num_frames
    hw = N_a // A
    va = v_a.view(B, A, hw, C)  # [B, A, HW, C]
    w = t.weight.to(va.dtype).view(1, F, 1, 1)
    out = va.index_select(1, t.left)  # [B, F, HW, C]
    out.lerp_(va.index_select(1, t.right), w)
    return out.view(B, F * hw, C)


def add_updates(d: torch.Tensor, x: torch.Tensor, y_own: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """The residual operator's last step: interpolated anchor updates d [B, F*HW, C] (in place) + the block input
    x [B, F*HW, C], with the anchor frames `own` ([A] long, frame indices) set to the block's own output y_own
    [B, A*HW, C] bit for bit. Under the frame layout the updates come from every rank, `own` only from this one."""
    B, N, C = x.shape
    d += x
    if own.numel():  # a frame-layout rank may own no anchor of this block
        hw = y_own.shape[1] // own.numel()
        d.view(B, N // hw, hw, C).index_copy_(1, own, y_own.view(B, own.numel(), hw, C))
    return d
