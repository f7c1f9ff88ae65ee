"""Multi-process scenarios of tests/test_parallel.py and tests/test_parallel_hunyuan.py, run inside every
process of a spawned gloo world (CPU). One world per size serves both modules (tests/conftest.py: `spawned`).

Each scenario runs the single-process reference and the parallel run of the same model in the same process and
returns {metric: value}; float metrics are max-reduced over ranks, so rank 0 records the worst rank.

A scenario that fails on any rank stops that rank at once: it writes its traceback to rank<r>.error and exits, so
the other ranks' collectives fail within seconds (a closed gloo connection) instead of waiting for the timeout,
and the test that reads the scenario reports the failing rank's own traceback. The driver then starts a new world
for the scenarios left.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from helpers import bare_transformer, diff, fake_fa3, hunyuan_run, tiny_hunyuan_transformer, tiny_vaes

LATENT = {"even": (17, 64), "odd": (17, 48)}  # (num_frames, pixels): 5 latent frames of 4x4 / 3x3 tokens
PROMPT = {"prompt": "a red ball moving left", "negative_prompt": "dark blue sky"}


def _ctx(**degrees):
    from parallel import Degrees, init_parallel

    return init_parallel(Degrees(**degrees))


def _fis(operator="residual", dense_steps=0):
    from fis import FISConfig

    return FISConfig(stride=2, dense_head=1, dense_tail=1, dense_steps=dense_steps, operator=operator)


SCENARIOS = {}


def scenario(fn):
    SCENARIOS[fn.__name__] = fn
    return fn


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
@scenario
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
            out[f"{mode}_{frames}x{hw}"] = diff(local, shard.layout.local(full, 1))
    return out


@scenario
def transformer_sp(heads=2, operators=(None, "residual", "linear"), order_guard=True):
    """Transformer forward: dense and FIS (both operators), both layouts, even and uneven token counts."""
    from engine.hooks.fis import apply_fis, remove_fis
    from engine.testbed.tiny_wan import build_pipeline
    from parallel import parallelize_transformer

    ctx = _ctx(ulysses=dist.get_world_size())
    tr = build_pipeline("t2v").transformer if heads == 2 else bare_transformer(heads)
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
        for fis in operators:
            if fis:
                apply_fis(tr, _fis(fis)).begin(2)
            ref = run()
            tag = "x".join(map(str, shape)) + f"_{fis or 'dense'}"
            if fis:
                out[f"fis_effect_{tag}"] = diff(ref, dense)  # FIS really ran (not dense by accident)
            for mode in ("spatial", "frame"):
                handle = parallelize_transformer(tr, ctx, shard=mode)
                out[f"{mode}_{tag}"] = diff(run(), ref)
                handle.remove()
            out[f"removed_{tag}"] = diff(run(), ref)
            if fis:
                remove_fis(tr)
    if not order_guard:
        return out
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


@scenario
def transformer_sp_4heads():
    return transformer_sp(heads=4)


@scenario
def operators_sp():
    """The attention-scope operators (attn, kv) as transformer_sp: both layouts, even and uneven token counts; under
    the frame layout the Ulysses all-to-all gathers the anchors' keys and values from every rank."""
    return transformer_sp(heads=dist.get_world_size(), operators=("attn", "kv"), order_guard=False)


@scenario
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
                out[f"fis_effect_{size}"] = diff(ref, dense)
            for mode in ("spatial", "frame"):
                handle = parallelize_pipeline(pipe, ctx, shard=mode)
                out[f"{mode}_{size}_{'fis' if fis else 'dense'}"] = diff(
                    _generate(pipe, state, guidance, frames, px), ref
                )
                handle.remove()
            if fis:
                for t in (pipe.transformer, getattr(pipe, "transformer_2", None)):
                    if t is not None:
                        remove_fis(t)
    return out


@scenario
def pipeline_sp_a14b():
    return pipeline_sp("a14b")


@scenario
def cfg_parallel():
    """guidance > 1 with a cfg degree 2 (x the rest as ulysses) equals serial CFG on one process, and each rank
    runs the transformer once per step instead of twice."""
    from engine.hooks.fis import apply_fis, remove_fis
    from engine.testbed.tiny_wan import build_pipeline
    from parallel import parallelize_pipeline

    world = dist.get_world_size()
    ctx = _ctx(cfg=2, ulysses=world // 2)
    pipe = build_pipeline("t2v")
    # a short context (the pipeline pads to 1000 Qwen + 256 ByT5 + 729 image tokens): still mostly padding, so the
    # mask paths run, at a tenth of the CPU time
    pipe.tokenizer_max_length, pipe.tokenizer_2_max_length, pipe.vision_num_semantic_tokens = 48, 16, 16
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
            out[f"cfg_{tag}"] = diff(_generate(pipe, state, guidance=4.0), ref)
            out[f"calls_{tag}"] = float(calls[0])  # 3 steps: 3 forwards per rank, not 6
            out[f"nocfg_{tag}"] = diff(_generate(pipe, state, guidance=1.0), no_cfg)  # guidance 1: no split
            out[f"embeds_{tag}"] = diff(_generate(pipe, state, guidance=4.0, embeds=embeds), ref_embeds)
            handle.remove()
        out[f"removed_{'fis' if fis else 'dense'}"] = diff(_generate(pipe, state, guidance=4.0), ref)
        if fis:
            remove_fis(pipe.transformer)
    return out


@scenario
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


@scenario
def ring_on_cpu():
    from parallel import Degrees, init_parallel

    try:
        init_parallel(Degrees(ring=dist.get_world_size()))
    except ValueError as e:
        return {"message": str(e)}
    return {"message": "no error"}


# ---- HunyuanVideo 1.5 -------------------------------------------------------------------------------------
HY_SHAPES = ((6, 4, 6), (7, 3, 5))  # latent [F, H, W]: even for 2 ranks in both layouts; 7 frames / 15 tokens: not
HY_TEXTS = ("padded", "trimmed", "full", "batch")


def _hy_fis():
    from fis import FISConfig

    return FISConfig(stride=3, dense_head=1, dense_tail=1)


@scenario
def hunyuan_sp():
    """Both layouts x (padded text, padded text trimmed, no padding, a batch of unequal prompts) x dense / FIS x
    even / uneven token counts (the text splits unevenly too: 5 valid tokens over 2 ranks)."""
    from engine.hooks.fis import apply_fis, remove_fis
    from engine.models.hunyuan15 import drop_text_padding
    from parallel import parallelize_transformer

    world = dist.get_world_size()
    ctx = _ctx(ulysses=world)
    m, out = tiny_hunyuan_transformer(heads=world), {}
    for shape in HY_SHAPES if world == 2 else HY_SHAPES[1:]:  # 4 ranks (time): the uneven shape, no mask and a key mask
        for text in HY_TEXTS if world == 2 else HY_TEXTS[1::2]:
            given = "padded" if text == "trimmed" else text
            dense = hunyuan_run(m, shape, given)  # diffusers' own attention, dense mask
            for fis in (False, True):
                if fis:
                    apply_fis(m, _hy_fis()).begin(4)
                ref = hunyuan_run(m, shape, given) if fis else dense
                tag = f"{'x'.join(map(str, shape))}_{text}_{'fis' if fis else 'dense'}"
                if fis:
                    out[f"fis_effect_{tag}"] = diff(ref, dense)  # FIS really ran
                for mode in ("spatial", "frame"):
                    undo = drop_text_padding(m) if text == "trimmed" else None  # FIS, trim, then parallelism
                    handle = parallelize_transformer(m, ctx, shard=mode)
                    out[f"{mode}_{tag}"] = diff(hunyuan_run(m, shape, given), ref)
                    handle.remove()
                    if undo:
                        undo()
                out[f"removed_{tag}"] = diff(hunyuan_run(m, shape, given), ref)
                if fis:
                    remove_fis(m)
    return out


@scenario
def hunyuan_operators():
    """The attention-scope operators on HunyuanVideo 1.5's joint attention, both layouts: padded text trimmed (no
    mask) and a batch of unequal prompts (a key mask over the anchors' keys), even and uneven token counts."""
    from engine.hooks.fis import apply_fis, remove_fis
    from engine.models.hunyuan15 import drop_text_padding
    from fis import FISConfig
    from parallel import parallelize_transformer

    world = dist.get_world_size()
    ctx = _ctx(ulysses=world)
    m, out = tiny_hunyuan_transformer(heads=world), {}
    for shape in HY_SHAPES:
        for text in ("trimmed", "batch"):
            given = "padded" if text == "trimmed" else text
            dense = hunyuan_run(m, shape, given)
            for op in ("attn", "kv"):
                apply_fis(m, FISConfig(stride=3, dense_head=1, dense_tail=1, operator=op)).begin(4)
                ref = hunyuan_run(m, shape, given)
                tag = f"{'x'.join(map(str, shape))}_{text}_{op}"
                out[f"fis_effect_{tag}"] = diff(ref, dense)
                for mode in ("spatial", "frame"):
                    undo = drop_text_padding(m) if text == "trimmed" else None
                    handle = parallelize_transformer(m, ctx, shard=mode)
                    out[f"{mode}_{tag}"] = diff(hunyuan_run(m, shape, given), ref)
                    handle.remove()
                    if undo:
                        undo()
                out[f"removed_{tag}"] = diff(hunyuan_run(m, shape, given), ref)
                remove_fis(m)
    return out


@scenario
def hunyuan_cfg():
    """The tiny HunyuanVideo 1.5 pipeline (guider-driven CFG) with a cfg degree 2 (x ulysses on 4 processes)
    equals serial CFG on one process: dense and FIS, padding kept and dropped (the Worker drops it), and a guider
    whose CFG starts at the second step (step 0 has no uncond call). One transformer call per step per rank."""
    from diffusers import ClassifierFreeGuidance

    from engine.hooks.fis import apply_fis, remove_fis
    from engine.models import family_of
    from engine.models.hunyuan15 import drop_text_padding
    from engine.runtime.pipelines import PipelineCall
    from engine.testbed.tiny_hunyuan import build_pipeline
    from parallel import parallelize_pipeline

    world = dist.get_world_size()
    ctx = _ctx(cfg=2, ulysses=world // 2)
    pipe = build_pipeline("t2v")
    # a short context (the pipeline pads to 1000 Qwen + 256 ByT5 + 729 image tokens): still mostly padding, so the
    # mask paths run, at a tenth of the CPU time
    pipe.tokenizer_max_length, pipe.tokenizer_2_max_length, pipe.vision_num_semantic_tokens = 48, 16, 16
    pipe.set_progress_bar_config(disable=True)
    calls, out = [0], {}
    pipe.transformer.transformer_blocks[0].register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    steps = 3

    def generate(state):
        if state is not None:
            state.begin(steps)
        with (
            PipelineCall(pipe, family_of(pipe.transformer)).on_step_end(
                state.step_callback if state else lambda *a: {}
            ) as kw,
            torch.no_grad(),
        ):
            return pipe(
                prompt="a red circle moving left",
                negative_prompt="blurry",
                height=32,
                width=48,
                num_frames=17,
                num_inference_steps=steps,
                output_type="latent",
                generator=torch.Generator().manual_seed(0),
                **kw,
            ).frames

    dense = {}
    for guider in ("all", "late"):
        pipe.guider = ClassifierFreeGuidance(guidance_scale=4.0, start=0.0 if guider == "all" else 0.34)
        for fis in (False, True):
            state = apply_fis(pipe.transformer, _hy_fis()) if fis else None
            for trim in (False, True):
                undo = drop_text_padding(pipe.transformer) if trim else None
                calls[0] = 0
                ref = generate(state)
                serial_calls = calls[0]
                handle = parallelize_pipeline(pipe, ctx)
                tag = f"{guider}_{'fis' if fis else 'dense'}_{'trim' if trim else 'mask'}"
                calls[0] = 0
                out[f"cfg_{tag}"] = diff(generate(state), ref)
                out[f"calls_{tag}"] = float(calls[0])  # forwards per rank
                out[f"serial_calls_{tag}"] = float(serial_calls)
                handle.remove()
                out[f"removed_{tag}"] = diff(generate(state), ref)
                if undo:
                    undo()
            if fis:
                out[f"fis_effect_{guider}"] = diff(ref, dense[guider])
                remove_fis(pipe.transformer)
            else:
                dense[guider] = ref
    return out


@scenario
def rank_1_fails():
    """Rank 1 raises while rank 0 waits in a collective: the driver must report rank 1's own error, at once."""
    if dist.get_rank() == 1:
        raise RuntimeError("rank 1 failed on purpose")
    dist.all_reduce(torch.zeros(1))
    return {"rank_0_finished": 1.0}


# ---- FlashAttention-3 (fa3) under Ulysses ---------------------------------------------------------------------
@scenario
def fa3_ulysses():
    """The fa3 backend (diffusers' _flash_3_hub on fa3-fwd's entry points; here tests/helpers.fake_fa3, the same
    signatures computed by PyTorch on the CPU) under Ulysses, with FIS: equal to PyTorch's attention in one process,
    for Wan and HunyuanVideo 1.5 (joint attention, text padding dropped as the Worker does)."""
    import sys

    import engine.hooks.attention_backend as ab
    from engine.hooks.fis import apply_fis, remove_fis
    from engine.models.hunyuan15 import drop_text_padding
    from parallel import parallelize_transformer

    sys.modules[ab.FA3_MODULE] = fake_fa3()
    ab.fa3_missing = lambda device=None: []  # no GPU here; the scenario's process ends with the world
    world = dist.get_world_size()
    ctx = _ctx(ulysses=world)
    out = {}
    torch.manual_seed(1)
    x, text = torch.randn(1, 16, 5, 6, 6), torch.randn(1, 12, 32)  # [B, C, F, H, W], [B, L, C]
    wan = bare_transformer(heads=world)

    def run_wan():
        with torch.no_grad():
            return wan(hidden_states=x, timestep=torch.tensor([700]), encoder_hidden_states=text, return_dict=False)[0]

    hy = tiny_hunyuan_transformer(heads=world)
    undo = drop_text_padding(hy)
    for name, model, run in (("wan", wan, run_wan), ("hunyuan", hy, lambda: hunyuan_run(hy, (6, 4, 6), "padded"))):
        for fis in (False, True):
            if fis:
                apply_fis(model, _fis() if name == "wan" else _hy_fis()).begin(4)
            ref = run()  # PyTorch's attention, one process
            handle = parallelize_transformer(model, ctx, attention_backend="fa3")
            procs = [getattr(m, "processor", None) for m in model.modules()]
            backends = {str(p._attention_backend) for p in procs if hasattr(p, "_attention_backend")}
            tag = f"{name}_{'fis' if fis else 'dense'}"
            out[tag] = diff(run(), ref)
            out[f"{name}_backend_{tag.split('_')[1]}"] = float(backends == {"AttentionBackendName._FLASH_3_HUB"})
            handle.remove()
            if fis:
                remove_fis(model)
    undo()
    return out


# ---- parallel VAE decode ------------------------------------------------------------------------------------
VAE_LATENTS = ((2, 8, 6), (2, 10, 4))  # [F, H, W]: bands even over 2 and 4 ranks; 10 rows: uneven bands


@scenario
def vae_decode():
    """Each tiny VAE kind decoded over every rank (DistVAE's halo-exchange shards, gathered on the leader) equals the
    one-process decode; a rank other than the leader holds only its band of rows; rows that do not split over the
    ranks fall back to the leader alone (still exact)."""
    import math

    from parallel.vae import parallelize_vae

    world = dist.get_world_size()
    ctx = _ctx(ulysses=world)
    out = {}
    for kind, (vae, channels) in tiny_vaes().items():
        g = torch.Generator().manual_seed(1)
        latents = [torch.randn(1, channels, *shape, generator=g) for shape in (*VAE_LATENTS, (2, 2, 4))]
        with torch.no_grad():
            refs = [vae.decode(z).sample for z in latents]  # [B, 3, F, H, W], one process
            dec = parallelize_vae(vae, ctx)
            out[f"{kind}_sharded"] = float(dec.sharded is not None)
            for z, ref in zip(latents, refs):
                rows = z.shape[3]
                with dec.decoding(rows) as ranks:
                    got = vae.decode(z).sample if ranks > 1 or ctx.is_leader else None
                tag = f"{kind}_{rows}x{z.shape[4]}"  # the same keys in the same order on every rank (max-reduced)
                out[f"ranks_{tag}"] = float(ranks)
                out[f"diff_{tag}"] = diff(got, ref) if ctx.is_leader else 0.0
                # a rank other than the leader: its rows of the output, as a fraction; bound ceil(rows / ranks) / rows
                out[f"share_{tag}"] = 0.0 if ctx.is_leader or got is None else got.shape[3] / ref.shape[3]
                out[f"bound_{tag}"] = math.ceil(rows / world) / rows
            out[f"{kind}_restored"] = float(vae.decoder is dec.whole)
    from engine.models.patch_vae import PatchVAE  # the embedded model's linear VAE: no DistVAE adapter

    dec = parallelize_vae(PatchVAE(), ctx)
    out["patch_vae_sharded"] = float(dec.sharded is not None)
    out["patch_vae_reason"] = float("no decoder adapter" in (dec.reason or ""))
    return out


@scenario
def worker_decode():
    """The Worker on a tiny Wan pipeline with Ulysses over every rank: the video decoded over the replica's ranks
    equals the leader-only decode (vae_parallel off), and only the leader returns frames."""
    from engine.runtime.request import GenerationRequest
    from engine.runtime.worker import Worker, WorkerConfig
    from engine.testbed.tiny_wan import ensure_tiny

    world = dist.get_world_size()
    if dist.get_rank() == 0:  # one builder: the others would race it (and transformers saves weights on rank 0 only)
        ensure_tiny("t2v")  # under FIS_CACHE, the session's folder (conftest)
    dist.barrier()
    model = str(ensure_tiny("t2v"))
    req = GenerationRequest(prompt="a red ball moving left", height=64, width=64, num_frames=9, steps=2)
    out = {}
    runs = {}
    for mode in ("auto", "off"):
        worker = Worker(WorkerConfig(model=model, ulysses=world, vae_parallel=mode))
        r = worker.generate(req)
        runs[mode] = r
        out[f"ranks_{mode}"] = float(r["metrics"]["decode"]["ranks"])
        out[f"frames_{mode}"] = float(r["frames"] is not None)  # max over ranks: 1 (the leader)
        out[f"nonleader_frames_{mode}"] = float(r["frames"] is not None and not worker.ctx.is_leader)
    out["video_diff"] = (
        float(abs(runs["auto"]["frames"] - runs["off"]["frames"]).max()) if runs["auto"]["frames"] is not None else 0.0
    )
    return out
