"""Speed of each FIS operator on one real-size block (issue 16): Wan 2.2 A14B at 480p and 720p, random bf16 weights
(engine/models/random.build_block), dense, today's FIS ('residual', 'linear') and the attention-scope operators
('attn', 'kv') in the same run.

Each operator runs through engine/hooks/fis.run_operator, the code a sparse block of a generation runs (selection,
the block or its split attention, reconstruction), once per anchor count the plan produces at each stride (the
count fixes the cost: offsets with the same count cost the same), timed with CUDA events after a warm-up, median of
repeats (engine/runtime/timing.time_fn). The generation speedup is composed from the block times with the plan
(`composed_speedup`: blocks and steps as the preset runs them; the patch embedding, text projection and output
projection, well under 1%, are left out), next to the FLOPs estimate of the same plan.
"""

from __future__ import annotations

import time

import torch

from engine.errors import one_line
from engine.hooks.attention_backend import set_attention_backend
from engine.hooks.fis import SparseView, run_operator
from engine.models import BlockArgs
from engine.models.random import MODELS, build_block
from engine.models.wan import ADAPTER
from engine.runtime.device import pick_dtype
from engine.runtime.timing import free_memory, time_fn
from fis import OPERATORS, FISConfig, generation_flops
from fis.flops import block_flops
from fis.operators import get as get_operator
from fis.reconstruct import FrameTables, set_fused

from .kernels import block_inputs

MODEL = "wan2.2-a14b"
FRAMES, STEPS = 81, 4  # the paper's Wan 2.2 A14B Lightning setting
STRIDES = (2, 3, 4, 5)
BASE = FISConfig(stride=3, dense_head=1, dense_tail=1, dense_steps=1)  # the wan-14b presets' protection


def plans(num_blocks: int, frames: int, strides) -> dict[int, object]:
    return {s: BASE.replace(stride=s).resolve(num_blocks, frames, STEPS) for s in strides}


def anchor_sets(plan, num_blocks: int) -> dict[int, tuple[int, ...]]:
    """One anchor tuple per anchor count the plan uses (its cost stands for every offset with that count)."""
    out = {}
    for b in range(num_blocks):
        a = plan.anchors(b, 0)
        if a is not None:
            out.setdefault(len(a), a)
    return out


def composed_speedup(measured: dict, fis: FISConfig | None, resolution: str) -> float | None:
    """A generation's speedup composed from measured block times: every (block, step) of `fis`'s plan costs the dense
    block or the operator's block at its anchor count. None when the run did not time what the plan needs."""
    res = measured.get("block_ms", {}).get(resolution)
    if res is None:
        return None
    if fis is None:
        return 1.0
    blocks, frames = measured["num_blocks"], res["latent_frames"]
    try:
        plan = fis.resolve(blocks, frames, measured["steps"])
    except ValueError:
        return None
    times = res.get(fis.operator, {})
    total = 0.0
    for step in range(measured["steps"]):
        for b in range(blocks):
            a = plan.anchors(b, step)
            t = res["dense"] if a is None else times.get(str(len(a)))
            if t is None:
                return None
            total += t
    return measured["steps"] * blocks * res["dense"] / total


def operator_sweep(
    device: torch.device,
    resolutions=("480p", "720p"),
    operators=OPERATORS,
    strides=STRIDES,
    warmup: int = 2,
    repeats: int = 5,
    attention_backend: str | None = None,
    budget_s: float = 280.0,
    tiny: bool = False,
    fused_glue: bool = False,
    log=print,
) -> dict:
    """Block times of dense and every operator x anchor count, per resolution; composed and FLOPs speedups.

    fused_glue: the reconstruction as one compiled kernel, as a generation runs it on CUDA; off by default because
    every (operator, anchor count) would compile its own kernel (minutes over the sweep), and the eager glue costs a
    few % of a sparse block (docs/benchmarks.md: the fused one is <= 3% of a step), so the measured speedups are, if
    anything, slightly low."""
    was_fused = set_fused(fused_glue)
    try:
        glue = "fused" if fused_glue else "eager"
        return _sweep(
            device, resolutions, operators, strides, warmup, repeats, attention_backend, budget_s, tiny, glue, log
        )
    finally:
        set_fused(was_fused)


def _sweep(device, resolutions, operators, strides, warmup, repeats, attention_backend, budget_s, tiny, glue, log):
    spec = MODELS[MODEL].tiny() if tiny else MODELS[MODEL]
    c = spec.transformer
    dtype = pick_dtype("auto", device)
    block = build_block(c, device, dtype)
    if attention_backend:
        set_attention_backend(block, attention_backend)
    names = BlockArgs(block)
    start = time.perf_counter()
    out = {
        "model": spec.name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype),
        "attention_backend": attention_backend or "default (torch SDPA)",
        "glue": glue,
        "frames": FRAMES,
        "steps": STEPS,
        "num_blocks": c["num_layers"],
        "protection": BASE.to_dict(),
        "warmup": warmup,
        "repeats": repeats,
        "entries": [],
        "block_ms": {},
        "speedup": {},
        "flops_speedup": {},
        "skipped": [],
    }
    for res in resolutions:
        h, w = (64, 64) if tiny else spec.size(res)
        frames, hw = spec.dims.latent_grid(FRAMES, h, w)
        p = c["patch_size"]
        th, tw = h // spec.vae_s // p[1], w // spec.vae_s // p[2]
        inputs = block_inputs(spec, frames, th, tw, device)  # (hidden, context, temb, rope), every frame
        n = inputs[0].shape[1]
        by_stride = plans(c["num_layers"], frames, [s for s in strides if s < frames])
        with torch.no_grad():
            dense_s = time_fn(lambda: block(*inputs), device, warmup, repeats)  # noqa: B023 - called here
        table = {"latent_frames": frames, "tokens": n, "dense": dense_s * 1e3}
        out["entries"].append(
            dict(resolution=res, operator="dense", anchors=frames, tokens=n, ms=dense_s * 1e3, status="ok")
        )
        log(f"{res}: {frames} latent frames x {hw} tokens, dense block {dense_s * 1e3:.2f} ms")
        counts = {}
        for plan in by_stride.values():
            counts.update(anchor_sets(plan, c["num_layers"]))
        for op in operators:
            for count, anchors in sorted(counts.items()):
                e = dict(resolution=res, operator=op, anchors=count, tokens=n, status="ok")
                if time.perf_counter() - start > budget_s:
                    e["status"] = f"skipped: time budget {budget_s:.0f} s"
                    out["skipped"].append(f"{res} {op} {count}")
                    out["entries"].append(e)
                    continue
                t = FrameTables.build(anchors, frames, device)
                view = SparseView(t.anchors, frames, t)

                def call(op=op, view=view, inputs=inputs):
                    return run_operator(get_operator(op), block, block.forward, view, names, ADAPTER, inputs, {})

                try:
                    with torch.no_grad():
                        sec = time_fn(call, device, warmup, repeats)
                    flops = block_flops(spec.dims, n, count * hw, op)
                    e.update(ms=sec * 1e3, tflops=flops / sec / 1e12, block_speedup=dense_s / sec)
                    e["flops_block_speedup"] = block_flops(spec.dims, n) / flops
                    table.setdefault(op, {})[str(count)] = sec * 1e3
                    log(f"  {op:8s} {count:2d} anchors: {sec * 1e3:8.2f} ms ({dense_s / sec:.2f}x block)")
                except Exception as err:  # OOM or a broken operator: report it, keep the others
                    e["status"] = one_line(err, 160)
                    free_memory(device)
                out["entries"].append(e)
        out["block_ms"][res] = table
        dims = spec.dims
        for op in operators:
            for s in by_stride:
                fis = BASE.replace(stride=s, operator=op)
                out["speedup"].setdefault(res, {}).setdefault(op, {})[str(s)] = composed_speedup(out, fis, res)
                dense_f = generation_flops(dims, FRAMES, h, w, STEPS)
                sparse_f = generation_flops(dims, FRAMES, h, w, STEPS, fis.resolve(c["num_layers"], frames, STEPS))
                out["flops_speedup"].setdefault(res, {}).setdefault(op, {})[str(s)] = dense_f / sparse_f
        inputs = None  # noqa: F841 - free before the next resolution's inputs are made
        free_memory(device)
    out["elapsed_s"] = time.perf_counter() - start
    return out


def table(result: dict) -> str:
    """Composed generation speedup (measured) and FLOPs estimate per resolution, operator and stride."""
    lines = []
    for res, ops in result["speedup"].items():
        lines.append(f"{res} (dense block {result['block_ms'][res]['dense']:.2f} ms): speedup measured / FLOPs est.")
        for op, by_stride in ops.items():
            cells = [
                f"s={s} {'-' if v is None else f'{v:.2f}x'} / {result['flops_speedup'][res][op][s]:.2f}x"
                for s, v in by_stride.items()
            ]
            lines.append(f"  {op:8s} " + "   ".join(cells))
    return "\n".join(lines)
