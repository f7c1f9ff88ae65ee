"""Sequence-parallel benchmark (issue 4): real-size Wan 2.2 A14B with random weights built on every GPU in bf16,
4 steps of 81 frames at 480p and 720p, Dense and FIS-Balanced, for each shard layout and attention implementation.
Prints the time of every step and, from a short torch.profiler run, the share of GPU time spent in all-to-all
(Ulysses) and all-gather (output gather; frame layout: FIS anchors).

    torchrun --nproc_per_node=8 launch/sp_bench.py --out docs/bench/sp8.json
    torchrun --nproc_per_node=1 launch/sp_bench.py --shards spatial --attention diffusers   # 1-GPU baseline
    torchrun --nproc_per_node=2 launch/sp_bench.py --tiny                                   # CPU (gloo) smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import torch

from engine.bench.run import build_setup, denoise, fidelity
from engine.hooks.attention_backend import set_attention_backend
from engine.hooks.compile import compile_blocks
from engine.hooks.fis import apply_fis, remove_fis
from engine.models.random import MODELS, TINY_VIDEO
from engine.runtime.io import write_json
from engine.runtime.presets import load_fis, model_family
from parallel import (
    Degrees,
    ParallelContext,
    destroy_parallel,
    init_parallel,
    parallelize_transformer,
    world_size_from_env,
)


def rows(spec) -> dict:
    """Dense and the model's FIS-Balanced preset (configs/fis/, as launch/generate.py and launch/bench.py use)."""
    return {"Dense": None, "FIS-Balanced": load_fis("balanced", model_family(spec.transformer))}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="wan2.2-a14b", help=", ".join(MODELS))
    p.add_argument("--resolutions", default="480p,720p")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--ring", type=int, default=1, help="ring degree; ulysses = processes / ring")
    p.add_argument("--shards", default="spatial,frame")
    p.add_argument("--attention", default="diffusers,xfuser", help="xfuser rows are skipped where it is missing")
    p.add_argument("--attention-backend", default=None, help="diffusers backend name (default: torch SDPA)")
    p.add_argument(
        "--compile",
        default="off",
        choices=["off", "static"],
        help="torch.compile each block (under the FIS and SP hooks), as generate.py --compile",
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--check", action="store_true", help="first resolution: rel L2 of each row vs this GPU alone")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--tiny", action="store_true", help="toy-width model on CPU (gloo), for a smoke run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON report (rank 0)")
    return p


def setup_for(base, spec, frames: int, height: int, width: int, o):
    """Inputs of another resolution around the experts already built (building 2 x 14B again takes minutes)."""
    if base is None:
        return build_setup(spec, o.device, frames, height, width, o.steps, o.seed)
    fresh = build_setup(dataclasses.replace(spec, experts=0), o.device, frames, height, width, o.steps, o.seed)
    return dataclasses.replace(fresh, spec=spec, experts=base.experts)


class Attached:
    """FIS first, then sequence parallelism; taken off in reverse (parallel/parallelize.py explains why)."""

    def __init__(self, s, ctx, fis, shard: str, attention: str, backend):
        self.s, self.state, self.handles = s, None, []
        if fis is not None:
            for m in s.experts:
                self.state = apply_fis(m, fis, state=self.state)  # one state: both experts see the same step
        self.handles = [parallelize_transformer(m, ctx, shard, attention, backend) for m in s.experts]

    def close(self):
        for h in reversed(self.handles):
            h.remove()
        if self.state is not None:
            for m in self.s.experts:
                remove_fis(m)


def measure(s, ctx, row: str, shard: str, attention: str, o, ref=None) -> dict:
    out = {"row": row, "shard": shard, "attention": attention, "status": "ok"}
    if attention == "xfuser" and importlib.util.find_spec("xfuser") is None:
        return {**out, "status": "xfuser not installed"}
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
    att = None
    try:
        att = Attached(s, ctx, rows(s.spec)[row], shard, attention, o.attention_backend)
        for _ in range(o.warmup):
            denoise(s, att.state)
        runs = [denoise(s, att.state) for _ in range(o.repeats)]
        step_s = [statistics.median(r[1][i] for r in runs) for i in range(o.steps)]
        out.update(step_s=step_s, total_s=sum(step_s))
        if ref is not None:
            out["rel_l2_vs_1gpu"] = fidelity(runs[-1][0], ref)["rel_l2"]
        if s.device.type == "cuda":
            out["peak_gib"] = torch.cuda.max_memory_allocated(s.device) / 2**30
    except Exception as e:  # noqa: BLE001 - a row's failure (OOM, uneven sizes under xfuser) is its status
        if ctx.is_distributed:  # the other ranks are inside a collective: only stopping them all is safe
            raise
        out["status"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    finally:
        if att is not None:
            att.close()
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
    att = Attached(s, ctx, rows(s.spec)["FIS-Balanced"], shard, attention, o.attention_backend)
    try:
        denoise(s, att.state)  # warm-up
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            denoise(s, att.state)
    finally:
        att.close()
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


def main(argv=None) -> dict | None:
    o = parser().parse_args(argv)
    world = world_size_from_env()
    if world % o.ring:
        raise SystemExit(f"sp_bench: error: ring degree {o.ring} does not divide {world} processes")
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
        s = setup_for(s, spec, frames, height, width, o)
        if fresh:
            compile_blocks(s.experts, o.compile)  # before any hook: the hooks stay eager around the graphs
        if o.attention_backend:
            for m in s.experts:
                set_attention_backend(m, o.attention_backend)
        refs = {}
        if o.check and res == resolutions[0]:  # this GPU alone: every rank computes it, no communication
            alone = ParallelContext(device=ctx.device)
            for row, fis in rows(s.spec).items():
                att = Attached(s, alone, fis, "spatial", "diffusers", None)
                try:
                    refs[row] = denoise(s, att.state)[0]
                finally:
                    att.close()
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


if __name__ == "__main__":
    main()
