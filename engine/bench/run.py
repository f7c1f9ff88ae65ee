"""GPU benchmark of FIS-DiT on real-size Wan architectures with random weights (issue 3, paper Tables 1-3).

One process, one set of inputs, one seed: every row (Dense, the FIS presets, MagCache-Force, the ablations) runs
the same 4-step flow-match Euler loop on the same models, so latencies, peak memory and final latents compare
directly. Models are built on the GPU in bf16 with diffusers' own initialisation (no download; text embeddings
are random tensors of the real shape). Rows run in order of importance and each one survives another's failure.

    python launch/bench.py --model wan2.2-a14b --resolution 480p --attention-sweep --ablations --profile
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
import traceback
from dataclasses import dataclass

import torch

from engine.hooks.attention_backend import set_attention_backend
from engine.hooks.compile import MODES as COMPILE_MODES
from engine.hooks.compile import compile_blocks
from engine.hooks.fis import MODEL_HOOK, FISState, apply_fis, remove_fis
from engine.models.random import MODELS, TINY_VIDEO, ModelSpec, build_transformer, model_dtype
from engine.runtime.presets import load_fis, model_family
from engine.runtime.request import RESOLUTIONS
from fis import UNIT, FISConfig, FISConfigError, generation_flops


class BenchError(ValueError):
    """Bad benchmark input; the message is one line and lists the valid values."""


# ---- rows -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    name: str
    preset: str | None = None  # FIS preset (engine.runtime.presets), None = dense
    overrides: tuple = ()  # (field, value) pairs on top of the preset: the ablations
    magcache: bool = False
    ablation: bool = False

    def fis(self, family: str) -> FISConfig | None:
        if self.preset is None:
            return None
        return load_fis(self.preset, family).replace(name=self.name, **dict(self.overrides))


MAIN_ROWS = (
    Row("Dense"),
    Row("FIS-Balanced", "balanced"),
    Row("FIS-Fast", "fast"),
    Row("MagCache-Force", magcache=True),
    Row("FIS-Balanced+MagCache-Force", "balanced", magcache=True),
)
# Paper Table 2 (interleaved vs fixed anchors; s=3 and s=5 interleaved are FIS-Balanced / FIS-Fast) and Table 3.
ABLATION_ROWS = (
    Row("FIS-s3-fixed", "balanced", (("stride", 3), ("interleave", False)), ablation=True),
    Row("FIS-s4", "balanced", (("stride", 4),), ablation=True),
    Row("FIS-s4-fixed", "balanced", (("stride", 4), ("interleave", False)), ablation=True),
    Row("FIS-s5-fixed", "balanced", (("stride", 5), ("interleave", False)), ablation=True),
    Row("FIS-no-block-protection", "balanced", (("dense_head", 0), ("dense_tail", 0)), ablation=True),
    Row("FIS-no-step-protection", "balanced", (("dense_steps", 0),), ablation=True),
    Row("FIS-no-protection", "balanced", (("dense_head", 0), ("dense_tail", 0), ("dense_steps", 0)), ablation=True),
    Row("FIS-linear", "balanced", (("operator", "linear"),), ablation=True),
)
ROWS = {r.name: r for r in MAIN_ROWS + ABLATION_ROWS}

# MagCache-Force. The paper's row skips one step in four (19.57 of 26.09 PFLOP at 720p) and, combined with
# FIS-Balanced, that step is a sparse one: the final step runs. diffusers' MagCache skips a step when the error
# accumulated from the calibrated magnitude ratios stays under the threshold. Forcing it: ratio 1.0 (no change
# predicted: error 0, always under the threshold) on every step but the last, whose ratio 0.0 (error 1.0) is over
# it; max_skip_steps=1 forbids two skips in a row. Per expert (each keeps its own residual) this skips exactly
# step 1 of 4 on Wan 2.2 A14B, TI2V-5B and 2.1 1.3B alike.
MAGCACHE_FORCE = dict(threshold=0.5, max_skip_steps=1, retention_ratio=0.0)


def parse_rows(spec: str, ablations: bool) -> list[Row]:
    """'all' = the Table 1 rows, 'none' = no rows (a sweep-only run); names are comma separated and
    case-insensitive; --ablations appends Tables 2-3. Always in table order: Dense first, the reference."""
    by_lower = {n.lower(): r for n, r in ROWS.items()}
    rows = list(ABLATION_ROWS) if ablations else []
    for name in (s.strip() for s in spec.split(",") if s.strip()):
        if name.lower() == "all":
            rows += MAIN_ROWS
        elif name.lower() in by_lower:
            rows.append(by_lower[name.lower()])
        elif name.lower() != "none":
            raise BenchError(f"unknown row {name!r}; valid: all, none, {', '.join(ROWS)}")
    order = {r.name: i for i, r in enumerate(MAIN_ROWS + ABLATION_ROWS)}
    return sorted(set(rows), key=lambda r: order[r.name])


# ---- one benchmark process ------------------------------------------------------------------------------------
@dataclass
class Setup:
    """Everything shared by the rows: models, inputs, schedule."""

    spec: ModelSpec
    device: torch.device
    frames: int
    height: int
    width: int
    steps: int
    experts: list
    noise: torch.Tensor  # [1, C, F, H, W] fp32 initial latents
    prompt: torch.Tensor  # [1, L, text_dim] bf16 random text embeddings
    scheduler: object
    route: list[int]  # expert index per step

    @property
    def family(self) -> str:
        return model_family(self.spec.transformer)

    @property
    def grid(self) -> tuple[int, int]:
        return self.spec.dims.latent_grid(self.frames, self.height, self.width)

    def token_frames(self, fis: FISConfig | None) -> set[int]:
        """Frame counts a block runs on with this config (dense + anchor counts): one compiled graph each."""
        f = self.grid[0]
        if fis is None:
            return {f}
        plan = fis.resolve(self.spec.transformer["num_layers"], f, self.steps)
        return {f} | {c for i in range(self.steps) for c in plan.anchor_counts(i) if c is not None}

    def flops(self, fis: FISConfig | None = None, skipped=()) -> float:
        plan = None if fis is None else fis.resolve(self.spec.transformer["num_layers"], self.grid[0], self.steps)
        return generation_flops(
            self.spec.dims, self.frames, self.height, self.width, self.steps, plan, skipped_steps=tuple(skipped)
        )


def build_setup(spec: ModelSpec, device, frames: int, height: int, width: int, steps: int, seed: int) -> Setup:
    from diffusers import FlowMatchEulerDiscreteScheduler

    experts = [build_transformer(spec.transformer, device, seed + i) for i in range(spec.experts)]
    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)  # the Wan 2.2 Lightning sampler
    scheduler.set_timesteps(steps)
    boundary = None if spec.boundary_ratio is None else spec.boundary_ratio * scheduler.config.num_train_timesteps
    # WanPipeline: t >= boundary -> transformer (high noise), else transformer_2; decided once, on the host
    route = [0 if boundary is None or t >= boundary else 1 for t in scheduler.timesteps.tolist()]
    f = (frames - 1) // spec.dims.vae_t + 1
    c = spec.transformer["in_channels"]
    g = torch.Generator().manual_seed(seed)  # CPU generator: the same noise on any device
    noise = torch.randn(1, c, f, height // spec.vae_s, width // spec.vae_s, generator=g).to(device)
    prompt = torch.randn(1, spec.text_len, spec.transformer["text_dim"], generator=g).to(device, model_dtype(device))
    return Setup(spec, device, frames, height, width, steps, experts, noise, prompt, scheduler, route)


class StepTimer:
    """Per-step device time without a host sync inside the loop (CUDA events; host clock on CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def mark(self) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def transformer_call(s: Setup, model, latents: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """One denoiser forward as WanPipeline makes it (guidance 1.0: one call). Returns (noise_pred, skipped)."""
    if s.spec.expand_timesteps:  # TI2V: a timestep per token (all equal for text-to-video)
        f, hw = s.grid
        timestep = t.expand(1, f * hw)  # [B, N]
    else:
        timestep = t.expand(1)  # [B]
    with model.cache_context("cond"):
        pred = model(
            hidden_states=latents.to(s.prompt.dtype),
            timestep=timestep,
            encoder_hidden_states=s.prompt,
            return_dict=False,
        )[0]
        return pred, magcache_skipped(model)


def denoise(s: Setup, state: FISState | None) -> tuple[torch.Tensor, list[float], list[int]]:
    """All denoising steps. Returns (final latents [1, C, F, H, W], seconds per step, MagCache-skipped steps)."""
    s.scheduler.set_timesteps(s.steps, device=s.device)
    s.scheduler.set_begin_index(0)  # no timestep lookup (a host sync) inside step()
    for m in s.experts:
        m._reset_stateful_cache()  # MagCache residuals of the previous generation
    if state is not None:
        state.begin(s.steps)
    latents, skipped = s.noise.clone(), []
    timer = StepTimer(s.device)
    timer.mark()
    for i, t in enumerate(s.scheduler.timesteps):
        if state is not None:
            state.step = i
        pred, skip = transformer_call(s, s.experts[s.route[i]], latents, t)
        if skip:
            skipped.append(i)
        latents = s.scheduler.step(pred, t, latents, return_dict=False)[0]
        timer.mark()
    return latents, timer.seconds(), skipped


def magcache_skipped(model) -> bool:
    """Did MagCache reuse the cached residual in the forward that just ran? (read inside its cache_context)"""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.mag_cache import _MAG_CACHE_LEADER_BLOCK_HOOK

    hook = HookRegistry.check_if_exists_or_initialize(model.blocks[0]).get_hook(_MAG_CACHE_LEADER_BLOCK_HOOK)
    return hook is not None and not hook.state_manager.get_state().should_compute


def attach(s: Setup, fis: FISConfig | None, magcache: bool) -> FISState | None:
    """FIS hooks first, MagCache on top: a skipped step then never enters the FIS hooks."""
    from diffusers.hooks import MagCacheConfig

    state = None
    if fis is not None:
        for m in s.experts:
            state = apply_fis(m, fis, state=state)  # one state: both experts see the same step
    if magcache:
        for e, m in enumerate(s.experts):
            owned = [i for i, r in enumerate(s.route) if r == e]
            if owned:
                ratios = [0.0 if i == s.steps - 1 else 1.0 for i in owned]
                m.enable_cache(MagCacheConfig(**MAGCACHE_FORCE, num_inference_steps=len(owned), mag_ratios=ratios))
    return state


def detach(s: Setup) -> None:
    """Reverse order of attach: diffusers re-links a removed hook's successor, so the outer hook goes first."""
    from diffusers.hooks import HookRegistry

    for m in s.experts:
        if m.is_cache_enabled:
            m.disable_cache()
        if HookRegistry.check_if_exists_or_initialize(m).get_hook(MODEL_HOOK) is not None:
            remove_fis(m)


def fidelity(x: torch.Tensor, ref: torch.Tensor) -> dict:
    """Relative L2 error of the final latents vs dense, overall and per latent frame (paper Eq. 6)."""
    x, ref = x.float(), ref.float()  # [1, C, F, H, W]
    err = (x - ref).transpose(1, 2).flatten(2)  # [1, F, C*H*W]
    base = ref.transpose(1, 2).flatten(2)
    per_frame = (err.norm(dim=2) / base.norm(dim=2))[0]  # [F]
    return {
        "rel_l2": (err.norm() / base.norm()).item(),
        "frame_err": [round(v, 6) for v in per_frame.tolist()],
        "frame_err_mean": per_frame.mean().item(),
        "frame_err_max": per_frame.max().item(),
    }


def _reset_memory(device) -> None:
    """Between rows: drop what a failed row's traceback still holds, then start a fresh peak."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def is_oom(e: BaseException) -> bool:
    """torch's OOM, or a library's allocation failure surfacing as a RuntimeError (cuDNN, cuBLAS workspaces)."""
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _failure(e: BaseException) -> str:
    if is_oom(e):
        return "OOM"
    traceback.print_exc(file=sys.stderr)
    return f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]


def measure_row(s: Setup, row: Row, warmup: int, repeats: int, dense: dict | None) -> dict:
    """Warm-up, then `repeats` timed generations (median). Any failure becomes the row's status."""
    out = {"name": row.name, "ablation": row.ablation, "magcache": row.magcache, "status": "ok"}
    start = time.perf_counter()
    try:
        fis = row.fis(s.family)
        out["fis"] = None if fis is None else fis.to_dict()
        _reset_memory(s.device)
        state = attach(s, fis, row.magcache)
        for _ in range(warmup):
            denoise(s, state)
        runs = [denoise(s, state) for _ in range(repeats)]
        latents, _, skipped = runs[-1]
        out["peak_gib"] = _peak_gib(s.device)
        totals = [sum(r[1]) for r in runs]
        out["latency_s"] = statistics.median(totals)
        out["latencies_s"] = totals
        out["step_s"] = [statistics.median(r[1][i] for r in runs) for i in range(s.steps)]
        out["skipped_steps"] = skipped
        out["flops_P"] = s.flops(fis, skipped) / UNIT
        out["tflops"] = out["flops_P"] * UNIT / out["latency_s"] / 1e12
        out["finite"] = bool(torch.isfinite(latents).all())
        out["latent_rms"] = latents.float().pow(2).mean().sqrt().item()
        if not out["finite"]:
            out["status"] = "non-finite output"
        if row.name == "Dense":
            out["latents"] = latents  # the reference of every later row; dropped before JSON
        elif dense is not None:
            out["speedup"] = dense["latency_s"] / out["latency_s"]
            out.update(fidelity(latents, dense["latents"]))
            if out["peak_gib"] is not None:
                out["peak_vs_dense_pct"] = 100 * (out["peak_gib"] / dense["peak_gib"] - 1)
    except Exception as e:  # OOM or a broken row: report it, keep the others
        out["status"] = _failure(e)
    finally:
        detach(s)
        out["wall_s"] = time.perf_counter() - start
        _reset_memory(s.device)
    return out


COMPILE_SHAPE_S = 45.0  # allowance per new token count under --compile (inductor, one block graph)


def estimate_row_s(s: Setup, row: Row, dense: dict | None, generations: int, new_shapes: int = 0) -> float:
    """Rough wall time of a row from the dense row: latency scales with FLOPs, with a floor for the dense step."""
    if dense is None:
        return 0.0
    ratio = s.flops(row.fis(s.family)) / s.flops()
    if row.magcache:
        ratio *= 1 - 1 / s.steps
    return generations * dense["latency_s"] * max(ratio, 0.3) + new_shapes * COMPILE_SHAPE_S + 5.0


class Budget:
    """Wall-clock guard: a stage that would end past `seconds` is skipped and says so."""

    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def refuse(self, estimate: float) -> str | None:
        e = self.elapsed()
        if e + estimate <= self.seconds:
            return None
        return f"skipped: time budget ({e:.0f} s + ~{estimate:.0f} s > {self.seconds:.0f} s)"


# ---- the whole run --------------------------------------------------------------------------------------------
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
    if o.attention_backend != "auto" and o.attention_backend not in backends:
        raise BenchError(f"unknown attention backend {o.attention_backend!r}; valid: auto, {', '.join(backends)}")
    if not o.tiny and not torch.cuda.is_available():
        raise BenchError("no CUDA device: the real-size benchmark needs a GPU (use --tiny for the CPU smoke run)")
    parse_rows(o.rows, o.ablations)


def check_rows(rows: list[Row], spec: ModelSpec, latent_frames: int, steps: int) -> None:
    """Every row's FIS config must fit this model and request: fail before any GPU time is spent."""
    for row in rows:
        try:
            fis = row.fis(model_family(spec.transformer))
            if fis is not None:
                fis.resolve(spec.transformer["num_layers"], latent_frames, steps)
        except FISConfigError as e:
            raise BenchError(f"row {row.name}: {e}") from None


@torch.no_grad()  # like the pipelines' __call__
def run(o: Options) -> dict:
    """Sweep -> build -> rows (Dense, FIS, MagCache) -> profile -> ablations -> VAE; JSON saved after each stage."""
    from engine.bench import kernels as K

    from .report import environment, save

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
    grids = K.sweep_grids(spec, frames, sizes)

    if o.attention_sweep:  # first: it decides the backend of everything after it
        print("attention sweep ...", flush=True)
        report["sweep"] = K.attention_sweep(spec, device, grids, o.sweep_compile)
        save(report, o.out_json)
    backend, why = K.choose_backend(o.attention_backend, report.get("sweep"), spec, device, grids)
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
        report["vae"] = {"status": refused} if refused else K.time_vae_decode(s, dense["latents"] if dense else s.noise)
    report["elapsed_s"] = budget.elapsed()
    for r in report["rows"]:
        r.pop("latents", None)
    save(report, o.out_json)
    return report


def _profile(s: Setup, o: Options, budget: Budget, dense: dict | None) -> dict:
    from .kernels import profile_sparse_step

    step_s = dense["latency_s"] / s.steps if dense else 0.0
    refused = budget.refuse(5 * step_s + 10)  # 5 sparse step calls (each under a dense one), plus the profiler
    return {"status": refused} if refused else profile_sparse_step(s, o.out_json)


def _row_line(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['name']}: {r['status']}"
    extra = f", speedup {r['speedup']:.2f}x, rel L2 {r['rel_l2']:.4f}" if "speedup" in r else ""
    return f"{r['name']}: {r['latency_s']:.3f} s, {r['flops_P']:.3f} PFLOP, {r['tflops']:.0f} TFLOP/s{extra}"
