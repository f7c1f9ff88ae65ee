"""Command-line plumbing shared by the launch/ scripts: one-line errors, flags -> WorkerConfig / GenerationRequest,
prompt files and output folders."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from engine.errors import UserError
from engine.models.wan import RESOLUTIONS
from engine.runtime.presets import build_fis
from engine.runtime.request import GenerationRequest
from engine.runtime.worker import WorkerConfig
from fis import FISConfigError, parse_blocks


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2, like ours
        fail(message, self.prog)


def quiet_libraries() -> None:
    """Library chatter (deprecations, weight-loading bars) would bury the one progress bar that matters."""
    import warnings

    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


def fail(message: str, prog: str = "generate") -> None:
    """One line on stderr, exit 2. Under torchrun a user error is almost always every rank's (the same checks on
    the same input): rank 0 says it; another rank first waits, since exiting first would let torchrun kill rank 0
    before it prints. torchrun stops the waiting rank once rank 0 has exited; if rank 0 did not fail (an error of
    this rank alone), the rank says it itself after the wait."""
    rank = os.environ.get("RANK", "0")
    if rank != "0" and "TORCHELASTIC_RUN_ID" in os.environ:
        time.sleep(FAIL_GRACE_S)
    print(f"{prog}: error: {message}" if rank == "0" else f"{prog}: error (rank {rank}): {message}", file=sys.stderr)
    raise SystemExit(2)


FAIL_GRACE_S = 20.0  # how long a rank other than 0 leaves rank 0 to report the same error


def add_model_args(p: argparse.ArgumentParser) -> None:
    d = WorkerConfig()  # the engine's defaults live in one place (engine/runtime/worker.py, README "Defaults")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="pipeline folder or hub id (default: the embedded model, engine/weights/shapes-wan)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    g.add_argument("--lora", help="LoRA for transformer (Wan 2.2: high-noise expert)")
    g.add_argument("--lora-2", help="LoRA for transformer_2 (Wan 2.2: low-noise expert)")
    g.add_argument("--lora-scale", type=float, default=1.0)
    g.add_argument("--scheduler", default="default", help="default, euler (Lightning: --scheduler euler --shift 5)")
    g.add_argument("--shift", type=float)
    g.add_argument(
        "--attention-backend",
        default=d.attention_backend,
        help="a diffusers attention backend (e.g. _native_cudnn), fa3 (FlashAttention-3, fa3-fwd) or auto (fastest)",
    )
    g.add_argument(
        "--quantize",
        default=d.quantize,
        choices=["off", "fp8", "auto"],
        help="fp8: torchao float8 rowwise GEMMs in the transformer blocks (GPU; pays with --compile); auto: fp8 "
        "where it can run",
    )
    g.add_argument(
        "--compile",
        default=d.compile,
        choices=["off", "static", "auto"],
        help="torch.compile the blocks (the fastest on GPU: docs/benchmarks.md); static = a graph per token count",
    )
    g.add_argument(
        "--vae-dtype",
        default=d.vae_dtype,
        choices=["fp32", "bf16", "auto"],
        help="VAE decode dtype (auto: bf16 on GPU)",
    )
    q = p.add_argument_group("parallel (under torchrun --nproc_per_node=N)")
    q.add_argument("--ulysses", type=int, help="Ulysses degree (default: what the world size leaves)")
    q.add_argument("--ring", type=int, default=1, help="ring-attention degree (CUDA)")
    q.add_argument("--cfg-parallel", type=int, default=1, choices=[1, 2], help="2: CFG branches on two rank groups")
    q.add_argument(
        "--shard",
        default="spatial",
        choices=["spatial", "frame"],
        help="spatial: each rank a slice of every frame (default); frame: contiguous frame ranges",
    )
    q.add_argument("--sp-attention", default="diffusers", choices=["diffusers", "xfuser"])
    q.add_argument(
        "--vae-parallel",
        default=d.vae_parallel,
        choices=["auto", "off"],
        help="auto: decode over every rank of the replica (exact, DistVAE); off: rank 0 decodes alone",
    )


def add_request_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("request")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--frames", type=int, help="4k+1 frames (default: the model's)")
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--resolution", choices=sorted(RESOLUTIONS), help="480p (832x480) or 720p (1280x720)")
    g.add_argument("--steps", type=int, default=4)
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's, 1.0 for most)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--image", help="reference image (PNG, JPEG, WebP) for image-to-video models")
    g.add_argument(
        "--image-fit",
        default="crop",
        choices=["crop", "stretch", "strict"],
        help="image vs video size: crop (scale to cover, centre crop; default), stretch, "
        "strict (must already be the video size)",
    )
    f = p.add_argument_group("FIS")
    f.add_argument("--fis", default="off", help="off, balanced, fast, quality, or a preset .toml (see configs/fis/)")
    f.add_argument("--fis-stride", type=int)
    f.add_argument("--fis-blocks", help="sparse blocks: auto, a-b or a,b,c")
    f.add_argument("--fis-dense-steps", type=int)
    f.add_argument(
        "--fis-operator",
        help="what a sparse block computes (fis/operators.py): residual (default), linear (paper Eq. 10), "
        "attn (every frame runs the block, self-attention on the anchors), kv (every frame's queries attend to the "
        "anchors' keys and values)",
    )


def worker_config(a) -> WorkerConfig:
    """WorkerConfig from the parsed flags: every field with a flag of the same name (--lora-2 -> lora_2)."""
    given = vars(a)
    return WorkerConfig(**{f.name: given[f.name] for f in dataclasses.fields(WorkerConfig) if f.name in given})


def read_prompts(path: str) -> list[str]:
    """A prompt file: one prompt per line, blank lines ignored."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompt file {path!r} does not exist")
    return [line.strip() for line in p.read_text().splitlines() if line.strip()]


def check_output_dir(path: str, overwrite: bool) -> Path:
    """An output folder that does not exist yet or is empty (--overwrite: any folder)."""
    out = Path(path)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise UserError(f"output {path!r} exists and is not empty (use --overwrite)")
    return out


def request(a, family: str) -> GenerationRequest:
    """Build the request; FIS overrides on top of the preset (an override alone starts from balanced)."""
    overrides = dict(stride=a.fis_stride, dense_steps=a.fis_dense_steps, operator=a.fis_operator)
    if a.fis_blocks is not None:
        overrides["blocks"] = parse_blocks(a.fis_blocks)
    try:
        fis = build_fis(a.fis, family, **overrides)
    except FISConfigError as e:
        raise UserError(str(e)) from None
    h, w = RESOLUTIONS[a.resolution] if a.resolution else (a.height, a.width)
    if a.resolution and (a.height or a.width):
        raise UserError("give either --resolution or --height/--width, not both")
    return GenerationRequest(
        prompt=a.prompt,
        negative_prompt=a.negative_prompt,
        height=h,
        width=w,
        num_frames=a.frames,
        steps=a.steps,
        guidance=a.guidance,
        seed=a.seed,
        fis=fis,
        image=a.image,
        image_fit=a.image_fit,
    )


def check_output(path: str, suffix: str = ".mp4") -> Path:
    out = Path(path)
    if out.suffix.lower() != suffix:
        raise UserError(f"output {path!r} must end in {suffix}")
    if not out.parent.is_dir():
        raise UserError(f"output directory {str(out.parent)!r} does not exist")
    return out


def summary(m: dict) -> str:
    steps = ", ".join(f"{s:.2f}" for s in m["step_s"])
    gpu = m["gpu"]["name"] if m.get("gpu") else "cpu"
    fis = m["request"]["fis"]
    wk = m["worker"]
    par = "" if wk["world_size"] == 1 else f" x{wk['world_size']} ({wk['degrees']}, {wk['shard']})"
    rows = [
        ("device", f"{gpu} ({wk['dtype']}){par}"),
        ("FIS", "off" if fis is None else f"{fis['name']} (s={fis['stride']}, {fis['operator']})"),
        (
            "latency",
            f"{m['latency_s']:.2f} s (text {m['text_encode_s']:.2f}, denoise {m['denoise_s']:.2f}, "
            f"decode {m['decode_s']:.2f})",
        ),
        ("per step", f"{steps} s"),
        ("FLOPs", f"{_flops(m['flops_P'])} (dense {_flops(m['flops_dense_P'])})"),
        ("speedup est.", f"{m['speedup_estimate']:.2f}x by FLOPs"),
        ("peak memory", f"{m['peak_memory_gib']:.2f} GiB" + (" (GPU)" if m.get("gpu") else " (RSS)")),
        *(("note", n) for n in m.get("notes", ())),
    ]
    return "\n".join(f"  {k:<13} {v}" for k, v in rows)


def _flops(p: float) -> str:
    """PFLOP value -> readable (the tiny model is in GFLOP)."""
    for unit, scale in (("P", 1.0), ("T", 1e-3), ("G", 1e-6)):
        if p >= scale:
            return f"{p / scale:.2f} {unit}FLOP"
    return f"{p * 1e9:.2f} MFLOP"
