"""Wan 2.1 / 2.2 (WanTransformer3DModel, WanPipeline, WanImageToVideoPipeline): everything the engine knows.

T2V 1.3B / 14B, 2.2 A14B (two experts, one FIS state), TI2V-5B (a timestep per token), I2V (CLIP image context in
cross-attention). The embedded model is this architecture too.
"""

from __future__ import annotations

import diffusers.models.transformers.transformer_wan as diffusers_wan
import torch

from fis import DiTDims

from .spec import AttentionSite, BlockArgs, FISAdapter, ModelFamily, SliceRule, SPPlan

RESOLUTIONS = {"480p": (480, 832), "720p": (720, 1280)}  # (height, width), Wan's sizes
TEXT_LEN = 512  # umT5 tokens the pipelines pad to


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """WanAttnProcessor's rotary embedding (interleaved pairs): x [B, N, H, D], cos/sin [1, N, 1, D]."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out.type_as(x)


def split_attention(attn, args, kwargs, names: BlockArgs, keys):
    """WanAttnProcessor's self-attention (attn1: no context, no image keys) with the keys and values of the tokens
    keys(x, dim) selects: Q and the output projection on every token, K and V on the selected ones only, then
    diffusers' dispatcher (the processor's backend and, under sequence parallelism, its all-to-all), so every query
    attends to the selected tokens. The same operations in the same order as the processor: with keys the identity
    its output bit for bit (tests/test_operators.py)."""
    x = names.get("hidden_states", args, kwargs)  # [B, N, C]
    rotary = names.get("rotary_emb", args, kwargs)  # (cos, sin), each [1, N, 1, D]
    if names.get("encoder_hidden_states", args, kwargs) is not None or getattr(attn, "fused_projections", False):
        raise ValueError("FIS operator 'kv' needs Wan's self-attention with unfused projections")
    x_kv = keys(x, 1)  # [B, N_k, C]
    q = attn.norm_q(attn.to_q(x)).unflatten(2, (attn.heads, -1))  # [B, N, H, D]
    k = attn.norm_k(attn.to_k(x_kv)).unflatten(2, (attn.heads, -1))  # [B, N_k, H, D]
    v = attn.to_v(x_kv).unflatten(2, (attn.heads, -1))
    if rotary is not None:
        q, k = _rope(q, *rotary), _rope(k, *(keys(t, 1) for t in rotary))
    proc = attn.processor
    out = diffusers_wan.dispatch_attention_fn(  # looked up where the processor looks it up (parallel/xdit.py swaps it)
        q,
        k,
        v,
        attn_mask=names.get("attention_mask", args, kwargs),
        dropout_p=0.0,
        is_causal=False,
        backend=proc._attention_backend,
        parallel_config=proc._parallel_config,
    )
    out = out.flatten(2, 3).type_as(q)  # [B, N, C]
    return attn.to_out[1](attn.to_out[0](out))


ADAPTER = FISAdapter(
    name="wan",
    blocks_attr="blocks",
    hidden="hidden_states",
    per_frame={
        "rotary_emb": SliceRule(dim=1, reuse=True),  # (cos, sin), each [1, N, 1, D]
        "temb": SliceRule(dim=1, ndim=4),  # Wan 2.2 TI2V per-token timesteps [B, N, 6, C]
    },
    attention=AttentionSite(
        module="attn1",  # WanAttention, called as attn1(norm_hidden_states, None, None, rotary_emb)
        per_frame={"rotary_emb": SliceRule(dim=1, reuse=True)},
        split=split_attention,
    ),
)

SP_PLAN = SPPlan(embed="patch_embedding", rope="rope", out="proj_out", per_token_inputs=("timestep",))

# Real-size transformer configs (diffusers' WanTransformer3DModel arguments), for random-weight speed runs
# (engine/models/random.py) and the preset families below.
_COMMON = dict(
    patch_size=(1, 2, 2),
    attention_head_dim=128,
    text_dim=4096,
    freq_dim=256,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
A14B = dict(_COMMON, num_attention_heads=40, in_channels=16, out_channels=16, ffn_dim=13824, num_layers=40)
TI2V_5B = dict(_COMMON, num_attention_heads=24, in_channels=48, out_channels=48, ffn_dim=14336, num_layers=30)
T2V_1_3B = dict(_COMMON, num_attention_heads=12, in_channels=16, out_channels=16, ffn_dim=8960, num_layers=30)
# Wan 2.2 VAE (TI2V-5B, 48 latent channels); AutoencoderKLWan's defaults are the Wan 2.1 VAE. Latent statistics
# only rescale the input, so neutral ones keep the timing real.
VAE_2_2 = dict(
    base_dim=160,
    decoder_base_dim=256,
    z_dim=48,
    in_channels=12,
    out_channels=12,
    patch_size=2,
    is_residual=True,
    scale_factor_spatial=16,
    scale_factor_temporal=4,
    latents_mean=[0.0] * 48,
    latents_std=[1.0] * 48,
)

_PRESET_FAMILIES = {(40, 5120): "wan-14b", (30, 3072): "wan-5b", (30, 1536): "wan-1.3b"}  # (layers, width)


def preset_family(config) -> str | None:
    """configs/fis preset family of a Wan config, by (layers, width); None for other sizes (tiny test models)."""
    if "patch_size_t" in config:  # HunyuanVideo 1.5 has patch_size_t, Wan a patch tuple
        return None
    return _PRESET_FAMILIES.get((config["num_layers"], config["num_attention_heads"] * config["attention_head_dim"]))


# Blocks `--quantize fp8` leaves in bf16, per preset family: the ones measured as sensitive to FP8 (engine/evaluation/
# quantized.py measures each block's effect on the video with trained weights). None is listed until a measurement
# with that size's weights says otherwise; the embedded model's measurement is in docs/benchmarks.md.
FP8_KEEP: dict[str, tuple[int, ...]] = {}


def fp8_keep(config) -> tuple[int, ...]:
    return FP8_KEEP.get(preset_family(config), ())


def text_len(pipe) -> int:
    """Wan pads text to 512 tokens; a model whose tokenizer declares fewer (the embedded one: 32) was trained on
    that length, and 480 extra padding tokens would dilute its cross-attention."""
    tok = getattr(pipe, "tokenizer", None)
    declared = getattr(tok, "model_max_length", TEXT_LEN) or TEXT_LEN
    return min(TEXT_LEN, int(declared))


def dims(config, vae_s: int = 8, vae_t: int = 4, text_len: int = TEXT_LEN) -> DiTDims:
    return DiTDims.from_wan_config(dict(config), vae_s=vae_s, vae_t=vae_t, text_len=text_len)


def default_size(pipe) -> tuple[int, int]:
    return RESOLUTIONS["480p"]


def encode_text(pipe, prompt: str, negative: str, cfg: bool, device) -> dict:
    """(positive, negative) umT5 embeddings; the negative prompt only with CFG."""
    pos, neg = pipe.encode_prompt(
        prompt, negative or None, do_classifier_free_guidance=cfg, max_sequence_length=text_len(pipe), device=device
    )
    return {"prompt_embeds": pos, "negative_prompt_embeds": neg}


WAN = ModelFamily(
    name="wan",
    transformer_class="WanTransformer3DModel",
    adapter=ADAPTER,
    sp_plan=SP_PLAN,
    preset_family=preset_family,
    dims=dims,
    default_size=default_size,
    encode_text=encode_text,
    text_len=text_len,
    fp8_keep=fp8_keep,
    fps=16,
    size_multiple=16,  # WanPipeline.check_inputs: "height and width have to be divisible by 16"
)
