"""Kernel-level measurements for the benchmark: attention backends and torch.compile on one real-size block,
the profile of one sparse step (FIS glue share, host syncs), and VAE decode time.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch

from engine.errors import one_line
from engine.hooks.attention_backend import backend_name, set_attention_backend
from engine.hooks.compile import raise_recompile_limit
from engine.hooks.fis import profile_glue
from engine.models import preset_family
from engine.models.random import build_block, default_dtype
from engine.runtime.device import pick_dtype
from engine.runtime.presets import load_fis
from engine.runtime.timing import free_memory, peak_gib, time_fn
from fis.flops import block_flops

from .setup import Setup, attach, failure, is_oom, transformer_call

# diffusers backends worth timing on an H100; the ones whose package is missing fail fast and say so.
# _native_math is left out: it materialises the N x N scores (86 GB at 480p). fa3 is FlashAttention-3 from fa3-fwd
# (engine/hooks/attention_backend.py); diffusers' own _flash_3 needs the upstream FA3 build.
CANDIDATES = ("_native_cudnn", "_native_flash", "native", "_native_efficient", "flash", "fa3", "_flash_3", "sage")
GLUE = "fis_glue"
COMPILE_SWEEP_S = 150.0  # no new shape is compiled in the sweep after this long: the rows matter more


def sweep_grids(spec, frames: int, sizes: list[tuple[str, tuple[int, int]]]) -> list[dict]:
    """Token grids to time a block on, one per (label, (height, width)), with the anchor counts the balanced
    preset produces there (s=3 on 21 latent frames: 8 and 9)."""
    fis = load_fis("balanced", preset_family(spec.transformer))
    p = spec.transformer["patch_size"]
    out = []
    for label, (h, w) in sizes:
        f, _ = spec.dims.latent_grid(frames, h, w)
        plan = fis.resolve(spec.transformer["num_layers"], f, fis.dense_steps + 1)  # step 0 is the sparse one
        anchors = sorted({c for c in plan.anchor_counts(0) if c is not None})
        out.append(
            dict(resolution=label, frames=f, h=h // spec.vae_s // p[1], w=w // spec.vae_s // p[2], anchors=anchors)
        )
    return out


def block_inputs(spec, frames: int, h: int, w: int, device: torch.device) -> tuple:
    """(hidden, context, temb, rope) of one block call on `frames` latent frames of an h x w token grid."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    c = spec.transformer
    dim, n = c["num_attention_heads"] * c["attention_head_dim"], frames * h * w
    with torch.device(device):
        rope = WanRotaryPosEmbed(c["attention_head_dim"], c["patch_size"], c["rope_max_seq_len"])
        p_t, p_h, p_w = c["patch_size"]
        cos_sin = rope(torch.empty(1, 1, frames * p_t, h * p_h, w * p_w, device="meta"))  # 2 x [1, N, 1, D] fp32
        with default_dtype(pick_dtype("auto", device)):
            hidden = torch.randn(1, n, dim)  # [B, N, C]
            context = torch.randn(1, spec.text_len, dim)  # [B, L, C], after the text projection
            temb = torch.randn(1, n, 6, dim) if spec.expand_timesteps else torch.randn(1, 6, dim)
    return hidden, context, temb, cos_sin


def attention_sweep(
    spec, device: torch.device, grids: list[dict], compile_mode: str = "off", dense_only: bool = False
) -> dict:
    """Every backend on one block (dense and on the smallest anchor count), plus attention alone; then the block
    under torch.compile with the fastest backend at the first grid's dense and every anchor token count."""
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

    c = spec.transformer
    heads, hd = c["num_attention_heads"], c["attention_head_dim"]
    block = build_block(c, device, pick_dtype("auto", device))
    entries = []
    for g in grids:
        for frames in [g["frames"]] if dense_only else [g["frames"], g["anchors"][0]]:
            inputs = block_inputs(spec, frames, g["h"], g["w"], device)
            n = inputs[0].shape[1]
            for backend in CANDIDATES:
                e = dict(resolution=g["resolution"], frames=frames, tokens=n, backend=backend, status="ok")
                try:
                    set_attention_backend(block, backend)
                    sec = time_fn(lambda: block(*inputs), device)  # noqa: B023 - called here, in this iteration
                    e.update(block_ms=sec * 1e3, block_tflops=block_flops(spec.dims, n) / sec / 1e12)
                    if not dense_only:
                        q, k, v = (
                            torch.randn(1, n, heads, hd, device=device, dtype=pick_dtype("auto", device)) for _ in "qkv"
                        )
                        name = AttentionBackendName(backend_name(backend))
                        sec = time_fn(lambda: dispatch_attention_fn(q, k, v, backend=name), device)  # noqa: B023
                        e.update(attn_ms=sec * 1e3, attn_tflops=4 * n * n * heads * hd / sec / 1e12)
                        del q, k, v
                except Exception as err:
                    e["status"] = _short(err)
                entries.append(e)
            inputs = None  # noqa: F841 - free before the next grid's inputs are made
            free_memory(device)
    out = {"entries": entries, "grids": grids}
    if compile_mode != "off":
        out["compile"] = _compile_sweep(spec, block, device, grids[0], best_backend(entries, grids[0]), compile_mode)
    block = None  # noqa: F841 - drop the weights before the next stage measures memory
    free_memory(device)
    return out


def _compile_sweep(spec, block, device, grid: dict, backend: str | None, mode: str) -> dict:
    """Compile time and steady speed of the compiled block at each token count FIS produces at this grid."""
    from engine.compat import dynamo_counters

    counters = dynamo_counters()

    res = {"backend": backend, "mode": mode, "resolution": grid["resolution"], "shapes": []}
    start = time.perf_counter()
    try:
        set_attention_backend(block, backend)
        raise_recompile_limit()
        compiled = torch.compile(block.forward, dynamic=None if mode == "auto" else False)
        for frames in [grid["frames"], *grid["anchors"]]:
            if time.perf_counter() - start > COMPILE_SWEEP_S:
                res["status"] = f"stopped after {COMPILE_SWEEP_S:.0f} s of compiling"
                break
            inputs = block_inputs(spec, frames, grid["h"], grid["w"], device)
            graphs = counters["stats"]["unique_graphs"]
            t = time.perf_counter()
            compiled(*inputs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            first = time.perf_counter() - t
            steady = time_fn(lambda: compiled(*inputs), device)  # noqa: B023 - called in this iteration
            eager = time_fn(lambda: block(*inputs), device)  # noqa: B023
            res["shapes"].append(
                dict(
                    frames=frames,
                    tokens=inputs[0].shape[1],
                    first_call_s=first,
                    compile_s=first - steady,
                    new_graphs=counters["stats"]["unique_graphs"] - graphs,
                    compiled_ms=steady * 1e3,
                    eager_ms=eager * 1e3,
                    speedup=eager / steady,
                )
            )
            inputs = None  # noqa: F841 - free before the next shape's inputs are made
    except Exception as err:
        res["status"] = _short(err)
    return res


def best_backend(entries: list[dict], grid: dict) -> str | None:
    """Fastest backend on the dense block at this grid."""
    ok = [
        e
        for e in entries
        if e["status"] == "ok" and e["resolution"] == grid["resolution"] and e["frames"] == grid["frames"]
    ]
    return min(ok, key=lambda e: e["block_ms"])["backend"] if ok else None


def choose_backend(requested: str, sweep: dict | None, spec, device, grids: list[dict]) -> tuple[str, str]:
    """'auto': the fastest dense block at the run's resolution, from the sweep or a quick eager one."""
    if requested != "auto":
        return requested, "--attention-backend"
    sweep = sweep or attention_sweep(spec, device, grids[:1], dense_only=True)
    best = best_backend(sweep["entries"], grids[0])
    if best is None:
        return "native", "auto: no backend ran in the sweep, torch SDPA"
    times = {
        e["backend"]: e["block_ms"]
        for e in sweep["entries"]
        if e["status"] == "ok" and e["resolution"] == grids[0]["resolution"] and e["frames"] == grids[0]["frames"]
    }
    return best, "auto: fastest dense block at {} ({})".format(
        grids[0]["resolution"], ", ".join(f"{k} {v:.1f} ms" for k, v in sorted(times.items(), key=lambda x: x[1]))
    )


def count_host_syncs(fn) -> tuple[int, list[str]]:
    """Host<->device synchronisations torch reports while fn() runs (CUDA sync debug mode)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    msgs = [
        str(w.message).splitlines()[0]
        for w in caught
        if "synchroniz" in str(w.message) and "is a prototype feature" not in str(w.message)
    ]  # mode's own note
    return len(msgs), msgs[:3]


def profile_sparse_step(s: Setup, out_json: str | None) -> dict:
    """torch.profiler over one sparse FIS-Balanced step (step 0): top kernels, FIS glue as % of the step's device
    time (target <= 3 %) and host syncs inside the step (target 0). The dense step is the Dense row's step 0."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    res = {"row": "FIS-Balanced", "step": 0}
    cuda, attached = s.device.type == "cuda", None
    try:
        attached = attach(s, load_fis("balanced", s.family).replace(name="FIS-Balanced"), False)
        state = attached.state
        s.scheduler.set_timesteps(s.steps, device=s.device)
        t, model = s.scheduler.timesteps[0], s.experts[s.route[0]]
        state.begin(s.steps)
        state.step = 0

        def step():
            transformer_call(s, model, s.noise, t)

        res["sparse_step_s"] = time_fn(step, s.device, warmup=1, reps=2)  # warm-up builds the FIS tables
        if cuda:
            res["host_syncs"], res["sync_messages"] = count_host_syncs(step)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile_glue(GLUE), profile(activities=activities) as prof:
            with torch.profiler.record_function("bench_step"):
                step()
            if cuda:
                torch.cuda.synchronize()
        cpu_events = [e for e in prof.events() if e.device_type == DeviceType.CPU]
        if cuda:
            # device time of the kernels launched under the glue tags, over the step's CUDA-event time
            glue = sum(e.device_time_total for e in cpu_events if e.name == GLUE) / 1e3
            step_ms = res["sparse_step_s"] * 1e3
            key, kinds = "self_device_time_total", (DeviceType.CUDA,)  # top list: kernels, not the ops above them
        else:
            glue = sum(e.cpu_time_total for e in cpu_events if e.name == GLUE) / 1e3
            step_ms = sum(e.cpu_time_total for e in cpu_events if e.name == "bench_step") / 1e3
            key, kinds = "self_cpu_time_total", (DeviceType.CPU,)
        res.update(glue_ms=glue, glue_pct=100 * glue / step_ms, step_ms=step_ms, time_basis=kinds[0].name.lower())
        avgs = sorted(
            (a for a in prof.key_averages() if a.device_type in kinds and a.key not in (GLUE, "bench_step")),
            key=lambda a: getattr(a, key),
            reverse=True,
        )
        res["top"] = [
            dict(
                name=a.key[:90], calls=a.count, self_ms=getattr(a, key) / 1e3, pct=100 * getattr(a, key) / 1e3 / step_ms
            )
            for a in avgs[:25]
        ]
        if out_json:
            Path(out_json).with_suffix(".profile.txt").write_text(prof.key_averages().table(sort_by=key, row_limit=40))
        res["status"] = "ok"
    except Exception as err:
        res["status"] = failure(err)
    finally:
        if attached is not None:
            attached.remove()
        free_memory(s.device)
    return res


def time_vae_decode(s: Setup, latents: torch.Tensor) -> dict:
    """Random-weight AutoencoderKLWan of the model's real config, fp32 like the Wan pipelines load it."""
    from diffusers import AutoencoderKLWan

    res = {"dtype": "fp32"}
    vae = None
    try:
        free_memory(s.device)
        with torch.device(s.device):
            vae = AutoencoderKLWan(**s.spec.vae).eval().requires_grad_(False)
        z = latents.float()  # [1, C, F, H, W]
        with torch.no_grad():
            res["decode_s"] = time_fn(lambda: vae.decode(z, return_dict=False), s.device, warmup=1, reps=1)
        res.update(status="ok", peak_gib=peak_gib(s.device))
    except Exception as err:
        res["status"] = failure(err)
    finally:
        vae = None  # noqa: F841 - free the VAE before measuring what is left
        free_memory(s.device)
    return res


def _short(err: BaseException) -> str:
    return "OOM" if is_oom(err) else one_line(err, 160)
