"""HunyuanVideo 1.5's joint attention over [video, text] without diffusers' dense mask, single- or multi-process.

diffusers' processor turns the text mask [B, L] into a boolean [B, 1, S, S] mask (S = video + text tokens) on
every block call: O(S^2) memory (1.25 GB at 480p, 81 frames, padded text) and SDPA off its flash / cuDNN kernels.
It masks padded text as keys AND as queries; the query side only changes the padded text rows, which no valid
token ever reads (they are masked keys in every block, and the model outputs the video stream). So JointAttention
leaves the padded tokens out of the attention (their rows get 0, as SDPA gives a fully masked row) and needs no
mask when the batch shares one text mask (always for B = 1); a batch of unequal prompts gets a key mask
[B, 1, 1, S], O(S). drop_text_padding also cuts the padding off each block's text stream (the model puts valid
tokens first), which saves their projections and FFN too.

Under sequence parallelism the text is handled as joint tokens: every rank holds the whole text (it is tiny and
replicated), appends its own 1/P slice of it to its video tokens, and diffusers' dispatcher (Ulysses, ring,
'anything' variants) attends over [v_0, t_0, v_1, t_1, ...], every token once. Each rank gets the attention
output of its text slice back; an all-gather makes the text stream whole (and identical) on every rank again.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb

from engine.hooks.fis import BlockArgs

from .layout import TokenLayout, all_gather_varlen


def _heads(attn, x, to_q, to_k, to_v, norm_q, norm_k):  # [B, S, C] -> q, k, v [B, S, H, D]
    q, k, v = (f(x).unflatten(2, (attn.heads, -1)) for f in (to_q, to_k, to_v))
    return (q if norm_q is None else norm_q(q)), (k if norm_k is None else norm_k(k)), v


class JointAttention:
    """Replaces HunyuanVideo15AttnProcessor2_0 on the dual-stream blocks (same projections, norms and RoPE).
    `shard` (sequence.SequenceShard) is set while sequence parallelism is attached."""

    _attention_backend = None
    _parallel_config = None
    shard = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        q, k, v = _heads(attn, hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)  # [B, N, H, D]
        if image_rotary_emb is not None and q.shape[1]:  # (cos, sin), each [N, D]: this rank's video tokens
            q, k = (apply_rotary_emb(x, image_rotary_emb, sequence_dim=1) for x in (q, k))
        tq, tk, tv = _heads(
            attn,
            encoder_hidden_states,
            attn.add_q_proj,
            attn.add_k_proj,
            attn.add_v_proj,
            attn.norm_added_q,
            attn.norm_added_k,
        )  # [B, L, H, D]
        B, L = tq.shape[:2]
        keep, idx = None if attention_mask is None else attention_mask.bool(), None  # [B, L] valid text tokens
        if keep is not None and bool((keep == keep[:1]).all()):  # one mask for the batch (B = 1): no mask needed,
            idx = None if keep[0].all() else keep[0].nonzero().squeeze(1)  # only its valid tokens join  [L_v]
            tq, tk, tv = (x if idx is None else x[:, idx] for x in (tq, tk, tv))  # [B, L_v, H, D]
            keep = None
        n, sp = q.shape[1], self.shard is not None and self._parallel_config is not None
        if sp:
            text = TokenLayout("frame", tq.shape[1], 1, self.shard.ctx.sp_size, self.shard.ctx.sp_rank)  # L x 1 token
            tq, tk, tv = (text.local(x, 1) for x in (tq, tk, tv))  # [B, L_r, H, D]
            keep = None if keep is None else text.local(keep, 1)  # [B, L_r]
        mask = None if keep is None else F.pad(keep, (n, 0), value=True)  # [B, N + L_r] key mask
        if sp and mask is not None:
            if self.shard.cp.ring_degree > 1:
                raise ValueError("ring attention takes no text mask; a batch of prompts needs equal text masks")
            mask = _gather_mask(mask, self.shard.ctx.sp_group)  # [B, S]: all ranks' keys, in all-to-all order
        mask = None if mask is None else mask[:, None, None]  # [B, 1, 1, S]: O(S), not O(S^2)
        args = (torch.cat([q, tq], 1), torch.cat([k, tk], 1), torch.cat([v, tv], 1))  # [B, N + L_r, H, D]
        if sp and len(set(text.sizes)) > 1:
            cp = self.shard.cp
            if (cp.ring_degree > 1 and cp.ulysses_degree > 1) or not hasattr(
                self._parallel_config, "context_parallel_config"
            ):
                raise ValueError(
                    f"{text.frames} text tokens do not split evenly over {len(text.sizes)} ranks, as "
                    "ring x ulysses attention and xfuser USP need; use ulysses or ring alone"
                )
            with self.shard.uneven(True):  # the text does not split evenly: diffusers' 'anything' all-to-all
                out = self._attend(*args, mask)
        else:
            out = self._attend(*args, mask)
        out = out.flatten(2, 3).to(q.dtype)  # [B, N + L_r, C]
        video, context = out[:, :n], out[:, n:]
        if sp:
            context = torch.cat(all_gather_varlen(context, 1, text.sizes, self.shard.ctx.sp_group), 1)  # [B, L_v, C]
        if idx is not None:  # padded rows: 0, as SDPA gives a fully masked query row
            context = context.new_zeros(B, L, context.shape[2]).index_copy_(1, idx, context)  # [B, L, C]
        return attn.to_out[1](attn.to_out[0](video)), attn.to_add_out(context)

    def _attend(self, q, k, v, mask):  # [B, S, H, D]
        config = self._parallel_config
        if config is not None and not hasattr(config, "context_parallel_config"):  # xdit.USPConfig
            if mask is not None:
                raise ValueError("xfuser USP takes no attention mask; apply drop_text_padding first")
            from .xdit import _dispatch

            return _dispatch(q, k, v, parallel_config=config)
        return dispatch_attention_fn(q, k, v, attn_mask=mask, backend=self._attention_backend, parallel_config=config)


def _gather_mask(mask: torch.Tensor, group) -> torch.Tensor:
    """[B, S_r] key mask of this rank -> [B, S] of all ranks in rank order. Done here because diffusers' own
    gather of a local mask under uneven lengths assumes the shorter ranks come last (FIS anchors break that)."""
    size = torch.tensor([mask.shape[1]], device=mask.device)
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    pieces = all_gather_varlen(mask.to(torch.uint8), 1, tuple(int(s) for s in sizes), group)
    return torch.cat(pieces, 1).bool()


def install_joint_attention(transformer):
    """JointAttention on every dual-stream block, shared by its users (sequence parallelism, drop_text_padding):
    the first swaps it in (keeping the processor's backend), the last undo puts diffusers' back, in any order.
    Returns (processors, undo)."""
    attns = [block.attn for block in transformer.transformer_blocks]
    for attn in attns:
        if getattr(attn, "_joint_users", 0) == 0:
            attn._joint_saved = attn.processor
            attn.set_processor(JointAttention())
            attn.processor._attention_backend = attn._joint_saved._attention_backend
        attn._joint_users = getattr(attn, "_joint_users", 0) + 1

    def undo():
        for attn in attns:
            attn._joint_users -= 1
            if attn._joint_users == 0:
                attn._joint_saved._attention_backend = attn.processor._attention_backend
                attn.set_processor(attn._joint_saved)
                del attn._joint_saved, attn._joint_users

    return [a.processor for a in attns], undo


def _trim(block, args, kwargs, names, seen):
    """Forward pre-hook of one dual-stream block: keep only the text tokens some sample needs; no mask when none
    of those is padding. A torch hook, not a diffusers one, so it comes off in any order with FIS and SP."""
    mask = names.get("attention_mask", args, kwargs)  # [B, L]
    if mask is None:
        return None
    if seen.get("mask") is not mask:  # the model passes the same mask to every block of a forward
        valid = mask.bool()
        kept = int(valid.sum(1).max())
        if not bool((valid[:, 1:] <= valid[:, :-1]).all()):  # valid tokens first, as the model orders them
            kept = valid.shape[1]
        seen.update(mask=mask, kept=kept, new=None if valid[:, :kept].all() else mask[:, :kept])
    args = list(args)
    text = names.get("encoder_hidden_states", args, kwargs)  # [B, L', C]; L' = kept after the first block
    names.set("encoder_hidden_states", text[:, : seen["kept"]], args, kwargs)
    names.set("attention_mask", seen["new"], args, kwargs)
    return tuple(args), kwargs


def drop_text_padding(transformer):
    """HunyuanVideo 1.5 without the dense attention mask: every block sees only valid text tokens (all of them
    when the batch's samples have different lengths: then a key mask [B, 1, 1, S] remains). Returns the undo."""
    _, undo_joint = install_joint_attention(transformer)
    blocks, seen = transformer.transformer_blocks, {}
    names = BlockArgs(blocks[0])
    handles = [b.register_forward_pre_hook(partial(_trim, names=names, seen=seen), with_kwargs=True) for b in blocks]

    def undo():
        for h in handles:
            h.remove()
        undo_joint()

    return undo
