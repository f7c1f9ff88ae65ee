"""GPU benchmark of FIS-DiT on real-size Wan architectures with random weights (paper Tables 1-3).

One process, one set of inputs, one seed: every row (Dense, the FIS presets, MagCache-Force, the ablations) runs
the same 4-step flow-match Euler loop on the same models, so latencies, peak memory and final latents compare
directly. Models are built on the GPU in bf16 with diffusers' own initialisation (no download; text embeddings
are random tensors of the real shape). Rows run in order of importance and each one survives another's failure.

    python launch/bench.py --model wan2.2-a14b --resolution 480p --attention-sweep --ablations --profile
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from engine.errors import UserError
from engine.hooks.attention_backend import FA3, check_attention_backend, set_attention_backend
from engine.hooks.compile import MODES as COMPILE_MODES
from engine.hooks.compile import compile_blocks
from engine.models.random import MODELS, TINY_VIDEO
from engine.models.wan import RESOLUTIONS
from fis import UNIT

from . import kernels
from .report import environment, save
from .rows import BenchError, Budget, check_rows, estimate_row_s, measure_row, parse_rows
from .setup import Setup, build_setup


@dataclass
class Options:
    model: str = "wan2.2-a14b"
    resolution: str = "480p"
    rows: str = "all"
    ablations: bool = False
    attention_backend: str = "auto"
    attention_sweep: bool = False
    sweep_compile: str = "static"  # off | static | auto
    compile: str = "off"  # off | static | auto
    profile: bool = False
    vae: bool = False
    repeats: int = 3
    ablation_repeats: int = 1
    warmup: int = 1
    frames: int = 81
    steps: int = 4
    seed: int = 0
    tiny: bool = False
    max_seconds: float = 540.0
    out_json: str | None = None
    command: str = ""


def validate(o: Options) -> None:
    if o.model not in MODELS:
        raise BenchError(f"unknown model {o.model!r}; valid: {', '.join(MODELS)}")
    if o.resolution not in RESOLUTIONS:
        raise BenchError(f"unknown resolution {o.resolution!r}; valid: {', '.join(RESOLUTIONS)}")
    for flag, value in (("--compile", o.compile), ("--sweep-compile", o.sweep_compile)):
        if value not in COMPILE_MODES:
            raise BenchError(f"unknown {flag} mode {value!r}; valid: {', '.join(COMPILE_MODES)}")
    if o.repeats < 1 or o.ablation_repeats < 1 or o.warmup < 0:
        raise BenchError("--repeats and --ablation-repeats must be >= 1, --warmup >= 0")
    if o.steps < 1 or o.frames < 1 or (o.frames - 1) % 4:
        raise BenchError(f"--frames must be 4k+1 (e.g. 81) and --steps >= 1; got {o.frames} frames, {o.steps} steps")
    from diffusers.models.attention_dispatch import AttentionBackendName

    backends = [b.value for b in AttentionBackendName]
    if o.attention_backend not in ("auto", FA3) and o.attention_backend not in backends:
        raise BenchError(f"unknown attention backend {o.attention_backend!r}; valid: auto, fa3, {', '.join(backends)}")
    try:
        check_attention_backend(o.attention_backend, None if torch.cuda.is_available() else torch.device("cpu"))
    except UserError as e:
        raise BenchError(str(e)) from None
    if not o.tiny and not torch.cuda.is_available():
        raise BenchError("no CUDA device: the real-size benchmark needs a GPU (use --tiny for the CPU smoke run)")
    parse_rows(o.rows, o.ablations)


@torch.no_grad()  # like the pipelines' __call__
def run(o: Options) -> dict:
    """Sweep -> build -> rows (Dense, FIS, MagCache) -> profile -> ablations -> VAE; JSON saved after each stage."""
    validate(o)
    budget = Budget(o.max_seconds)
    spec = MODELS[o.model].tiny() if o.tiny else MODELS[o.model]
    device = torch.device("cpu" if o.tiny else "cuda")
    frames, height, width = TINY_VIDEO if o.tiny else (o.frames, *spec.size(o.resolution))
    f, hw = spec.dims.latent_grid(frames, height, width)
    report = {
        **environment(device, o.command),
        "model": spec.name,
        "resolution": "tiny" if o.tiny else o.resolution,
        "frames": frames,
        "height": height,
        "width": width,
        "latent_frames": f,
        "tokens": f * hw,
        "steps": o.steps,
        "seed": o.seed,
        "warmup": o.warmup,
        "repeats": o.repeats,
        "ablation_repeats": o.ablation_repeats,
        "compile": o.compile,
        "max_seconds": o.max_seconds,
        "rows": [],
    }
    rows = parse_rows(o.rows, o.ablations)
    check_rows(rows, spec, f, o.steps)
    others = [r for r in RESOLUTIONS if r != o.resolution]  # the sweep times the run's resolution first
    sizes = [("tiny", (height, width))] if o.tiny else [(r, spec.size(r)) for r in [o.resolution, *others]]
    grids = kernels.sweep_grids(spec, frames, sizes)

    if o.attention_sweep:  # first: it decides the backend of everything after it
        print("attention sweep ...", flush=True)
        report["sweep"] = kernels.attention_sweep(spec, device, grids, o.sweep_compile)
        save(report, o.out_json)
    backend, why = kernels.choose_backend(o.attention_backend, report.get("sweep"), spec, device, grids)
    report.update(attention_backend=backend, attention_backend_choice=why)
    print(f"attention backend: {backend} ({why})", flush=True)

    if not (rows or o.profile or o.vae):  # sweep only
        report["elapsed_s"] = budget.elapsed()
        save(report, o.out_json)
        return report

    print(f"building {spec.name} ...", flush=True)
    t = time.perf_counter()
    s = build_setup(spec, device, frames, height, width, o.steps, o.seed)
    for m in s.experts:
        set_attention_backend(m, backend)
    compile_blocks(s.experts, o.compile)  # "off": nothing
    report.update(build_s=time.perf_counter() - t, route=s.route, flops_dense_P=s.flops() / UNIT)

    dense, compiled_frames = None, set()
    for row in rows:
        if row.ablation and o.profile and "profile" not in report:
            report["profile"] = _profile(s, o, budget, dense)
            save(report, o.out_json)
        repeats = o.ablation_repeats if row.ablation else o.repeats
        shapes = s.token_frames(row.fis(s.family))
        new = len(shapes - compiled_frames) if o.compile != "off" else 0
        # Dense is the reference every speedup needs: it always runs; every other row is budgeted
        refused = None if row.name == "Dense" else budget.refuse(estimate_row_s(s, row, dense, o.warmup + repeats, new))
        if refused:
            result = {"name": row.name, "ablation": row.ablation, "magcache": row.magcache, "status": refused}
        else:
            print(f"row {row.name} ...", flush=True)
            result = measure_row(s, row, o.warmup, repeats, dense)
            compiled_frames |= shapes
        if row.name == "Dense" and result["status"] == "ok":
            dense = result
        print("  " + _row_line(result), flush=True)
        report["rows"].append(result)
        save(report, o.out_json)
    if o.profile and "profile" not in report:
        report["profile"] = _profile(s, o, budget, dense)
    if o.vae:
        refused = budget.refuse(60.0)  # decode time is unknown before it runs; a minute covers 720p
        report["vae"] = (
            {"status": refused} if refused else kernels.time_vae_decode(s, dense["latents"] if dense else s.noise)
        )
    report["elapsed_s"] = budget.elapsed()
    for r in report["rows"]:
        r.pop("latents", None)
    save(report, o.out_json)
    return report


def _profile(s: Setup, o: Options, budget: Budget, dense: dict | None) -> dict:
    step_s = dense["latency_s"] / s.steps if dense else 0.0
    refused = budget.refuse(5 * step_s + 10)  # 5 sparse step calls (each under a dense one), plus the profiler
    return {"status": refused} if refused else kernels.profile_sparse_step(s, o.out_json)


def _row_line(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['name']}: {r['status']}"
    extra = f", speedup {r['speedup']:.2f}x, rel L2 {r['rel_l2']:.4f}" if "speedup" in r else ""
    return f"{r['name']}: {r['latency_s']:.3f} s, {r['flops_P']:.3f} PFLOP, {r['tflops']:.0f} TFLOP/s{extra}"
