"""HunyuanVideo 1.5 (HunyuanVideo15Transformer3DModel; HunyuanVideo15Pipeline and its ImageToVideo pipeline):
everything the engine knows, including its mask-free joint attention.

What differs from Wan: dual-stream blocks with joint attention over [video, text] (no cross-attention), an integer
patch size plus patch_size_t, Qwen2.5-VL + ByT5 prompt embeddings with masks per branch, a `guider` object instead
of guidance_scale, and an I2V pipeline that takes the video size from the reference image.

The joint attention. diffusers' processor turns the text mask [B, L] into a boolean [B, 1, S, S] mask (S = video +
text tokens) on every block call: O(S^2) memory (1.25 GB at 480p, 81 frames, padded text) and SDPA off its flash /
cuDNN kernels. It masks padded text as keys AND as queries; the query side only changes the padded text rows, which
no valid token ever reads (they are masked keys in every block, and the model outputs the video stream). So
JointAttention leaves the padded tokens out of the attention (their rows get 0, as SDPA gives a fully masked row)
and needs no mask when the batch shares one text mask (always for B = 1); a batch of unequal prompts gets a key mask
[B, 1, 1, S], O(S). drop_text_padding also cuts the padding off each block's text stream (the model puts valid
tokens first), which saves their projections and FFN too. Under sequence parallelism parallel/joint.py supplies the
attention step (`JointAttention.sequence`).
"""

from __future__ import annotations

import functools
from functools import partial

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb

from fis import DiTDims

from .spec import AttentionSite, BlockArgs, FISAdapter, ModelFamily, SliceRule, SPPlan

TEXT_LEN = 256  # context tokens counted in joint attention by the FLOPs counter (the paper's count)
_TEXT = ("prompt_embeds", "prompt_embeds_mask", "prompt_embeds_2", "prompt_embeds_mask_2")


def _patch(config) -> tuple[int, int, int]:
    return config.patch_size_t, config.patch_size, config.patch_size  # ints, not a tuple as Wan's


# A toy-width transformer of the same structure (CPU smoke runs of the benchmark); the real size is diffusers'
# default HunyuanVideo15Transformer3DModel config (54 dual-stream blocks, 16 x 128 heads: the 8B model).
TINY = dict(
    num_attention_heads=2,
    attention_head_dim=16,
    num_layers=6,
    num_refiner_layers=1,
    text_embed_dim=32,
    text_embed_2_dim=16,
    image_embed_dim=16,
    rope_axes_dim=(4, 6, 6),
)


def preset_family(config) -> str | None:
    if "ffn_dim" in config:  # Wan names its FFN width; HunyuanVideo 1.5 has an mlp_ratio
        return None
    if config["num_layers"] == 54 and config["num_attention_heads"] * config["attention_head_dim"] == 2048:
        return "hunyuanvideo1.5-8b"
    return None


FP8_KEEP: dict[str, tuple[int, ...]] = {}  # as engine/models/wan.py: blocks --quantize fp8 leaves in bf16


def fp8_keep(config) -> tuple[int, ...]:
    return FP8_KEEP.get(preset_family(config), ())


def dims(config, vae_s: int = 16, vae_t: int = 4, text_len: int = TEXT_LEN) -> DiTDims:
    return DiTDims.from_hunyuan15_config(dict(config), vae_s=vae_s, vae_t=vae_t, text_len=text_len)


def text_len(pipe) -> int:
    return TEXT_LEN


def default_size(pipe) -> tuple[int, int]:
    """Its own 16:9 size at its resolution (848x480 for the 480p model)."""
    from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

    vae_s = getattr(pipe, "vae_scale_factor_spatial", 8)
    processor = HunyuanVideo15ImageProcessor(vae_scale_factor=vae_s)
    return tuple(processor.calculate_default_height_width(9, 16, pipe.transformer.config.target_size))


def encode_text(pipe, prompt: str, negative: str, cfg: bool, device) -> dict:
    """Qwen2.5-VL and ByT5 embeddings and masks per branch; "" is encoded as the pipeline encodes a missing
    negative prompt."""
    dtype = pipe.transformer.dtype
    kw = dict(zip(_TEXT, pipe.encode_prompt(prompt, device=device, dtype=dtype)))
    if cfg:
        negative_kw = pipe.encode_prompt(negative, device=device, dtype=dtype)
        kw.update(zip(("negative_" + n for n in _TEXT), negative_kw))
    return kw


def prepare_pipeline(pipe) -> None:
    """The I2V pipeline has no height/width: the engine fits the reference image to the requested size first
    (engine/runtime/images.py), and its image processor then keeps that size instead of snapping to the nearest of
    the model's training sizes, so a request's height/width mean the same for every model."""
    import inspect

    params = inspect.signature(type(pipe).__call__).parameters
    if "image" in params and "height" not in params:
        pipe.video_processor = image_sized(pipe.video_processor)


def image_sized(processor):
    from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

    class ImageSized(HunyuanVideo15ImageProcessor):
        def calculate_default_height_width(self, height: int, width: int, target_size: int):
            return height, width

    return ImageSized.from_config(processor.config)


# ---- joint attention without the dense mask ------------------------------------------------------------------
def _heads(attn, x, to_q, to_k, to_v, norm_q, norm_k, x_kv=None):  # [B, S, C] -> q, k, v [B, S, H, D]
    """x_kv: the tokens of the keys and values when they are not x's (FIS 'kv': the anchor frames)."""
    x_kv = x if x_kv is None else x_kv
    q, k, v = (f(y).unflatten(2, (attn.heads, -1)) for f, y in ((to_q, x), (to_k, x_kv), (to_v, x_kv)))
    return (q if norm_q is None else norm_q(q)), (k if norm_k is None else norm_k(k)), v


class JointAttention:
    """Replaces HunyuanVideo15AttnProcessor2_0 on the dual-stream blocks (same projections, norms and RoPE).
    `sequence` (parallel.joint.SequenceJoint) does the attention step while sequence parallelism is attached."""

    _attention_backend = None
    _parallel_config = None
    sequence = None

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None, keys=None
    ):
        """keys: FIS 'kv' (split_attention): the video keys and values are those of the tokens keys(x, dim) selects
        (the anchor frames); every video and text query attends to them and to the text."""
        x_kv = None if keys is None else keys(hidden_states, 1)  # [B, N_k, C]
        q, k, v = _heads(attn, hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k, x_kv)
        if image_rotary_emb is not None and q.shape[1]:  # (cos, sin), each [N, D]: this rank's video tokens
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)  # [B, N, H, D]
            rope_kv = image_rotary_emb if keys is None else tuple(keys(t, 0) for t in image_rotary_emb)
            k = apply_rotary_emb(k, rope_kv, sequence_dim=1) if k.shape[1] else k  # [B, N_k, H, D]
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
        step = self.attend if self.sequence is None else partial(self.sequence.attend, self)
        video, context = step(q, k, v, tq, tk, tv, keep)  # [B, N, C], [B, L_v, C]
        if idx is not None:  # padded rows: 0, as SDPA gives a fully masked query row
            context = context.new_zeros(B, L, context.shape[2]).index_copy_(1, idx, context)  # [B, L, C]
        return attn.to_out[1](attn.to_out[0](video)), attn.to_add_out(context)

    def attend(self, q, k, v, tq, tk, tv, keep):
        """One attention over [video, text] in one process. keep: [B, L] key mask of the text, or None."""
        n = q.shape[1]
        mask = None if keep is None else F.pad(keep, (k.shape[1], 0), value=True)[:, None, None]  # [B, 1, 1, S]: O(S)
        out = dispatch_attention_fn(
            torch.cat([q, tq], 1),
            torch.cat([k, tk], 1),
            torch.cat([v, tv], 1),
            attn_mask=mask,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        out = out.flatten(2, 3).to(q.dtype)  # [B, N + L, C]
        return out[:, :n], out[:, n:]


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


def split_attention(attn, args, kwargs, names: BlockArgs, keys):
    """FIS 'kv' on a dual-stream block's joint attention: JointAttention with the video keys and values of the tokens
    keys(x, dim) selects. The block's own processor when it is one (sequence parallelism and drop_text_padding
    install it), else a JointAttention on the processor's backend for this call (one process)."""
    proc = attn.processor
    if not isinstance(proc, JointAttention):
        backend, proc = proc._attention_backend, JointAttention()
        proc._attention_backend = backend
    get = functools.partial(names.get, args=args, kwargs=kwargs)
    return proc(
        attn,
        get("hidden_states"),
        get("encoder_hidden_states"),
        get("attention_mask"),
        get("image_rotary_emb"),
        keys=keys,
    )


# Only the video stream is sliced; the text stream and its mask ([B, L_text]) pass whole, and the block's updated
# text stream is used as is.
ADAPTER = FISAdapter(
    name="hunyuanvideo1.5",
    blocks_attr="transformer_blocks",
    hidden="hidden_states",
    per_frame={"freqs_cis": SliceRule(dim=0, reuse=True)},  # (cos, sin), each [N, D]
    output_index=0,  # returns (hidden_states, encoder_hidden_states)
    patch=_patch,
    attention=AttentionSite(
        module="attn",  # called as attn(hidden_states=, encoder_hidden_states=, attention_mask=, image_rotary_emb=)
        per_frame={"image_rotary_emb": SliceRule(dim=0, reuse=True)},
        output_index=0,  # (video, text): the text stream attends to the anchors, as with the block-scope operators
        split=split_attention,
    ),
)


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
    when the batch's samples have different lengths: then a key mask [B, 1, 1, S] remains). The output equals
    diffusers' up to float rounding; one attention call went from 76.6 to 22.6 ms (docs/benchmarks.md).
    Returns the undo."""
    _, undo_joint = install_joint_attention(transformer)
    blocks, seen = transformer.transformer_blocks, {}
    names = BlockArgs(blocks[0])
    handles = [b.register_forward_pre_hook(partial(_trim, names=names, seen=seen), with_kwargs=True) for b in blocks]

    def undo():
        for h in handles:
            h.remove()
        undo_joint()

    return undo


# x_embedder.proj is the Conv3d; x_embedder's own flatten(2).transpose(1, 2) then gives [B, N_r, C]
SP_PLAN = SPPlan(
    embed="x_embedder.proj", rope="rope", out="proj_out", rope_dim=0, joint_attention=install_joint_attention
)

HUNYUAN_VIDEO_15 = ModelFamily(
    name="hunyuanvideo1.5",
    transformer_class="HunyuanVideo15Transformer3DModel",
    adapter=ADAPTER,
    sp_plan=SP_PLAN,
    preset_family=preset_family,
    dims=dims,
    default_size=default_size,
    encode_text=encode_text,
    text_len=text_len,
    prepare_pipeline=prepare_pipeline,
    optimise=drop_text_padding,
    fp8_keep=fp8_keep,
    fps=24,
)
