"""Tiny Wan pipelines built offline (random weights, locally trained tokenizer).

They exercise the real loading path: built once, `save_pretrained` to a folder, then loaded with
`from_pretrained` like any hub model. Variants mirror the real families FIS supports:
  t2v   Wan 2.1 T2V            one transformer
  a14b  Wan 2.2 T2V-A14B       two experts + boundary_ratio
  ti2v  Wan 2.2 TI2V-5B        expand_timesteps (per-token timesteps)
  i2v   Wan 2.1 I2V            CLIP image context in cross-attention, 36 input channels
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from engine.models.random import build_tokenizer

VARIANTS = ("t2v", "a14b", "ti2v", "i2v")


def build_pipeline(variant: str = "t2v", seed: int = 0, num_layers: int = 6):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny variant {variant!r}; valid: {', '.join(VARIANTS)}")
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_dim = 32
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=text_dim,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    ).eval()
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()
    # Euler flow matching with shift 5: the Wan 2.2 Lightning sampler.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    i2v = variant == "i2v"

    def transformer():
        return WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=36 if i2v else 16,
            out_channels=16,
            text_dim=text_dim,
            freq_dim=32,
            ffn_dim=64,
            num_layers=num_layers,
            rope_max_seq_len=64,
            image_dim=16 if i2v else None,
            added_kv_proj_dim=32 if i2v else None,
        ).eval()

    parts = dict(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer()
    )
    if variant == "a14b":
        from diffusers import WanPipeline

        return WanPipeline(**parts, transformer_2=transformer(), boundary_ratio=0.875)
    if variant == "ti2v":
        from diffusers import WanPipeline

        return WanPipeline(**parts, expand_timesteps=True)
    if i2v:
        from diffusers import WanImageToVideoPipeline
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

        enc = CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=16,
                projection_dim=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=32,
                intermediate_size=32,
                patch_size=8,
            )
        ).eval()
        proc = CLIPImageProcessor(crop_size=32, size=32)
        return WanImageToVideoPipeline(**parts, image_encoder=enc, image_processor=proc)
    from diffusers import WanPipeline

    return WanPipeline(**parts)


def saved_once(name: str, build, root: Path | None = None) -> Path:
    """Build a pipeline with build() and save it under the cache root once; return its folder."""
    root = root or os.environ.get("FIS_CACHE") or Path.home() / ".cache" / "fis-engine"
    path = Path(root) / name
    if not (path / "model_index.json").exists():
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        build().save_pretrained(tmp)
        try:
            tmp.rename(path)  # atomic: a concurrent builder may have won, which is fine
        except OSError:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return path


def ensure_tiny(variant: str = "t2v", root: Path | None = None) -> Path:
    """Build and save the tiny pipeline once; return its folder (a normal diffusers pipeline folder)."""
    return saved_once(f"tiny-wan-{variant}-v1", lambda: build_pipeline(variant), root)
