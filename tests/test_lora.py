"""LoRA loading as for Wan 2.2 Lightning: high-noise LoRA -> transformer, low-noise -> transformer_2."""

import pytest
import torch

from engine.errors import UserError
from engine.runtime.worker import Worker, WorkerConfig


def make_lora(pipe_path, out_dir, seed):
    """A random LoRA in diffusers' saved format, made offline with peft."""
    from diffusers import WanPipeline, WanTransformer3DModel
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(seed)
    t = WanTransformer3DModel.from_pretrained(pipe_path, subfolder="transformer")
    t.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
    sd = get_peft_model_state_dict(t)
    meta = t.peft_config["default"].to_dict()  # carries lora_alpha, so the loader must scale by alpha/r
    WanPipeline.save_lora_weights(
        out_dir, transformer_lora_layers=sd, weight_name="lora.safetensors", transformer_lora_adapter_metadata=meta
    )
    return out_dir / "lora.safetensors", sd


def test_loras_are_fused_into_each_expert(tiny_path, tmp_path):
    path = tiny_path("a14b")
    (tmp_path / "hi").mkdir(), (tmp_path / "lo").mkdir()
    hi, hi_sd = make_lora(path, tmp_path / "hi", 1)
    lo, lo_sd = make_lora(path, tmp_path / "lo", 2)
    base = Worker(WorkerConfig(model=str(path)))
    w = Worker(WorkerConfig(model=str(path), lora=str(hi), lora_2=str(lo), lora_scale=0.5))
    for t0, t1, sd in (
        (base.pipe.transformer, w.pipe.transformer, hi_sd),
        (base.pipe.transformer_2, w.pipe.transformer_2, lo_sd),
    ):
        key = "blocks.0.attn1.to_q"
        a, b = sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"]
        expect = t0.blocks[0].attn1.to_q.weight + 0.5 * (8 / 4) * b @ a  # W + scale * alpha/r * B A
        torch.testing.assert_close(t1.blocks[0].attn1.to_q.weight, expect)
        assert not any("lora" in n for n, _ in t1.named_parameters())  # fused, adapters unloaded


def test_lora_errors(tiny_path, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Worker(WorkerConfig(model=str(tiny_path("t2v")), lora=str(tmp_path / "missing.safetensors")))
    with pytest.raises(UserError, match="no transformer_2"):
        Worker(WorkerConfig(model=str(tiny_path("t2v")), lora_2=str(tmp_path)))
