"""HunyuanVideo 1.5 8B benchmark: the real-size transformer with random bf16 weights, the paper's
I2V setting (480p, 81 frames, 8 steps, sparsity on steps 0-6), Dense vs FIS-Balanced vs FIS-Fast.

    python launch/bench_hunyuan.py --out docs/bench/hunyuan.json          # one GPU
    python launch/bench_hunyuan.py --tiny                                 # CPU smoke run

Context as the I2V pipeline builds it: 1000 Qwen tokens (150 valid), 256 ByT5 tokens (none valid: no quoted
text), 729 SigLIP image tokens; run with the padding dropped (the engine's way, no attention mask) and, for
Dense, as diffusers runs it (a dense [B, 1, S, S] mask in every block); speedups are vs trimmed Dense.
Timing: CUDA events per step, one warm-up generation, median of the repeats; every row in the same process.
Fidelity: relative L2 of the final latents vs Dense (random weights: a consistency check, not a quality score).
"""

from __future__ import annotations

import torch

from engine.errors import UserError
from engine.models.hunyuan15 import TINY, drop_text_padding
from engine.models.random import default_dtype
from engine.runtime.device import pick_dtype
from engine.runtime.io import write_json
from engine.runtime.presets import load_fis
from engine.runtime.setup import prepare
from engine.runtime.timing import StepTimer, free_memory, median_steps, peak_gib
from fis.flops import HUNYUAN_VIDEO_15, UNIT, DiTDims, generation_flops

from .setup import fidelity


def build(o):
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(o.seed)
    with torch.device(o.device), default_dtype(pick_dtype("auto", o.device)):  # never an fp32 copy of 8B
        m = HunyuanVideo15Transformer3DModel(**(TINY if o.tiny else {}))
    return m.eval().requires_grad_(False)


def inputs(m, o):
    c, dev, dt = m.config, o.device, next(m.parameters()).dtype
    f, h, w = (o.frames - 1) // 4 + 1, o.height // 16, o.width // 16  # VAE x4 in time, x16 in space
    g = torch.Generator(dev).manual_seed(o.seed)

    def rnd(*s):
        return torch.randn(*s, generator=g, device=dev, dtype=dt)

    n_text, n_byt5, n_img = (8, 4, 4) if o.tiny else (1000, 256, 729)
    mask = torch.zeros(1, n_text, dtype=torch.long, device=dev)
    mask[:, : n_text * 3 // 20] = 1  # 15% of the Qwen tokens are the prompt, the rest padding
    cond = dict(
        encoder_hidden_states=rnd(1, n_text, c.text_embed_dim),
        encoder_attention_mask=mask,
        encoder_hidden_states_2=rnd(1, n_byt5, c.text_embed_2_dim),
        encoder_attention_mask_2=torch.zeros(1, n_byt5, dtype=torch.long, device=dev),
        image_embeds=rnd(1, n_img, c.image_embed_dim),
    )
    noise = rnd(1, c.out_channels, f, h, w)
    image_cond = torch.cat(
        [rnd(1, c.out_channels, 1, h, w), torch.zeros(1, c.out_channels, f - 1, h, w, device=dev, dtype=dt)], 2
    )
    frame_mask = torch.zeros(1, 1, f, h, w, device=dev, dtype=dt)
    frame_mask[:, :, 0] = 1
    return noise, torch.cat([image_cond, frame_mask], 1), cond  # cond channels: [B, 33, F, H, W]


@torch.no_grad()
def denoise(m, noise, extra, cond, state, steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=5.0)  # the step-distilled 480p I2V sampler's shift
    sched.set_timesteps(steps, device=noise.device)
    sched.set_begin_index(0)
    if state is not None:
        state.begin(steps)
    x, timer = noise.clone(), StepTimer(noise.device)
    timer.mark()
    for i, t in enumerate(sched.timesteps):
        if state is not None:
            state.step = i
        pred = m(torch.cat([x, extra], 1), t.expand(1).to(x.dtype), **cond, return_dict=False)[0]  # as the pipeline
        x = sched.step(pred, t, x, return_dict=False)[0]
        timer.mark()
    return x, timer.seconds()


def run_row(m, noise, extra, cond, fis, o) -> dict:
    if fis is not None and o.tiny:
        fis = fis.replace(dense_head=1, dense_tail=1, dense_steps=1)
    attached = prepare([m], fis=fis) if fis is not None else None
    state = None if attached is None else attached.state
    try:
        free_memory(o.device)
        denoise(m, noise, extra, cond, state, o.steps)  # warm-up
        runs = [denoise(m, noise, extra, cond, state, o.steps) for _ in range(o.repeats)]
    finally:
        if attached is not None:
            attached.remove()
    step_s = median_steps([r[1] for r in runs])
    dims = DiTDims.from_hunyuan15_config(m.config) if o.tiny else HUNYUAN_VIDEO_15  # the paper's count at size
    plan = None if fis is None else fis.resolve(m.config.num_layers, noise.shape[2], o.steps)
    return {
        "total_s": sum(step_s),
        "step_s": step_s,
        "latents": runs[-1][0],
        "flops_P": generation_flops(dims, o.frames, o.height, o.width, o.steps, plan) / UNIT,
        "peak_gib": peak_gib(o.device),
    }


def run(o) -> dict:
    """o: launch/bench_hunyuan.py's arguments."""
    o.device = torch.device("cuda" if torch.cuda.is_available() and not o.tiny else "cpu")
    if o.tiny:  # a 9 x 4 x 6 latent grid
        o.steps, o.repeats, o.frames, o.height, o.width = 3, 1, 33, 64, 96
    rows, contexts = o.rows.split(","), o.context.split(",")
    if "Dense" not in rows or "trimmed" not in contexts:
        raise UserError("speedups are against trimmed Dense: --rows needs Dense and --context needs trimmed", "rows")
    rows.sort(key=lambda r: r != "Dense")  # the reference first
    contexts.sort(key=lambda c: c != "trimmed")
    m = build(o)
    noise, extra, cond = inputs(m, o)
    presets = {
        "Dense": None,
        "FIS-Balanced": load_fis("balanced", "hunyuanvideo1.5-8b"),
        "FIS-Fast": load_fis("fast", "hunyuanvideo1.5-8b"),
    }
    report = {
        "gpu": torch.cuda.get_device_name(o.device) if o.device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "setting": vars(o) | {"device": str(o.device)},
        "rows": [],
    }
    dense = None
    for context in contexts:
        undo = drop_text_padding(m) if context == "trimmed" else None
        try:
            for name in rows if context == "trimmed" else ["Dense"]:
                row = run_row(m, noise, extra, cond, presets[name], o)
                latents = row.pop("latents")
                dense = dense or (row["total_s"], latents)  # the first row: trimmed Dense
                row = {
                    "row": name,
                    "context": context,
                    **row,
                    "speedup": dense[0] / row["total_s"],
                    "rel_l2_vs_dense": fidelity(latents, dense[1])["rel_l2"],
                }
                report["rows"].append(row)
                print(
                    f"{context} {name}: {row['total_s']:.3f} s ({row['speedup']:.2f}x), steps "
                    f"[{' '.join(f'{t:.3f}' for t in row['step_s'])}], {row['flops_P']:.2f} PFLOP, "
                    f"rel L2 {row['rel_l2_vs_dense']:.3g}, peak {row['peak_gib']} GiB",
                    flush=True,
                )
        finally:
            if undo is not None:
                undo()
    if o.out:
        write_json(report, o.out)
    return report
