"""HunyuanVideo 1.5: sequence parallelism (joint text tokens) in 2 and 4 gloo processes; the mask-free attention.

Every parallel output is compared with the single-process output of the unmodified diffusers model (dense
[B, 1, S, S] mask, its own processor), dense and with FIS stride 3.
"""

from __future__ import annotations

import json

import parallel_worker
import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port, tiny_hunyuan_transformer

from engine.hooks.fis import apply_fis, remove_fis
from fis import FISConfig
from parallel import Degrees, ParallelContext, drop_text_padding, parallelize_transformer
from parallel.joint import JointAttention, install_joint_attention

TOL = 1e-5
SHAPES = ((6, 4, 6), (7, 3, 5))  # latent [F, H, W]: even for 2 ranks in both layouts; 7 frames / 15 tokens: not
TEXTS = ("padded", "trimmed", "full", "batch")
FIS = FISConfig(stride=3, dense_head=1, dense_tail=1)


def _inputs(shape, text: str):
    """text: 'padded' (t2v: padded Qwen and ByT5 tokens, zero image = 4 padded tokens: 5 of 12 valid), 'full'
    (i2v: every token valid, so no mask) or 'batch' (two padded prompts of different lengths: a key mask)."""
    g = torch.Generator().manual_seed(1)
    batch = 2 if text == "batch" else 1
    mask, mask_2 = torch.ones(batch, 5, dtype=torch.long), torch.ones(batch, 3, dtype=torch.long)
    if text != "full":
        mask[:, 3:], mask_2[:, 2:] = 0, 0
        mask[1:, 1:] = 0  # the second prompt is shorter
    image = torch.randn(batch, 4, 8, generator=g) * (text == "full")
    args = (
        torch.randn(batch, 9, *shape, generator=g),
        torch.tensor([600.0] * batch),
        torch.randn(batch, 5, 16, generator=g),
        mask,
    )
    return args, {
        "encoder_hidden_states_2": torch.randn(batch, 3, 8, generator=g),
        "encoder_attention_mask_2": mask_2,
        "image_embeds": image,
        "return_dict": False,
    }


@torch.no_grad()
def _run(m, shape, text):
    args, kw = _inputs(shape, text)
    return m(*args, **kw)[0]


# ---- 2 processes -------------------------------------------------------------------------------------------
def hunyuan_sp():
    """Both layouts x (padded text, padded text trimmed, no padding, a batch of unequal prompts) x dense / FIS x
    even / uneven token counts (the text splits unevenly too: 5 valid tokens over 2 ranks)."""
    diff, world = parallel_worker._diff, torch.distributed.get_world_size()
    ctx = parallel_worker._ctx(ulysses=world)
    m, out = tiny_hunyuan_transformer(heads=world), {}
    for shape in SHAPES if world == 2 else SHAPES[1:]:  # 4 ranks (time): the uneven shape, no mask and a key mask
        for text in TEXTS if world == 2 else TEXTS[1::2]:
            given = "padded" if text == "trimmed" else text
            dense = _run(m, shape, given)  # diffusers' own attention, dense mask
            for fis in (False, True):
                if fis:
                    apply_fis(m, FIS).begin(4)
                ref = _run(m, shape, given) if fis else dense
                tag = f"{'x'.join(map(str, shape))}_{text}_{'fis' if fis else 'dense'}"
                if fis:
                    out[f"fis_effect_{tag}"] = diff(ref, dense)  # FIS really ran
                for mode in ("spatial", "frame"):
                    undo = drop_text_padding(m) if text == "trimmed" else None  # FIS, trim, then parallelism
                    handle = parallelize_transformer(m, ctx, shard=mode)
                    out[f"{mode}_{tag}"] = diff(_run(m, shape, given), ref)
                    handle.remove()
                    if undo:
                        undo()
                out[f"removed_{tag}"] = diff(_run(m, shape, given), ref)
                if fis:
                    remove_fis(m)
    return out


def hunyuan_cfg():
    """The tiny HunyuanVideo 1.5 pipeline (guider-driven CFG) with a cfg degree 2 (x ulysses on 4 processes)
    equals serial CFG on one process: dense and FIS, padding kept and dropped (the Worker drops it), and a guider
    whose CFG starts at the second step (step 0 has no uncond call). One transformer call per step per rank."""
    from diffusers import ClassifierFreeGuidance

    from engine.runtime.pipelines import PipelineCall
    from engine.testbed.tiny_hunyuan import build_pipeline
    from parallel import parallelize_pipeline

    diff, world = parallel_worker._diff, torch.distributed.get_world_size()
    ctx = parallel_worker._ctx(cfg=2, ulysses=world // 2)
    pipe = build_pipeline("t2v")
    pipe.set_progress_bar_config(disable=True)
    calls, out = [0], {}
    pipe.transformer.transformer_blocks[0].register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    steps = 3

    def generate(state):
        if state is not None:
            state.begin(steps)
        with (
            PipelineCall(pipe, "hunyuanvideo1.5").on_step_end(state.step_callback if state else lambda *a: {}) as kw,
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
            state = apply_fis(pipe.transformer, FIS) if fis else None
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


def _spawned(rank, world, port, path, names):
    parallel_worker.SCENARIOS["hunyuan_sp"] = hunyuan_sp
    parallel_worker.SCENARIOS["hunyuan_cfg"] = hunyuan_cfg
    parallel_worker.main(rank, world, port, path, names)


@pytest.fixture(scope="module")
def sp_results(tmp_path_factory):
    """(world, scenario) -> the scenario's metrics; each world size is spawned once, for both scenarios."""
    cache = {}

    def get(world: int, scenario: str = "hunyuan_sp") -> dict:
        if world not in cache:
            path = tmp_path_factory.mktemp("hunyuan_sp") / f"world{world}.json"
            mp.spawn(_spawned, args=(world, free_port(), str(path), ["hunyuan_sp", "hunyuan_cfg"]), nprocs=world)
            cache[world] = json.loads(path.read_text())
        got = cache[world][scenario]
        assert "error" not in got, got.get("error")
        return got

    return get


@pytest.mark.parametrize("world", [2, 4])  # ulysses 2 (2 heads), ulysses 4 (4 heads; 4 frame ranks of 7 frames:
@pytest.mark.parametrize("prefix", ["spatial_", "frame_", "removed_"])  # a rank may hold no FIS anchor)
def test_sequence_parallel_equals_single_process(sp_results, world, prefix):
    checked = {k: v for k, v in sp_results(world).items() if k.startswith(prefix)}
    assert len(checked) == (len(SHAPES) * len(TEXTS) * 2 if world == 2 else 2 * 2), checked
    bad = {k: v for k, v in checked.items() if not v <= TOL}
    assert not bad, f"parallel != single process: {bad}"


@pytest.mark.parametrize("world", [2, 4])  # cfg 2 alone; cfg 2 x ulysses 2
def test_cfg_parallel_equals_serial_cfg(sp_results, world):
    r = sp_results(world, "hunyuan_cfg")
    tags = [k[len("cfg_") :] for k in r if k.startswith("cfg_")]
    assert len(tags) == 8, r
    bad = {k: v for k, v in r.items() if k.startswith(("cfg_", "removed_")) and not v <= TOL}
    assert not bad, f"CFG-parallel != serial CFG: {bad}"
    for tag in tags:  # 3 steps; serial: 2 calls per CFG step; parallel: 1 call per step on each rank
        late = tag.startswith("late")
        assert r[f"serial_calls_{tag}"] == (5.0 if late else 6.0) and r[f"calls_{tag}"] == 3.0, (tag, r)
    assert min(r["fis_effect_all"], r["fis_effect_late"]) > 1e-3


def test_fis_cases_were_sparse(sp_results):
    assert min(v for k, v in sp_results(2).items() if k.startswith("fis_effect")) > 1e-3


# ---- one process -------------------------------------------------------------------------------------------
def test_bad_degrees_fail_before_anything_is_attached():
    m = tiny_hunyuan_transformer(heads=4)
    ctx = ParallelContext(Degrees(ulysses=8), world_size=8)
    with pytest.raises(ValueError, match="ulysses degree 8 must divide the model's 4 attention heads"):
        parallelize_transformer(m, ctx)
    assert not hasattr(m, "_diffusers_hook")
    assert type(m.transformer_blocks[0].attn.processor).__name__ == "HunyuanVideo15AttnProcessor2_0"


class _NoMask(JointAttention):
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, None, image_rotary_emb)


@torch.no_grad()
def test_no_dense_mask_same_output():
    """JointAttention (padded keys left out, no mask), and padding dropped before the blocks, equal diffusers'
    dense-mask attention; the padding does matter (ignoring the mask changes the output), and the undo restores
    the model exactly."""
    m, shape = tiny_hunyuan_transformer(), SHAPES[1]
    ref = _run(m, shape, "padded")
    procs, undo = install_joint_attention(m)
    assert abs(_run(m, shape, "padded") - ref).max() <= TOL
    for p in procs:  # the same attention with the mask thrown away: padded tokens act as keys
        p.__class__ = _NoMask
    assert abs(_run(m, shape, "padded") - ref).max() > 1e-3
    undo()

    seen = []
    hooks = [
        b.attn.register_forward_pre_hook(
            lambda mod, a, k: seen.append((k["encoder_hidden_states"].shape[1], k["attention_mask"])), with_kwargs=True
        )
        for b in m.transformer_blocks
    ]
    for fis in (False, True):
        if fis:
            apply_fis(m, FIS).begin(4)
            ref = _run(m, shape, "padded")
        undo = drop_text_padding(m)
        seen.clear()
        assert abs(_run(m, shape, "padded") - ref).max() <= TOL
        assert seen == [(5, None)] * 5  # 12 text tokens, 5 valid: no mask reaches the attention
        undo()
        assert torch.equal(_run(m, shape, "padded"), ref)
        if fis:
            remove_fis(m)
    for h in hooks:
        h.remove()
    assert type(m.transformer_blocks[0].attn.processor).__name__ == "HunyuanVideo15AttnProcessor2_0"


@torch.no_grad()
def test_batch_of_unequal_prompts():
    """Two prompts of different lengths in one batch: a [B, 1, 1, S] key mask; trimmed to the longer prompt."""
    m, shape = tiny_hunyuan_transformer(), SHAPES[0]
    ref = _run(m, shape, "batch")
    for install in (install_joint_attention, drop_text_padding):
        undo = install(m)
        undo = undo[1] if isinstance(undo, tuple) else undo
        assert abs(_run(m, shape, "batch") - ref).max() <= TOL
        undo()
