"""The end-to-end benchmark's parts around the DiT (engine/bench/e2e.py): text encoders, the VAE decode (fp32,
bf16 and 1/N row bands: the per-rank bound of a parallel decode) and the mp4 write, each timed with the device
synchronised (engine/runtime/timing.py)."""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from engine.models.random import build_qwen_text
from engine.runtime import timing
from engine.runtime.io import write_mp4

if TYPE_CHECKING:
    from .e2e import Options

PROMPT = "a red fox running through fresh snow in a pine forest at sunrise, cinematic, slow motion"
SHARDS = (2, 4, 8)  # the 1/N bands of latent rows timed by 'shards'
QWEN_TOKENS = 1000  # HunyuanVideo 1.5's prompt template + prompt, as its pipeline pads them


def time_text(pipe, device, o: Options) -> dict:
    """umT5-XXL on the prompt padded to the pipeline's 512 tokens (what Worker.generate calls)."""
    from engine.models.wan import text_len

    c = pipe.text_encoder.config

    def encode():
        return pipe.encode_prompt(
            PROMPT, do_classifier_free_guidance=False, max_sequence_length=text_len(pipe), device=device
        )

    return {
        "encoder": f"umT5 ({c.num_layers} x {c.d_model})",
        "text_s": timing.time_fn(encode, device, 1, 3),
        "status": "ok",
    }


QWEN_TINY = dict(
    vocab_size=512,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
)


def time_qwen(device, dtype, o: Options) -> dict:
    """HunyuanVideo 1.5's Qwen2.5-VL-7B language model on QWEN_TOKENS tokens (built here, then freed)."""
    model = build_qwen_text(device, dtype, config=QWEN_TINY if o.tiny else None)
    c = model.config
    ids = torch.randint(0, c.vocab_size, (1, QWEN_TOKENS), device=device)
    sec = timing.time_fn(lambda: model(input_ids=ids), device, 1, 3)
    model = None  # noqa: F841 - free the 15 GB before anything else is measured
    timing.free_memory(device)
    return {
        "encoder": f"Qwen2.5-VL language model ({c.num_hidden_layers} x {c.hidden_size})",
        "tokens": QWEN_TOKENS,
        "text_s": sec,
        "status": "ok",
    }


def time_vae(pipe, latents: torch.Tensor, device, o: Options, parts: set[str]) -> tuple[dict, object]:
    """The decode as the pipeline does it (vae.decode, then the video processor's postprocess to the frames the mp4
    is written from) in fp32; with 'vae-bf16' also in bf16 and the bf16 video's PSNR against fp32; with 'shards' the
    decode of 1/N bands of latent rows. Returns (results, the fp32 frames)."""
    vae = pipe.vae
    warm, reps = (0, 1) if o.tiny else (1, 1)
    z = latents.to(device, torch.float32)  # [1, C, F, h, w]
    if o.tiny:
        z = z[:, :, :2]  # the smoke run's decode: 2 latent frames (5 video frames) are enough
    res = {"latents": list(z.shape), "status": "ok"}

    def decode(x, dtype):
        return vae.decode(x.to(dtype), return_dict=False)[0]  # [B, 3, F, H, W] in [-1, 1]

    video = decode(z, torch.float32)  # the warm-up, and the reference of the bf16 PSNR
    res["decode_fp32_s"] = timing.time_fn(lambda: decode(z, torch.float32), device, 0, reps)
    t = time.perf_counter()
    frames = pipe.video_processor.postprocess_video(video, output_type="np")[0]  # [F, H, W, 3] float in [0, 1]
    res["postprocess_s"] = time.perf_counter() - t
    res["peak_gib"] = timing.peak_gib(device)
    if "vae-bf16" in parts:
        vae.to(torch.bfloat16)
        try:
            mse = (decode(z, torch.bfloat16).float() - video).pow(2).mean().item()  # also the warm-up
            res["decode_bf16_s"] = timing.time_fn(lambda: decode(z, torch.bfloat16), device, 0, reps)
            res["bf16_psnr_db"] = 10 * math.log10(4.0 / mse) if mse > 0 else float("inf")  # peak-to-peak 2
        finally:
            vae.to(torch.float32)
    video = None  # noqa: F841 - free the whole video before the bands
    res["shards"] = []
    rows = z.shape[3]
    for n in SHARDS if "shards" in parts else ():
        if n > rows:
            continue
        band = math.ceil(rows / n)
        sec = timing.time_fn(lambda b=band: decode(z[:, :, :, :b], torch.float32), device, warm, reps)
        res["shards"].append({"ranks": n, "latent_rows": band, "decode_s": sec, "speedup": res["decode_fp32_s"] / sec})
    timing.free_memory(device)
    return res, frames


def time_mp4(frames) -> dict:
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        write_mp4(frames, Path(d) / "v.mp4")
        s = time.perf_counter() - t
        size = (Path(d) / "v.mp4").stat().st_size
    return {"mp4_s": s, "bytes": size, "status": "ok"}
