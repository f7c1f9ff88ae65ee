"""Model knowledge for FIS, as data: where the blocks are and which block arguments carry tokens.

A block argument listed in `per_frame` holds one entry per video token along `dim` (frame-major,
F * HW tokens) and is sliced to the anchor frames together with the hidden states; arguments not
listed (text context, per-sample temb) pass through whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class SliceRule:
    dim: int = 1
    ndim: int | None = None  # slice only tensors of this rank (Wan temb: [B, N, 6, C] vs [B, 6, C])
    reuse: bool = False  # the same tensor for every block of one forward: slice once per anchor set


def _patch_tuple(config) -> tuple[int, int, int]:
    return tuple(config.patch_size)  # Wan: (p_t, p_h, p_w)


def _patch_t_and_square(config) -> tuple[int, int, int]:
    return config.patch_size_t, config.patch_size, config.patch_size  # HunyuanVideo: ints


@dataclass(frozen=True)
class FISAdapter:
    name: str
    blocks_attr: str  # nn.ModuleList of transformer blocks
    hidden: str  # block argument with the video tokens [B, F*HW, C]
    per_frame: dict[str, SliceRule] = field(default_factory=dict)
    output_index: int | None = None  # the block returns a tuple; this element holds the video tokens
    patch: Callable = _patch_tuple  # config -> (p_t, p_h, p_w)
    input_arg: str = "hidden_states"  # transformer argument [B, C, F, H, W]

    def geometry(self, transformer, latents) -> tuple[int, int]:
        """(latent frames after patching, tokens per frame) from the transformer input."""
        p_t, p_h, p_w = self.patch(transformer.config)
        _, _, f, h, w = latents.shape
        return f // p_t, (h // p_h) * (w // p_w)


WAN = FISAdapter(
    name="wan",
    blocks_attr="blocks",
    hidden="hidden_states",
    per_frame={
        "rotary_emb": SliceRule(dim=1, reuse=True),  # (cos, sin), each [1, N, 1, D]
        "temb": SliceRule(dim=1, ndim=4),  # Wan 2.2 TI2V per-token timesteps [B, N, 6, C]
    },
)

# HunyuanVideo 1.5: dual-stream blocks with joint attention over [video, text]. Only the video stream
# is sliced; the text stream and its mask ([B, L_text], the processor pads it for the video tokens)
# pass whole, and the block's updated text stream is used as is.
HUNYUAN_VIDEO_15 = FISAdapter(
    name="hunyuanvideo1.5",
    blocks_attr="transformer_blocks",
    hidden="hidden_states",
    per_frame={"freqs_cis": SliceRule(dim=0, reuse=True)},  # (cos, sin), each [N, D]
    output_index=0,  # returns (hidden_states, encoder_hidden_states)
    patch=_patch_t_and_square,
)

ADAPTERS = {"WanTransformer3DModel": WAN, "HunyuanVideo15Transformer3DModel": HUNYUAN_VIDEO_15}


def adapter_for(transformer) -> FISAdapter:
    name = type(transformer).__name__
    if name not in ADAPTERS:
        raise ValueError(f"FIS has no adapter for {name}; supported: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[name]
