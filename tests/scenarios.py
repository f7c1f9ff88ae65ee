"""Scenarios for tests/test_parallel.py, run inside every spawned process (gloo, CPU).

Each scenario runs the single-process reference and the parallel run of the same model in the same process and
returns {metric: value}; float metrics are max-reduced over ranks, so rank 0 records the worst rank.
"""

from __future__ import annotations

import json
import os
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

LATENT = {"even": (17, 64), "odd": (17, 48)}  # (num_frames, pixels): 5 latent frames of 4x4 / 3x3 tokens
PROMPT = {"prompt": "a red ball moving left", "negative_prompt": "dark blue sky"}


def _quiet():
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()


def _diff(a, b) -> float:
    return (a - b).abs().max().item()


def _ctx(**degrees):
    from parallel import Degrees, init_parallel

    return init_parallel(Degrees(**degrees))


def _fis(operator="residual", dense_steps=0):
    from fis import FISConfig

    return FISConfig(stride=2, dense_head=1, dense_tail=1, dense_steps=dense_steps, operator=operator)


def _bare_transformer(heads: int):
    """A tiny Wan transformer with `heads` heads (the tiny pipelines have 2: too few for ulysses=4)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=32 // heads,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=4,
        rope_max_seq_len=64,
    ).eval()


def _generate(pipe, state=None, guidance=1.0, frames=17, size=64, steps=3, embeds=None):
    """Latents of a short generation. embeds=(pos, neg): pass encoded prompts, as the engine's Worker does."""
    kw = PROMPT if embeds is None else {"prompt_embeds": embeds[0], "negative_prompt_embeds": embeds[1]}
    if state is not None:
        state.begin(steps)
        kw = {**kw, "callback_on_step_end": state.step_callback}
    with torch.no_grad():
        return pipe(
            **kw,
            height=size,
            width=size,
            num_frames=frames,
            num_inference_steps=steps,
            guidance_scale=guidance,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        ).frames


# ---- scenarios --------------------------------------------------------------------------------------------
def attention_slices():
    """Each rank's Ulysses output equals its slice of full attention, for every layout (ParaAttention style)."""
    from diffusers import ContextParallelConfig
    from diffusers.models._modeling_parallel import ParallelConfig
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    from parallel.sequence import SequenceShard

    ctx = _ctx(ulysses=dist.get_world_size())
    cp = ContextParallelConfig(ulysses_degree=ctx.degrees.ulysses, mesh=ctx.sp_mesh)
    config = ParallelConfig(context_parallel_config=cp)
    config.setup(ctx.rank, ctx.world_size, ctx.device, mesh=ctx.sp_mesh)
    out = {}
    for mode in ("spatial", "frame"):
        for frames, hw in ((4, 8), (5, 9)):  # even, uneven for 2 and 4 ranks
            torch.manual_seed(0)
            q, k, v = (torch.randn(2, frames * hw, 4, 16) for _ in range(3))  # [B, N, H, D]
            full = dispatch_attention_fn(q, k, v)
            shard = SequenceShard(ctx, mode, cp)
            shard.begin(frames, hw)
            local = dispatch_attention_fn(*(shard.layout.local(x, 1) for x in (q, k, v)), parallel_config=config)
            out[f"{mode}_{frames}x{hw}"] = _diff(local, shard.layout.local(full, 1))
    return out


def transformer_sp(heads=2):
    """Transformer forward: dense and FIS (both operators), both layouts, even and uneven token counts."""
    from engine.hooks.fis import apply_fis, remove_fis
    from engine.testbed.tiny_wan import build_pipeline
    from parallel import parallelize_transformer

    ctx = _ctx(ulysses=dist.get_world_size())
    tr = build_pipeline("t2v").transformer if heads == 2 else _bare_transformer(heads)
    torch.manual_seed(1)
    text = torch.randn(1, 512, 32)
    out = {}
    for shape in ((5, 8, 8), (5, 6, 6), (6, 8, 6)):  # [F, H, W] latents: HW 16 / 9 / 12 tokens
        x = torch.randn(1, 16, *shape)

        def run(x=x):
            with torch.no_grad():
                return tr(hidden_states=x, timestep=torch.tensor([700]), encoder_hidden_states=text, return_dict=False)[
                    0
                ]

        dense = run()
        for fis in (None, "residual", "linear"):
            if fis:
                apply_fis(tr, _fis(fis)).begin(2)
            ref = run()
            tag = "x".join(map(str, shape)) + f"_{fis or 'dense'}"
            if fis:
                out[f"fis_effect_{tag}"] = _diff(ref, dense)  # FIS really ran (not dense by accident)
            for mode in ("spatial", "frame"):
                handle = parallelize_transformer(tr, ctx, shard=mode)
                out[f"{mode}_{tag}"] = _diff(run(), ref)
                handle.remove()
            out[f"removed_{tag}"] = _diff(run(), ref)
            if fis:
                remove_fis(tr)
    # frame layout with FIS attached after parallelism: a clear error, not silently wrong frames
    handle = parallelize_transformer(tr, ctx, shard="frame")
    apply_fis(tr, _fis()).begin(2)
    try:
        run()
        out["order_guard"] = "no error"
    except RuntimeError as e:
        out["order_guard"] = str(e)
    remove_fis(tr)
    handle.remove()
    return out


def transformer_sp_4heads():
    return transformer_sp(heads=4)


def pipeline_sp(variant="ti2v"):
    """Whole pipeline (scheduler, per-token timesteps for TI2V, both experts for A14B), FIS with a dense last step."""
    from engine.hooks.fis import apply_fis, remove_fis
    from engine.testbed.tiny_wan import build_pipeline
    from parallel import parallelize_pipeline

    ctx = _ctx(ulysses=dist.get_world_size())
    pipe = build_pipeline(variant)
    pipe.set_progress_bar_config(disable=True)
    guidance = 3.0 if variant == "a14b" else 1.0
    out = {}
    for size in ("even", "odd"):
        frames, px = LATENT[size]
        dense = _generate(pipe, None, guidance, frames, px)
        for fis in (False, True):
            state = None
            if fis:
                state = apply_fis(pipe.transformer, _fis(dense_steps=1))
                if variant == "a14b":
                    apply_fis(pipe.transformer_2, None, state)
            ref = _generate(pipe, state, guidance, frames, px)
            if fis:
                out[f"fis_effect_{size}"] = _diff(ref, dense)
            for mode in ("spatial", "frame"):
                handle = parallelize_pipeline(pipe, ctx, shard=mode)
                out[f"{mode}_{size}_{'fis' if fis else 'dense'}"] = _diff(
                    _generate(pipe, state, guidance, frames, px), ref
                )
                handle.remove()
            if fis:
                for t in (pipe.transformer, getattr(pipe, "transformer_2", None)):
                    if t is not None:
                        remove_fis(t)
    return out


def pipeline_sp_a14b():
    return pipeline_sp("a14b")


def cfg_parallel():
    """guidance > 1 with a cfg degree 2 (x the rest as ulysses) equals serial CFG on one process, and each rank
    runs the transformer once per step instead of twice."""
    from engine.hooks.fis import apply_fis, remove_fis
    from engine.testbed.tiny_wan import build_pipeline
    from parallel import parallelize_pipeline

    world = dist.get_world_size()
    ctx = _ctx(cfg=2, ulysses=world // 2)
    pipe = build_pipeline("t2v")
    pipe.set_progress_bar_config(disable=True)
    calls = [0]
    pipe.transformer.blocks[0].register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    out = {}
    for fis in (False, True):
        state = apply_fis(pipe.transformer, _fis(dense_steps=1)) if fis else None
        ref = _generate(pipe, state, guidance=4.0)
        no_cfg = _generate(pipe, state, guidance=1.0)
        # the engine's way: prompts encoded up front and passed in (pipe.encode_prompt still sees them)
        with torch.no_grad():
            embeds = pipe.encode_prompt(**PROMPT, max_sequence_length=512, device=ctx.device)
        ref_embeds = _generate(pipe, state, guidance=4.0, embeds=embeds)
        for mode in ("spatial", "frame") if ctx.sp_size > 1 else ("spatial",):
            handle = parallelize_pipeline(pipe, ctx, shard=mode)
            tag = f"{mode}_{'fis' if fis else 'dense'}"
            calls[0] = 0
            out[f"cfg_{tag}"] = _diff(_generate(pipe, state, guidance=4.0), ref)
            out[f"calls_{tag}"] = float(calls[0])  # 3 steps: 3 forwards per rank, not 6
            out[f"nocfg_{tag}"] = _diff(_generate(pipe, state, guidance=1.0), no_cfg)  # guidance 1: no split
            out[f"embeds_{tag}"] = _diff(_generate(pipe, state, guidance=4.0, embeds=embeds), ref_embeds)
            handle.remove()
        out[f"removed_{'fis' if fis else 'dense'}"] = _diff(_generate(pipe, state, guidance=4.0), ref)
        if fis:
            remove_fis(pipe.transformer)
    return out


def bad_heads():
    """ulysses 4 on a 2-head model: a clear ValueError before anything is attached."""
    from engine.testbed.tiny_wan import build_pipeline
    from parallel import parallelize_pipeline

    ctx = _ctx(ulysses=dist.get_world_size())
    pipe = build_pipeline("t2v")
    try:
        parallelize_pipeline(pipe, ctx)
    except ValueError as e:
        return {"message": str(e), "hooked": float(hasattr(pipe.transformer, "_diffusers_hook"))}
    return {"message": "no error"}


def ring_on_cpu():
    from parallel import Degrees, init_parallel

    try:
        init_parallel(Degrees(ring=dist.get_world_size()))
    except ValueError as e:
        return {"message": str(e)}
    return {"message": "no error"}


SCENARIOS = {
    f.__name__: f
    for f in (
        attention_slices,
        transformer_sp,
        transformer_sp_4heads,
        pipeline_sp,
        pipeline_sp_a14b,
        cfg_parallel,
        bad_heads,
        ring_on_cpu,
    )
}


def main(rank: int, world: int, port: int, out_path: str, names: list[str]) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    _quiet()
    # our own init, for the short timeout: a scenario failing on one rank fails the test instead of hanging
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    results = {}
    for name in names:
        try:
            values = SCENARIOS[name]()
            for key, v in values.items():
                if isinstance(v, float):
                    t = torch.tensor([v], dtype=torch.float64)
                    dist.all_reduce(t, op=dist.ReduceOp.MAX)
                    values[key] = t.item()
            results[name] = values
        except Exception:  # noqa: BLE001 - any failure is reported by the test that reads it
            results[name] = {"error": traceback.format_exc()}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    from parallel import destroy_parallel

    destroy_parallel()
