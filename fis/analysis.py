"""The paper's measurements (§3.2, Eq. 1-6) and a calibrated block map built from them.

All functions take tokens in frame-major order, [B, F*HW, C], and reduce in float32.
"""

from __future__ import annotations

import torch

from .config import FISConfig


def magnitude_map(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Eq. 1: the L2 norm over channels of each spatial token. [B, F*HW, C] -> [B, F, HW]."""
    B, N, C = x.shape
    return x.float().view(B, num_frames, N // num_frames, C).norm(dim=-1)


def relative_change_parts(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared sums behind Eq. 2-3, additive over spatial shards: (||m_{f+1} - m_f||^2, ||m_f||^2)."""
    return (m[..., 1:, :] - m[..., :-1, :]).pow(2).sum(-1), m[..., :-1, :].pow(2).sum(-1)


def relative_change(m: torch.Tensor, parts=None) -> torch.Tensor:
    """Eq. 2-3: ||m_{f+1} - m_f|| / ||m_f|| over the spatial map. [..., F, HW] -> [..., F-1].
    `parts`: the (summed) relative_change_parts when the map is spread over several ranks."""
    d2, n2 = relative_change_parts(m) if parts is None else parts
    return d2.sqrt() / n2.sqrt().clamp_min(1e-12)


def coefficient_of_variation(r: torch.Tensor) -> torch.Tensor:
    """Eq. 4: flatness of a relative-change curve, std / mean over frames. [..., F-1] -> [...].
    Eq. 5 is the mean of this over prompts (the caller averages)."""
    return r.std(dim=-1, unbiased=False) / r.mean(dim=-1).clamp_min(1e-12)


def per_frame_error_parts(y_sparse: torch.Tensor, y_full: torch.Tensor, num_frames: int):
    """Squared sums behind Eq. 6, additive over shards: (||y~_f - y_f||^2, ||y_f||^2), each [F]."""
    B, N, C = y_full.shape
    full = y_full.float().view(B, num_frames, -1, C).transpose(0, 1).reshape(num_frames, -1)
    diff = y_sparse.float().view(B, num_frames, -1, C).transpose(0, 1).reshape(num_frames, -1) - full
    return diff.pow(2).sum(-1), full.pow(2).sum(-1)


def per_frame_error(y_sparse: torch.Tensor, y_full: torch.Tensor, num_frames: int, parts=None) -> torch.Tensor:
    """Eq. 6: ||y~_f - y_f|| / ||y_f|| per frame, over batch, tokens and channels. -> [F]."""
    e2, n2 = per_frame_error_parts(y_sparse, y_full, num_frames) if parts is None else parts
    return e2.sqrt() / n2.sqrt().clamp_min(1e-12)


def calibrate(
    block_error: list[float], budget: float, base: FISConfig, min_dense_head: int = 1, min_dense_tail: int = 1
) -> FISConfig:
    """Pick the sparse block set: every block whose measured interpolation error (Eq. 6 on skipped
    frames, averaged over prompts and sparse steps) is within `budget`, keeping at least
    `min_dense_head` / `min_dense_tail` protected blocks. Returns `base` with that explicit set."""
    L = len(block_error)
    ok = [b for b in range(min_dense_head, L - min_dense_tail) if block_error[b] <= budget]
    if not ok:
        raise ValueError(f"no block meets the error budget {budget:g} (smallest error {min(block_error):.4g})")
    head, tail = ok[0], L - 1 - ok[-1]
    return base.replace(dense_head=head, dense_tail=tail, blocks=tuple(ok), name="calibrated")
