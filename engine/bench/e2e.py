"""End-to-end benchmark (issue 14): the whole video on one GPU, part by part, and cache-dit in the same process.

A user waits for text encoding, the denoising loop, the VAE decode and the mp4, not for the DiT alone. One
process builds one real-size random-weight pipeline (the real umT5-XXL text encoder and VAE config, the DiT experts
in bf16, all on the GPU; engine/models/random.py) and measures:

  parts    text encode (umT5-XXL at 512 tokens; optionally HunyuanVideo 1.5's Qwen2.5-VL-7B language model), VAE
           decode in fp32 and bf16 (+ the bf16 video's PSNR against fp32), the decode of a 1/N band of latent rows
           (what one of N ranks decodes in parallel/vae.py, halos aside: the bound for N GPUs), the mp4 write
  phases   DiT configurations, each a Worker on the same pipeline (engine/runtime/worker.py, the one attach order):
           eager PyTorch attention, FA3, torch.compile, FP8 and their combinations; then cache-dit's fastest dense
           setting (engine/bench/cachedit.py) on experts rebuilt from the same seeds
  rows     Dense, FIS-Balanced, FIS-Fast in every phase, timed per step: one dense step and one sparse step (the
           anchors depend on the block, not on the step, so every sparse step of a plan costs the same), warm-up,
           then the median of the repeats, device-synchronised (CUDA events). A generation's denoise time is
           extrapolated as (sparse steps x sparse step) + (dense steps x dense step); its end-to-end time as text +
           denoise + decode + mp4. Labelled `per-step extrapolation` in every table.
  whole    selected (phase, row) pairs also run as one whole generation through Worker.generate (cache-dit: through
           the diffusers pipeline call) plus the mp4 write: measured, not extrapolated.

Every ratio compares rows of the same run. A wall-clock budget (engine/bench/rows.Budget) skips what would end past
it, and the JSON is written after every stage. FP8 replaces weights in place, so the phases run in a fixed order
(bf16 first); cache-dit changes process-wide compile settings, so it runs last.

    python launch/bench_e2e.py --model wan2.2-a14b --resolution 720p --phases eager,fa3,fa3-compile --out-json X.json
    python launch/bench_e2e.py --tiny        # CPU smoke run of every code path, seconds
"""

from __future__ import annotations

import dataclasses
import gc
import time
from dataclasses import dataclass

import torch

from engine import compat
from engine.hooks.attention_backend import FA3, fa3_missing
from engine.hooks.compile import MODES as COMPILE_MODES
from engine.hooks.quantize import fp8_missing
from engine.models.random import MODELS, build_random_pipeline, build_transformer
from engine.models.wan import RESOLUTIONS
from engine.runtime import timing
from engine.runtime.request import GenerationRequest
from engine.runtime.worker import Worker, WorkerConfig
from fis import UNIT

from . import cachedit
from .parts import PROMPT, time_mp4, time_qwen, time_text, time_vae
from .report import environment, save
from .rows import COMPILE_SHAPE_S, ROWS, BenchError, Budget, check_rows
from .setup import build_setup, failure, transformer_call

ROW_NAMES = ("Dense", "FIS-Balanced", "FIS-Fast")
TINY_VIDEO = (21, 64, 64)  # --tiny: 6 latent frames (stride 5 still interpolates some), 8 x 8 latent rows


@dataclass(frozen=True)
class Phase:
    """One DiT configuration: what a Worker attaches (quantisation, attention backend, compile), or cache-dit's."""

    name: str
    attention_backend: str | None = None
    compile: bool = False
    quantize: str = "off"
    cache_dit: bool = False

    def needs(self, device: torch.device) -> list[str]:
        """What this machine lacks for the phase ([]: it runs)."""
        if self.cache_dit:
            reason = cachedit.missing()
            return [reason] if reason else []
        out = fa3_missing(device) if self.attention_backend == FA3 else []
        return out + (fp8_missing(device) if self.quantize == "fp8" else [])


# In the order they run: bf16 phases before the FP8 ones (quantisation is in place), cache-dit last.
PHASES = {
    p.name: p
    for p in (
        Phase("eager"),
        Phase("fa3", attention_backend=FA3),
        Phase("compile", compile=True),
        Phase("fa3-compile", attention_backend=FA3, compile=True),
        Phase("fp8", quantize="fp8"),
        Phase("fp8-fa3-compile", attention_backend=FA3, compile=True, quantize="fp8"),
        Phase("cache-dit", cache_dit=True),
    )
}
# text: umT5-XXL; vae: the fp32 decode of the whole video (+ postprocess); vae-bf16: the bf16 decode and its PSNR;
# shards: 1/N bands; mp4: the write; qwen: HunyuanVideo 1.5's text encoder
PARTS = ("text", "vae", "vae-bf16", "shards", "mp4", "qwen")


@dataclass
class Options:
    model: str = "wan2.2-a14b"
    resolution: str = "720p"
    phases: str = "eager,fa3,fa3-compile,fp8-fa3-compile,cache-dit"  # name[=Row+Row]: that phase's rows only
    rows: str = ",".join(ROW_NAMES)
    whole: str = "fp8-fa3-compile=FIS-Balanced,cache-dit=Dense"  # phase=Row+Row: also one whole generation each
    parts: str = "text,vae,vae-bf16,shards,mp4"
    compile_mode: str = "auto"  # static: a graph per token count; auto: dense static + one dynamic for the anchors
    vae_dtype: str = "fp32"  # the decode the end-to-end totals use
    repeats: int = 2
    warmup: int = 1
    frames: int = 81
    steps: int = 4
    seed: int = 0
    tiny: bool = False
    max_seconds: float = 540.0
    out_json: str | None = None
    command: str = ""


def _rows_of(names: str) -> list[str]:
    known = {n.lower(): n for n in ROW_NAMES}
    out = []
    for n in (x.strip() for x in names.replace("+", ",").split(",") if x.strip()):
        if n.lower() not in known:
            raise BenchError(f"unknown row {n!r}; valid: {', '.join(ROW_NAMES)}")
        out.append(known[n.lower()])
    return sorted(set(out), key=ROW_NAMES.index)


def parse_plan(o: Options) -> tuple[list[tuple[Phase, list[str]]], dict[str, list[str]]]:
    """([(phase, its rows)] in run order, {phase: rows also run whole}). cache-dit measures Dense only."""
    default = _rows_of(o.rows)
    plan = {}
    for item in (x.strip() for x in o.phases.split(",") if x.strip()):
        name, _, rows = item.partition("=")
        if name not in PHASES:
            raise BenchError(f"unknown phase {name!r}; valid: {', '.join(PHASES)}")
        plan[name] = ["Dense"] if PHASES[name].cache_dit else (_rows_of(rows) if rows else default)
    whole = {}
    for item in (x.strip() for x in o.whole.split(",") if x.strip()):
        name, _, rows = item.partition("=")
        if name not in plan:
            raise BenchError(f"--whole names phase {name!r}, which --phases does not run")
        whole[name] = ["Dense"] if PHASES[name].cache_dit else _rows_of(rows or o.rows)
    order = list(PHASES)
    return [(PHASES[n], plan[n]) for n in sorted(plan, key=order.index)], whole


def validate(o: Options) -> None:
    if o.model not in MODELS:
        raise BenchError(f"unknown model {o.model!r}; valid: {', '.join(MODELS)}")
    if o.resolution not in RESOLUTIONS:
        raise BenchError(f"unknown resolution {o.resolution!r}; valid: {', '.join(RESOLUTIONS)}")
    if o.compile_mode not in COMPILE_MODES or o.compile_mode == "off":
        raise BenchError(f"--compile-mode must be static or auto, got {o.compile_mode!r}")
    if o.vae_dtype not in ("fp32", "bf16"):
        raise BenchError(f"--vae-dtype must be fp32 or bf16, got {o.vae_dtype!r}")
    bad = [p for p in (x.strip() for x in o.parts.split(",")) if p and p not in PARTS]
    if bad:
        raise BenchError(f"unknown part {bad[0]!r}; valid: {', '.join(PARTS)}")
    if o.repeats < 1 or o.warmup < 0 or o.steps < 1 or o.frames < 1 or (o.frames - 1) % 4:
        raise BenchError("--repeats >= 1, --warmup >= 0, --steps >= 1 and --frames 4k+1 (e.g. 81)")
    if not o.tiny and not torch.cuda.is_available():
        raise BenchError("no CUDA device: the real-size benchmark needs a GPU (use --tiny for the CPU smoke run)")
    parse_plan(o)


def versions() -> dict:
    """The packages whose code is timed (None: not installed)."""
    from importlib import metadata

    out = {}
    for name in ("transformers", "fa3-fwd", "torchao", "distvae", "cache-dit"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# ---- DiT phases --------------------------------------------------------------------------------------------
def step_rows(s, state, rows: list[str], o: Options, family: str) -> list[dict]:
    """Per-step timing of every row: the dense step (the last one: dense in every preset) and each FIS row's sparse
    step (step 0), then the extrapolated denoise time."""
    s.scheduler.set_timesteps(s.steps, device=s.device)
    ts = s.scheduler.timesteps
    warm, reps = (0, 1) if o.tiny else (o.warmup, o.repeats)

    def one_step(step: int, fis) -> float:
        state.begin(s.steps, fis)
        state.step = step
        model = s.experts[s.route[step]]
        return timing.time_fn(lambda: transformer_call(s, model, s.noise, ts[step]), s.device, warm, reps)

    dense = one_step(s.steps - 1, None)
    out = []
    for name in rows:
        fis = ROWS[name].fis(family)
        r = {"name": name, "dense_step_s": dense, "status": "ok", "timing": "per-step extrapolation"}
        if fis is None:
            sparse_steps = 0
        else:
            plan = fis.resolve(s.spec.transformer["num_layers"], s.grid[0], s.steps)
            sparse_steps = sum(plan.step_is_sparse(i) for i in range(s.steps))
            r["sparse_step_s"] = one_step(0, fis)
            r["fis"] = fis.to_dict()
        r["sparse_steps"] = sparse_steps
        r["denoise_s"] = sparse_steps * r.get("sparse_step_s", 0.0) + (s.steps - sparse_steps) * dense
        r["flops_P"] = s.flops(fis) / UNIT
        r["tflops"] = r["flops_P"] * UNIT / r["denoise_s"] / 1e12
        out.append(r)
    state.begin(1, None)
    return out


def whole_worker(worker: Worker, o: Options, frames: int, height: int, width: int, name: str, family: str) -> dict:
    """One whole generation through the engine (Worker.generate: text, denoise, decode) and its mp4 write."""
    fis = ROWS[name].fis(family)
    req = GenerationRequest(PROMPT, "", height, width, frames, o.steps, guidance=1.0, seed=o.seed, fis=fis)
    r = worker.generate(req)
    m = r["metrics"]
    mp4 = time_mp4(r["frames"])
    parts = dict(text_s=m["text_encode_s"], denoise_s=m["denoise_s"], decode_s=m["decode_s"], mp4_s=mp4["mp4_s"])
    return {
        "name": name,
        "timing": "whole generation",
        "status": "ok",
        "step_s": m["step_s"],
        **parts,
        "total_s": sum(parts.values()),
        "peak_gib": m["peak_memory_gib"],
        "decode": m["decode"],
    }


def whole_pipeline(pipe, device, o: Options, frames: int, height: int, width: int) -> dict:
    """One whole generation through the diffusers pipeline call, as a cache-dit user runs it, and its mp4 write."""
    from engine.models.wan import text_len

    t0 = timing.now(device)
    pos, _ = pipe.encode_prompt(
        PROMPT, do_classifier_free_guidance=False, max_sequence_length=text_len(pipe), device=device
    )
    marks = [timing.now(device)]

    def on_step(p, i, t, kw):
        marks.append(timing.now(device))
        return {}

    out = pipe(
        prompt_embeds=pos,
        height=height,
        width=width,
        num_frames=frames,
        num_inference_steps=o.steps,
        guidance_scale=1.0,
        generator=torch.Generator("cpu").manual_seed(o.seed),  # the engine's noise: same seed, same generator
        output_type="np",
        callback_on_step_end=on_step,
    )
    end = timing.now(device)
    mp4 = time_mp4(out.frames[0])
    steps = [b - a for a, b in zip(marks, marks[1:])]
    parts = dict(text_s=marks[0] - t0, denoise_s=sum(steps), decode_s=end - marks[-1], mp4_s=mp4["mp4_s"])
    return {
        "name": "Dense",
        "timing": "whole generation",
        "status": "ok",
        "step_s": steps,
        **parts,
        "total_s": sum(parts.values()),
        "peak_gib": timing.peak_gib(device),
    }


def estimate_phase_s(phase: Phase, rows: list[str], whole: list[str], ref: dict | None, o: Options) -> float:
    """Rough wall time of a phase from the first dense step measured (0 before it is known: the first phase always
    runs): its step scaled by what the phase speeds up (issue 14's kernel measurements), compiles at COMPILE_SHAPE_S
    per graph, whole generations, a rebuild for cache-dit."""
    if ref is None:
        return 0.0
    fast = phase.cache_dit
    factor = (0.9 if fast or phase.attention_backend else 1.0) * (0.88 if fast or phase.compile else 1.0)
    factor *= 0.8 if fast or phase.quantize == "fp8" else 1.0
    step = ref["dense_step_s"] * factor
    calls = 1 if o.tiny else o.warmup + o.repeats
    per = calls * step * (1 + 0.45 * sum(r != "Dense" for r in rows))  # a sparse step ~ 0.45 of a dense one
    if fast:
        graphs = 2  # one static graph, its inductor tuning (cache-dit's set_compile_configs) about doubles it
    elif not phase.compile:
        graphs = 0
    else:
        graphs = 2 if o.compile_mode == "auto" else 1 + 2 * sum(r != "Dense" for r in rows)
    gens = len(whole) * (o.steps * step + 12.0)
    return per + graphs * (0 if o.tiny else COMPILE_SHAPE_S) + gens + (20.0 if fast else 0.0) + 10.0


def run_phase(pipe, s, phase: Phase, rows: list[str], whole: list[str], o: Options, geometry, family: str) -> dict:
    out = {"phase": phase.name, "rows": [], "whole": [], "status": "ok"}
    device = s.device
    compile = (o.compile_mode if not o.tiny else "off") if phase.compile else "off"  # --tiny: no inductor on CPU
    out["config"] = dict(attention_backend=phase.attention_backend, compile=compile, quantize=phase.quantize)
    worker, settings = None, None
    try:
        if phase.cache_dit:
            settings = compat.compile_settings()  # cache-dit sets its own, process-wide; put back after
            out["cache_dit"] = _cache_dit_setup(pipe, s, o, device)
            s = dataclasses.replace(
                s, experts=[pipe.transformer] + ([pipe.transformer_2] if s.spec.experts > 1 else [])
            )
            state = _NoFIS()
        else:
            cfg = WorkerConfig(
                model=f"random:{o.model}",
                attention_backend=phase.attention_backend,
                compile=compile,
                quantize=phase.quantize,
                vae_dtype=o.vae_dtype,
            )
            worker = Worker(cfg, pipe=pipe)
            pipe.set_progress_bar_config(disable=True)
            out["config"]["attention_backend_choice"] = worker.attention[1]
            out["config"]["quantized"] = worker.attached.quantized
            s = dataclasses.replace(s, experts=worker.transformers)
            state = worker.fis
        out["rows"] = step_rows(s, state, rows, o, family)
        for name in whole:
            r = (
                whole_pipeline(pipe, device, o, *geometry)
                if phase.cache_dit
                else whole_worker(worker, o, *geometry, name, family)
            )
            out["whole"].append(r)
    except Exception as e:  # a phase that cannot run here (OOM, a kernel) is reported; the next one runs
        out["status"] = failure(e)
    finally:
        if worker is not None:
            worker.attached.remove()
            for t in worker.transformers:
                t.reset_attention_backend()
            del worker
        if settings is not None:
            compat.restore_compile_settings(settings)
        gc.collect()
        timing.free_memory(device)
    return out


class _NoFIS:
    """cache-dit's rows are dense: a stand-in for the FIS state the step timer sets."""

    def begin(self, *args, **kwargs):
        pass

    step = 0


def fresh_experts(pipe, s, o: Options) -> None:
    """The DiT experts rebuilt from their seeds: the same weights (deterministic initialisation on the device) in
    bf16, after a phase converted them in place (FP8) or cache-dit set them up its own way."""
    pipe.transformer, pipe.transformer_2 = None, None
    gc.collect()
    compat.reset_compiled()  # compiled graphs hold the old modules
    timing.free_memory(s.device)
    dtype = timing_dtype(s.device)
    experts = [build_transformer(s.spec.transformer, s.device, o.seed + i, dtype) for i in range(s.spec.experts)]
    pipe.transformer = experts[0]
    pipe.transformer_2 = experts[1] if len(experts) > 1 else None


def _cache_dit_setup(pipe, s, o: Options, device) -> dict:
    """Fresh experts (cache-dit quantises and compiles its own), then cache-dit's fastest dense setting on them."""
    fresh_experts(pipe, s, o)
    experts = [t for t in (pipe.transformer, pipe.transformer_2) if t is not None]
    done = cachedit.apply(experts, device, compile=not o.tiny)
    return {"version": cachedit.version(), **done}


def timing_dtype(device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# ---- the run -------------------------------------------------------------------------------------------------
@torch.no_grad()
def run(o: Options) -> dict:
    """Build -> parts -> phases (their rows, then their whole generations); JSON saved after each stage."""
    validate(o)
    budget = Budget(o.max_seconds)
    spec = MODELS[o.model].tiny() if o.tiny else MODELS[o.model]
    device = torch.device("cpu" if o.tiny else "cuda")
    dtype = timing_dtype(device)
    frames, height, width = TINY_VIDEO if o.tiny else (o.frames, *spec.size(o.resolution))
    f, hw = spec.dims.latent_grid(frames, height, width)
    plan, whole = parse_plan(o)
    check_rows([ROWS[n] for n in ROW_NAMES], spec, f, o.steps)  # every FIS row fits: fail before any build
    parts = {p.strip() for p in o.parts.split(",") if p.strip()}
    report = {
        **environment(device, o.command),
        "kind": "e2e",
        "packages": versions(),
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
        "compile_mode": o.compile_mode,
        "vae_dtype": o.vae_dtype,
        "max_seconds": o.max_seconds,
        "rows": [],  # report.save's field; the phases hold the rows
        "parts": {},
        "phases": [],
    }
    print(f"building {spec.name} with its text encoder and VAE ...", flush=True)
    t = time.perf_counter()
    pipe = build_random_pipeline(o.model, device, dtype, o.seed, text="real", spec=spec)
    pipe.set_progress_bar_config(disable=True)
    base = build_setup(dataclasses.replace(spec, experts=0), device, frames, height, width, o.steps, o.seed)
    pos, _ = pipe.encode_prompt(
        PROMPT, do_classifier_free_guidance=False, max_sequence_length=spec.text_len, device=device
    )
    s = dataclasses.replace(base, spec=spec, prompt=pos.to(dtype))
    report["build_s"] = time.perf_counter() - t
    report["flops_dense_P"] = s.flops() / UNIT
    save(report, o.out_json)

    frames_np = None
    for part in ("text", "vae", "mp4"):
        if part not in parts:
            continue
        print(f"part {part} ...", flush=True)
        try:
            if part == "text":
                report["parts"]["text"] = time_text(pipe, device, o)
            elif part == "vae":
                report["parts"]["vae"], frames_np = time_vae(pipe, s.noise, device, o, parts)
            else:
                if frames_np is None:  # no decode measured: the frames of one decode, untimed
                    video = pipe.vae.decode(s.noise.float(), return_dict=False)[0]
                    frames_np = pipe.video_processor.postprocess_video(video, output_type="np")[0]
                report["parts"]["mp4"] = time_mp4(frames_np)
        except Exception as e:
            report["parts"][part] = {"status": failure(e)}
        save(report, o.out_json)
    frames_np = None

    ref = None  # the first Dense step measured (the eager one when it runs): the budget's yardstick
    for phase, rows in plan:
        missing = phase.needs(device)
        refused = budget.refuse(estimate_phase_s(phase, rows, whole.get(phase.name, []), ref, o))
        if missing or refused:
            status = ("skipped: needs " + " and ".join(missing)) if missing else refused
            report["phases"].append({"phase": phase.name, "status": status, "rows": [], "whole": []})
        else:
            print(f"phase {phase.name} ...", flush=True)
            t = time.perf_counter()
            result = run_phase(pipe, s, phase, rows, whole.get(phase.name, []), o, (frames, height, width), s.family)
            result["wall_s"] = time.perf_counter() - t
            report["phases"].append(result)
            if ref is None and result["rows"]:
                ref = result["rows"][0]
        print("  " + _phase_line(report["phases"][-1]), flush=True)
        summarise(report)
        save(report, o.out_json)
    if "qwen" in parts:  # last: 15 GB of weights built, timed and freed
        refused = budget.refuse(30.0)
        report["parts"]["qwen"] = {"status": refused} if refused else _guard(lambda: time_qwen(device, dtype, o))
    report["elapsed_s"] = budget.elapsed()
    summarise(report)
    save(report, o.out_json)
    return report


def _guard(fn) -> dict:
    try:
        return fn()
    except Exception as e:
        return {"status": failure(e)}


def summarise(report: dict) -> None:
    """End-to-end totals of every row (text + denoise + decode + mp4 of this run's parts) and the same-run ratios:
    vs the eager Dense row (`speedup`, DiT and end to end) and vs cache-dit's dense (`vs_cache_dit`)."""
    p = report["parts"]
    decode = p.get("vae", {}).get(f"decode_{report['vae_dtype']}_s")
    fixed = None
    if decode is not None and "text_s" in p.get("text", {}) and "mp4_s" in p.get("mp4", {}):
        fixed = p["text"]["text_s"] + decode + p["vae"]["postprocess_s"] + p["mp4"]["mp4_s"]
    report["fixed_s"] = fixed  # what every row adds to its denoise time
    rows = [(ph, r) for ph in report["phases"] for r in ph.get("rows", []) if r.get("status") == "ok"]
    for _, r in rows:
        r["total_s"] = None if fixed is None else fixed + r["denoise_s"]
    ref = next((r for ph, r in rows if ph["phase"] == "eager" and r["name"] == "Dense"), None)
    cd = next((r for ph, r in rows if ph["phase"] == "cache-dit"), None)
    for _, r in rows:
        if ref is not None:
            r["speedup"] = ref["denoise_s"] / r["denoise_s"]
            if r["total_s"] and ref["total_s"]:
                r["speedup_e2e"] = ref["total_s"] / r["total_s"]
        if cd is not None:
            r["vs_cache_dit"] = cd["denoise_s"] / r["denoise_s"]
            if r["total_s"] and cd["total_s"]:
                r["vs_cache_dit_e2e"] = cd["total_s"] / r["total_s"]
    cd_whole = next((w for ph in report["phases"] if ph["phase"] == "cache-dit" for w in ph.get("whole", [])), None)
    for ph in report["phases"]:
        for w in ph.get("whole", []):
            if cd_whole is not None and w is not cd_whole and w.get("status") == "ok":
                w["vs_cache_dit"] = cd_whole["total_s"] / w["total_s"]


def _phase_line(ph: dict) -> str:
    if ph["status"] != "ok":
        return f"{ph['phase']}: {ph['status']}"
    rows = ", ".join(f"{r['name']} {r['denoise_s']:.3f} s" for r in ph["rows"])
    whole = ", ".join(f"{w['name']} whole {w['total_s']:.2f} s" for w in ph["whole"] if w["status"] == "ok")
    return f"{ph['phase']}: {rows}" + (f"; {whole}" if whole else "")
