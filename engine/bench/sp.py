"""Sequence-parallel benchmark: real-size Wan 2.2 A14B with random weights built on every GPU in bf16,
4 steps of 81 frames at 480p and 720p, Dense and FIS-Balanced, for each shard layout and attention implementation.
Prints the time of every step and, from a short torch.profiler run, the share of GPU time spent in all-to-all
(Ulysses) and all-gather (output gather; frame layout: FIS anchors).

    torchrun --nproc_per_node=8 launch/sp_bench.py --out docs/bench/sp8.json
    torchrun --nproc_per_node=1 launch/sp_bench.py --shards spatial --attention diffusers   # 1-GPU baseline
    torchrun --nproc_per_node=2 launch/sp_bench.py --tiny                                   # CPU (gloo) smoke run
"""

from __future__ import annotations

import dataclasses
import importlib.util

import torch

from engine.errors import UserError, one_line
from engine.models import preset_family
from engine.models.random import MODELS, TINY_VIDEO
from engine.runtime.io import write_json
from engine.runtime.presets import load_fis
from engine.runtime.setup import prepare
from engine.runtime.timing import free_memory, median_steps, peak_gib
from parallel import (
    Degrees,
    ParallelContext,
    destroy_parallel,
    init_parallel,
    world_size_from_env,
)

from .setup import denoise, fidelity, setup_for


def rows(spec) -> dict:
    """Dense and the model's FIS-Balanced preset (configs/fis/, as launch/generate.py and launch/bench.py use)."""
    return {"Dense": None, "FIS-Balanced": load_fis("balanced", preset_family(spec.transformer))}


def attach(s, ctx, fis, shard: str, attention: str, backend):
    """FIS (when a config is given), then sequence parallelism: engine/runtime/setup.py's order."""
    kw = {} if fis is None else {"fis": fis}
    return prepare(s.experts, ctx=ctx, shard=shard, sp_attention=attention, attention_backend=backend, **kw)


def measure(s, ctx, row: str, shard: str, attention: str, o, ref=None) -> dict:
    out = {"row": row, "shard": shard, "attention": attention, "status": "ok"}
    if attention == "xfuser" and importlib.util.find_spec("xfuser") is None:
        return {**out, "status": "xfuser not installed"}
    free_memory(s.device)
    att = None
    try:
        att = attach(s, ctx, rows(s.spec)[row], shard, attention, o.attention_backend)
        for _ in range(o.warmup):
            denoise(s, att.state)
        runs = [denoise(s, att.state) for _ in range(o.repeats)]
        step_s = median_steps([r[1] for r in runs])
        out.update(step_s=step_s, total_s=sum(step_s))
        if ref is not None:
            out["rel_l2_vs_1gpu"] = fidelity(runs[-1][0], ref)["rel_l2"]
        if s.device.type == "cuda":
            out["peak_gib"] = peak_gib(s.device)
    except Exception as e:  # noqa: BLE001 - a row's failure (OOM, uneven sizes under xfuser) is its status
        if ctx.is_distributed:  # the other ranks are inside a collective: only stopping them all is safe
            raise
        out["status"] = one_line(e)
    finally:
        if att is not None:
            att.remove()
    return out


def _kind(name: str) -> str | None:
    n = name.lower()
    if any(k in n for k in ("alltoall", "all_to_all", "sendrecv")):  # NCCL runs all_to_all as grouped send/recv
        return "all_to_all"
    if "allgather" in n or "all_gather" in n:
        return "all_gather"
    return None


def profile(s, ctx, shard: str, attention: str, o) -> dict:
    """One FIS-Balanced generation under torch.profiler: communication kernels' share of all kernel time (CPU
    smoke run: of the ops' self CPU time)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = s.device.type == "cuda"
    att = attach(s, ctx, rows(s.spec)["FIS-Balanced"], shard, attention, o.attention_backend)
    try:
        denoise(s, att.state)  # warm-up
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            denoise(s, att.state)
    finally:
        att.remove()
    kind, key = (DeviceType.CUDA, "self_device_time_total") if cuda else (DeviceType.CPU, "self_cpu_time_total")
    totals = {"all_to_all": 0.0, "all_gather": 0.0}
    everything = 0.0
    for a in prof.key_averages():
        if a.device_type != kind:
            continue
        t = getattr(a, key) / 1e3  # ms
        everything += t
        if (k := _kind(a.key)) is not None:
            totals[k] += t
    res = {
        "shard": shard,
        "attention": attention,
        "basis": "cuda kernels" if cuda else "cpu ops",
        "total_ms": everything,
    }
    for k, t in totals.items():
        res[f"{k}_ms"] = t
        res[f"{k}_share"] = t / everything if everything else 0.0
    return res


def run(o) -> dict | None:
    """o: launch/sp_bench.py's arguments."""
    world = world_size_from_env()
    if world % o.ring:
        raise UserError(f"ring degree {o.ring} does not divide {world} processes", "ring")
    ctx = init_parallel(Degrees(ulysses=world // o.ring, ring=o.ring))
    o.device = ctx.device
    spec = MODELS[o.model].tiny() if o.tiny else MODELS[o.model]
    resolutions = ["tiny"] if o.tiny else o.resolutions.split(",")
    shards, attentions = o.shards.split(","), o.attention.split(",")
    report = {
        "model": spec.name,
        "world": world,
        "compile": o.compile,
        "torch": torch.__version__,
        "degrees": dataclasses.asdict(ctx.degrees),
        "rows": [],
        "gpu": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu",
    }
    say = print if ctx.is_main else (lambda *a, **k: None)
    s = None
    for res in resolutions:
        frames, height, width = TINY_VIDEO if o.tiny else (o.frames, *spec.size(res))
        say(f"== {spec.name} {res}: {frames} frames {width}x{height}, {world} processes {ctx.degrees}", flush=True)
        fresh = s is None
        s = setup_for(s, spec, o.device, frames, height, width, o.steps, o.seed)
        if fresh:  # stages 1-2 of engine/runtime/setup.py once (compiled graphs kept); FIS and SP per row
            prepare(s.experts, attention_backend=o.attention_backend, compile=o.compile)
        refs = {}
        if o.check and res == resolutions[0]:  # this GPU alone: every rank computes it, no communication
            alone = ParallelContext(device=ctx.device)
            for row, fis in rows(s.spec).items():
                att = attach(s, alone, fis, "spatial", "diffusers", None)
                try:
                    refs[row] = denoise(s, att.state)[0]
                finally:
                    att.remove()
        for attention in attentions:
            for shard in shards:
                for row in rows(s.spec):
                    r = {"resolution": res, **measure(s, ctx, row, shard, attention, o, refs.get(row))}
                    report["rows"].append(r)
                    if r["status"] == "ok":
                        steps = " ".join(f"{t:.3f}" for t in r["step_s"])
                        check = f", rel L2 vs 1 GPU {r['rel_l2_vs_1gpu']:.2e}" if "rel_l2_vs_1gpu" in r else ""
                        peak = f", peak {r['peak_gib']:.1f} GiB" if "peak_gib" in r else ""
                        say(
                            f"{res} {shard}/{attention} {row}: steps [{steps}] s, total {r['total_s']:.3f} s"
                            f"{peak}{check}",
                            flush=True,
                        )
                    else:
                        say(f"{res} {shard}/{attention} {row}: {r['status']}", flush=True)
    if o.profile and s is not None:
        report["profile"] = profile(s, ctx, shards[0], attentions[0], o)
        p = report["profile"]
        say(
            f"profile ({p['basis']}, {resolutions[-1]} {p['shard']}/{p['attention']} FIS-Balanced): "
            f"all-to-all {100 * p['all_to_all_share']:.1f}%, all-gather {100 * p['all_gather_share']:.1f}% "
            f"of {p['total_ms']:.0f} ms",
            flush=True,
        )
    if ctx.is_main and o.out:
        write_json(report, o.out)
    destroy_parallel()
    return report if ctx.is_main else None
