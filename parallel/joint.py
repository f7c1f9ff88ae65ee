"""Sequence parallelism for joint attention over [video, text] (HunyuanVideo 1.5's dual-stream blocks).

The single-process attention (engine/models/hunyuan15.py: JointAttention, mask-free) hands its attention step to
SequenceJoint while sequence parallelism is attached. The text is handled as joint tokens: every rank holds the
whole text (it is tiny and replicated), appends its own 1/P slice of it to its video tokens, and diffusers'
dispatcher (Ulysses, ring, 'anything' variants) attends over [v_0, t_0, v_1, t_1, ...], every token once. Each rank
gets the attention output of its text slice back; an all-gather makes the text stream whole (and identical) on
every rank again.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn

from .layout import TokenLayout, all_gather_varlen
from .xdit import USPConfig, usp_attention


class SequenceJoint:
    """The attention step of JointAttention over the sequence-parallel ranks of `shard` (sequence.SequenceShard)."""

    def __init__(self, shard):
        self.shard = shard

    def attend(self, proc, q, k, v, tq, tk, tv, keep):
        """q, k, v: [B, N_r, H, D] this rank's video (k, v: [B, N_k, H, D], the anchors' under FIS 'kv'); tq, tk,
        tv: [B, L, H, D] the whole (valid) text; keep: [B, L] key mask or None. Returns (video [B, N_r, C], text
        [B, L, C])."""
        ctx, cp = self.shard.ctx, self.shard.cp
        n = q.shape[1]
        text = TokenLayout("frame", tq.shape[1], 1, ctx.sp_size, ctx.sp_rank)  # L x 1 token
        tq, tk, tv = (text.local(x, 1) for x in (tq, tk, tv))  # [B, L_r, H, D]
        keep = None if keep is None else text.local(keep, 1)  # [B, L_r]
        mask = None if keep is None else F.pad(keep, (k.shape[1], 0), value=True)  # [B, N_k + L_r] key mask
        if mask is not None:
            if cp.ring_degree > 1:
                raise ValueError("ring attention takes no text mask; a batch of prompts needs equal text masks")
            mask = _gather_mask(mask, ctx.sp_group)[:, None, None]  # [B, 1, 1, S]: all ranks' keys, all-to-all order
        args = (torch.cat([q, tq], 1), torch.cat([k, tk], 1), torch.cat([v, tv], 1))  # [B, N + L_r, H, D]
        if len(set(text.sizes)) > 1:
            if (cp.ring_degree > 1 and cp.ulysses_degree > 1) or isinstance(proc._parallel_config, USPConfig):
                raise ValueError(
                    f"{text.frames} text tokens do not split evenly over {len(text.sizes)} ranks, as "
                    "ring x ulysses attention and xfuser USP need; use ulysses or ring alone"
                )
            with self.shard.uneven(True):  # the text does not split evenly: diffusers' 'anything' all-to-all
                out = _attend(proc, *args, mask)
        else:
            out = _attend(proc, *args, mask)
        out = out.flatten(2, 3).to(q.dtype)  # [B, N + L_r, C]
        video, context = out[:, :n], out[:, n:]
        context = torch.cat(all_gather_varlen(context, 1, text.sizes, ctx.sp_group), 1)  # [B, L_v, C]
        return video, context


def _attend(proc, q, k, v, mask):  # [B, S, H, D]
    config = proc._parallel_config
    if isinstance(config, USPConfig):
        if mask is not None:
            raise ValueError("xfuser USP takes no attention mask; apply drop_text_padding first")
        return usp_attention(q, k, v)
    return dispatch_attention_fn(q, k, v, attn_mask=mask, backend=proc._attention_backend, parallel_config=config)


def _gather_mask(mask: torch.Tensor, group) -> torch.Tensor:
    """[B, S_r] key mask of this rank -> [B, S] of all ranks in rank order. Done here because diffusers' own
    gather of a local mask under uneven lengths assumes the shorter ranks come last (FIS anchors break that)."""
    size = torch.tensor([mask.shape[1]], device=mask.device)
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    pieces = all_gather_varlen(mask.to(torch.uint8), 1, tuple(int(s) for s in sizes), group)
    return torch.cat(pieces, 1).bool()
