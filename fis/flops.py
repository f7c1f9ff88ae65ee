"""Analytic FLOPs of a video DiT forward and of a whole generation, dense or with FIS.

Convention: 2 FLOPs per multiply-add. Counted per transformer block:
  self-attention  QKVO projections 8*N*d^2, scores + weighted sum 4*N^2*d
  cross-attention Q,O on video 4*N*d^2, K,V on the context 4*L*d^2, scores + sum 4*N*L*d
  FFN             4*N*d*ffn
plus patch embedding, output projection and the text projection (each well under 0.1%).
Norms, RoPE, modulation and FIS interpolation are elementwise and not counted.

A sparse block is counted as its operator computes it (fis/operators.py): 'block' scope = the dense formula on
the anchor tokens; 'attention' scope = cross-attention and FFN on every token, the self-attention's projections
on the tokens that enter it as queries (Q, O) and as keys (K, V), scores over queries x keys.
With this convention Wan 2.2 A14B, 81 frames, 4 steps gives 26.09 PFLOP (720p) and 6.71 PFLOP (480p),
matching the paper's Table 1 dense rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from .operators import get as get_operator

UNIT = 1e15  # PFLOP, the unit of the paper's Table 1


@dataclass(frozen=True)
class DiTDims:
    num_layers: int
    dim: int
    ffn_dim: int
    in_channels: int = 16
    out_channels: int = 16
    patch: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    text_dim: int = 4096
    image_len: int = 0  # extra context tokens (Wan 2.1 I2V CLIP image tokens)
    vae_t: int = 4  # VAE temporal compression
    vae_s: int = 8  # VAE spatial compression
    joint: bool = False  # dual-stream blocks (HunyuanVideo 1.5): context tokens join self-attention, no cross-attn

    @classmethod
    def from_wan_config(cls, cfg: dict, vae_s: int = 8, vae_t: int = 4, text_len: int = 512) -> DiTDims:
        dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        return cls(
            num_layers=cfg["num_layers"],
            dim=dim,
            ffn_dim=cfg["ffn_dim"],
            in_channels=cfg["in_channels"],
            out_channels=cfg.get("out_channels") or cfg["in_channels"],
            patch=tuple(cfg["patch_size"]),
            text_len=text_len,
            text_dim=cfg["text_dim"],
            image_len=257 if cfg.get("image_dim") else 0,
            vae_t=vae_t,
            vae_s=vae_s,
        )

    @classmethod
    def from_hunyuan15_config(cls, cfg: dict, vae_s: int = 16, vae_t: int = 4, text_len: int = 256) -> DiTDims:
        """HunyuanVideo15Transformer3DModel's config. text_len: context tokens counted in joint attention (256,
        as HUNYUAN_VIDEO_15 below: the paper's count)."""
        dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        return cls(
            num_layers=cfg["num_layers"],
            dim=dim,
            ffn_dim=int(dim * cfg.get("mlp_ratio", 4.0)),
            in_channels=cfg["in_channels"],
            out_channels=cfg.get("out_channels") or cfg["in_channels"],
            patch=(cfg.get("patch_size_t", 1), cfg["patch_size"], cfg["patch_size"]),
            text_len=text_len,
            text_dim=cfg["text_embed_dim"],
            vae_t=vae_t,
            vae_s=vae_s,
            joint=True,
        )

    def latent_grid(self, frames: int, height: int, width: int) -> tuple[int, int]:
        """(latent frames after patching, tokens per frame)."""
        f = ((frames - 1) // self.vae_t + 1) // self.patch[0]
        hw = (height // self.vae_s // self.patch[1]) * (width // self.vae_s // self.patch[2])
        return f, hw


# Real-size architectures (diffusers configs) used by the benchmark and the presets.
WAN_A14B = DiTDims(num_layers=40, dim=5120, ffn_dim=13824)
WAN_1_3B = DiTDims(num_layers=30, dim=1536, ffn_dim=8960)
WAN_TI2V_5B = DiTDims(num_layers=30, dim=3072, ffn_dim=14336, in_channels=48, out_channels=48, vae_s=16)
# HunyuanVideo 1.5 8B I2V: 54 dual-stream blocks, 16 x 128 heads, MLP x4, patch 1, VAE 16x/4x. text_len counts
# the context tokens that join attention: 256 reproduces the paper's 5.47 P at 848x480, 81 frames, 8 steps
# (with none, 5.40 P); the text projection of the Qwen2.5-VL features (3584 wide) is counted like Wan's.
HUNYUAN_VIDEO_15 = DiTDims(
    num_layers=54,
    dim=2048,
    ffn_dim=8192,
    in_channels=65,
    out_channels=32,
    patch=(1, 1, 1),
    text_len=256,
    text_dim=3584,
    vae_s=16,
    joint=True,
)


def block_flops(d: DiTDims, tokens: int, anchor_tokens: int | None = None, operator: str = "residual") -> float:
    """One block on `tokens` video tokens; with `anchor_tokens`, the sparse block of `operator` (dense if None)."""
    n, c, ctx = tokens, d.dim, d.text_len + d.image_len
    q = k = n  # tokens entering the self-attention as queries and as keys/values
    if anchor_tokens is not None:
        op = get_operator(operator)
        if not op.per_frame:  # the whole block on the anchors
            n = q = k = anchor_tokens
        else:
            q, k = op.self_attention(n, anchor_tokens)
    if d.joint:  # both streams: their own QKVO and FFN, one attention over [video, context]
        q, k = q + ctx, k + ctx
        attn = 4 * q * c * c + 4 * k * c * c + 4 * q * k * c  # Q, O on the queries; K, V on the keys; scores
        return float(attn + 4 * (n + ctx) * c * d.ffn_dim)
    self_attn = 4 * q * c * c + 4 * k * c * c + 4 * q * k * c
    cross_attn = 4 * n * c * c + 4 * ctx * c * c + 4 * n * ctx * c
    ffn = 4 * n * c * d.ffn_dim
    return float(self_attn + cross_attn + ffn)


def forward_flops(
    d: DiTDims, num_frames: int, hw: int, anchor_counts: list | None = None, operator: str = "residual"
) -> float:
    """One transformer forward. anchor_counts[b] = anchors of block b, or None/missing = dense."""
    n = num_frames * hw
    pt, ph, pw = d.patch
    edge = 2 * n * d.dim * (d.in_channels + d.out_channels) * pt * ph * pw  # patch embed + proj_out
    edge += 2 * d.text_len * (d.text_dim * d.dim + d.dim * d.dim)  # text projection MLP
    total = edge
    for b in range(d.num_layers):
        a = anchor_counts[b] if anchor_counts is not None and b < len(anchor_counts) else None
        total += block_flops(d, n, None if a is None else a * hw, operator)
    return total


def generation_flops(
    d: DiTDims, frames: int, height: int, width: int, steps: int, plan=None, cfg_passes: int = 1, skipped_steps=()
) -> float:
    """All denoising forwards of one video (VAE and text encoder not counted).

    plan: a fis FISPlan (or None for dense). cfg_passes: 2 with classifier-free guidance.
    skipped_steps: steps whose forward is reused from cache (MagCache) and cost nothing.
    """
    f, hw = d.latent_grid(frames, height, width)
    total = 0.0
    for step in range(steps):
        if step in skipped_steps:
            continue
        counts = plan.anchor_counts(step) if plan is not None else None
        operator = plan.config.operator if plan is not None else "residual"
        total += cfg_passes * forward_flops(d, f, hw, counts, operator)
    return total
