"""HunyuanVideo 1.5: what diffusers' dense [B, 1, S, S] text mask costs in one joint-attention call.

One real-size attention layer (HunyuanVideo15TransformerBlock.attn of the 8B model: 16 heads x 128, random
weights), 480p (848x480) 81 frames, per SDPA backend:
  dense    diffusers' HunyuanVideo15AttnProcessor2_0 on the padded text: builds the [B, 1, S, S] bool mask
  joint    engine.models.hunyuan15.JointAttention on the same padded text: padded keys left out, no mask
  trimmed  JointAttention on the valid text only (what engine.models.hunyuan15.drop_text_padding feeds every block)
Assumed (diffusers 0.42.1 transformer config and pipeline defaults): patch 1, VAE 16x spatial / 4x temporal ->
21 x 30 x 53 = 33390 video tokens; text padded to 1000 Qwen2.5-VL + 256 ByT5 + 729 SigLIP = 1985 tokens, of
which --valid-text Qwen tokens are valid (t2v: no ByT5 glyphs, the image tokens are padding); 54 blocks.

    python launch/hunyuan_mask.py --device cuda --json mask.json   # GPU: real sizes, bf16
    python launch/hunyuan_mask.py --device cpu --video 17x240x432 --repeat 2 --backends default,math   # CPU, small
"""

import time
from contextlib import nullcontext
from functools import partial

import diffusers.models.transformers.transformer_hunyuan_video15 as hv15
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine.errors import one_line
from engine.models.hunyuan15 import JointAttention
from engine.runtime.io import write_json

BACKENDS = {
    "default": None,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def measure(fn, device, repeat: int) -> tuple[float, float]:
    """(ms per call, peak memory above the inputs in MiB; NaN off CUDA)."""
    cuda = device.type == "cuda"
    fn()  # warm-up (kernel selection, cuDNN plans)
    if cuda:
        torch.cuda.synchronize(), torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    if cuda:
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / repeat * 1e3
    return ms, (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else float("nan")


@torch.no_grad()
def run(a) -> None:
    """a: launch/hunyuan_mask.py's arguments."""
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the model runs in bf16 on GPUs
    frames, height, width = map(int, a.video.split("x"))
    grid = ((frames - 1) // 4 + 1, height // 16, width // 16)  # latent frames, rows, columns
    n, heads, dim = grid[0] * grid[1] * grid[2], 16, 2048
    with torch.device(device):  # random init on the device
        attn = hv15.HunyuanVideo15TransformerBlock(heads, dim // heads, mlp_ratio=4.0).attn.to(dtype).eval()
    rope = hv15.HunyuanVideo15RotaryPosEmbed(1, 1, [16, 56, 56])(torch.empty(1, 1, *grid, device=device))  # [N, D] x 2
    video = torch.randn(1, n, dim, device=device, dtype=dtype)  # [B, N, C]
    text = torch.randn(1, a.text_len, dim, device=device, dtype=dtype)  # [B, L, C], valid tokens first
    mask = (torch.arange(a.text_len, device=device) < a.valid_text)[None]  # [B, L]
    s = n + a.text_len
    print(
        f"video tokens {n} ({'x'.join(map(str, grid))}), text {a.text_len} ({a.valid_text} valid), S = {s}; "
        f"dense bool mask {s * s / 2**20:.0f} MiB per block call, {54 * s * s / 2**30:.1f} GiB built per forward"
    )
    variants = {
        "dense": (attn.processor, text, mask),
        "joint": (JointAttention(), text, mask),
        "trimmed": (JointAttention(), text[:, : a.valid_text], None),
    }
    diff = (
        attn.processor(attn, video, text, mask, rope)[0]
        - JointAttention()(attn, video, text[:, : a.valid_text], None, rope)[0]
    )  # [B, N, C]
    print(f"video output, dense mask vs trimmed text: max |diff| {diff.abs().max().item():.3g} ({dtype})")
    rows = []
    for backend in a.backends.split(","):
        for name, (proc, t, m) in variants.items():
            try:
                with nullcontext() if BACKENDS[backend] is None else sdpa_kernel(BACKENDS[backend]):
                    ms, mib = measure(partial(proc, attn, video, t, m, rope), device, a.repeat)
                rows.append({"backend": backend, "variant": name, "ms": ms, "peak_mib": mib})
                print(
                    f"{backend:>9} {name:>8}: {ms:9.2f} ms/call  peak +{mib:8.0f} MiB  "
                    f"x54 blocks = {54 * ms / 1e3:7.2f} s/forward"
                )
            except RuntimeError as e:  # e.g. flash / cuDNN with a dense mask
                rows.append({"backend": backend, "variant": name, "error": one_line(e)})
                print(f"{backend:>9} {name:>8}: unsupported ({rows[-1]['error'][:80]})")
    if a.json:
        write_json({"args": {k: str(v) for k, v in vars(a).items()}, "S": s, "rows": rows}, a.json)
