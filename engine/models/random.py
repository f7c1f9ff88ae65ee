"""Real-size Wan architectures with random weights, built directly on the GPU (no download).

Used by the benchmark (engine/bench/run.py) and by `--model random:<name>` in launch/generate.py, so a
real-size run of the whole engine needs no weights: speed is the same as with trained weights.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace

import torch

from engine.runtime.loader import pick_dtype
from engine.runtime.request import RESOLUTIONS
from fis import DiTDims

_WAN = dict(
    patch_size=(1, 2, 2),
    attention_head_dim=128,
    text_dim=4096,
    freq_dim=256,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
# Wan 2.2 VAE (TI2V-5B, 48 latent channels); AutoencoderKLWan's defaults are the Wan 2.1 VAE. Latent statistics
# only rescale the input, so neutral ones keep the timing real.
_VAE_2_2 = dict(
    base_dim=160,
    decoder_base_dim=256,
    z_dim=48,
    in_channels=12,
    out_channels=12,
    patch_size=2,
    is_residual=True,
    scale_factor_spatial=16,
    scale_factor_temporal=4,
    latents_mean=[0.0] * 48,
    latents_std=[1.0] * 48,
)
_TINY = dict(
    num_attention_heads=2,
    attention_head_dim=16,
    text_dim=32,
    freq_dim=32,
    ffn_dim=64,
    num_layers=6,
    rope_max_seq_len=64,
)
_TINY_VAE = dict(base_dim=8, decoder_base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
TINY_VIDEO = (33, 64, 64)  # frames, height, width: 9 latent frames, so stride 5 still leaves interpolated frames


@dataclass(frozen=True)
class ModelSpec:
    name: str
    transformer: dict  # WanTransformer3DModel config
    experts: int = 1  # Wan 2.2 A14B: high-noise expert, then low-noise expert
    boundary_ratio: float | None = None  # switch to expert 2 below boundary_ratio * 1000 (WanPipeline)
    expand_timesteps: bool = False  # TI2V-5B: one timestep per token, temb [B, N, 6, C]
    vae: dict = field(default_factory=dict)  # AutoencoderKLWan config
    vae_s: int = 8  # VAE spatial compression
    text_len: int = 512
    sizes: dict = field(default_factory=dict)  # (height, width) per resolution where the model differs from Wan's

    def size(self, resolution: str) -> tuple[int, int]:
        return self.sizes.get(resolution, RESOLUTIONS[resolution])

    @property
    def dims(self) -> DiTDims:
        return DiTDims.from_wan_config(self.transformer, vae_s=self.vae_s, text_len=self.text_len)

    def tiny(self) -> "ModelSpec":
        """Same structure (experts, channels, per-token timesteps, VAE kind) at toy width, for the CPU smoke run."""
        return replace(
            self,
            name=f"{self.name} (tiny)",
            transformer={**self.transformer, **_TINY},
            vae={**self.vae, **_TINY_VAE},
            text_len=16,
        )


MODELS = {
    "wan2.2-a14b": ModelSpec(
        "wan2.2-a14b",
        dict(_WAN, num_attention_heads=40, in_channels=16, out_channels=16, ffn_dim=13824, num_layers=40),
        experts=2,
        boundary_ratio=0.875,
    ),
    "wan2.2-ti2v-5b": ModelSpec(
        "wan2.2-ti2v-5b",
        dict(_WAN, num_attention_heads=24, in_channels=48, out_channels=48, ffn_dim=14336, num_layers=30),
        expand_timesteps=True,
        vae=_VAE_2_2,
        vae_s=16,
        sizes={"720p": (704, 1280)},
    ),  # 16x VAE + 2x2 patch: sides divisible by 32
    "wan2.1-1.3b": ModelSpec(
        "wan2.1-1.3b", dict(_WAN, num_attention_heads=12, in_channels=16, out_channels=16, ffn_dim=8960, num_layers=30)
    ),
}


def model_dtype(device: torch.device) -> torch.dtype:
    """bf16 on the GPU (the benchmark); fp32 for the CPU smoke run, where bf16 matmuls are emulated and slow:
    the engine's 'auto' dtype."""
    return pick_dtype("auto", device)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_transformer(config: dict, device: torch.device, seed: int):
    """Random-weight WanTransformer3DModel, materialised directly on the GPU in bf16 (14B never exists in fp32).

    Like `from_pretrained(torch_dtype=bf16)`, the `_keep_in_fp32_modules` (norms, modulation table, time embedder)
    are fp32, so the elementwise work is the real one. diffusers' default init keeps the residual stream bounded
    (hidden RMS 0.58 -> 0.60 over the 30 blocks of the 1.3B config), so it needs no rescaling.
    """
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    with torch.device(device), default_dtype(model_dtype(device)):
        model = WanTransformer3DModel(**config)
    keep = model._keep_in_fp32_modules
    for name, p in model.named_parameters():
        if any(k in name.split(".") for k in keep):
            p.data = p.data.float()
    return model.eval().requires_grad_(False)


def build_block(config: dict, device: torch.device, seed: int = 0):
    """One WanTransformerBlock of `config` (bf16, fp32 norms/modulation), for the kernel sweep."""
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    torch.manual_seed(seed)
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    with torch.device(device), default_dtype(model_dtype(device)):
        block = WanTransformerBlock(
            dim,
            config["ffn_dim"],
            config["num_attention_heads"],
            config["qk_norm"],
            config["cross_attn_norm"],
            config["eps"],
        )
    for name, p in block.named_parameters():
        if name.split(".")[0] in ("scale_shift_table", "norm1", "norm2", "norm3"):
            p.data = p.data.float()
    return block.eval().requires_grad_(False)


def build_random_pipeline(name: str, device: torch.device, seed: int = 0):
    """A whole WanPipeline of real size with random weights: `--model random:wan2.2-a14b`.

    The transformers are the real architecture in bf16 (fp32 on CPU); the VAE is the real config in fp32;
    the text encoder is a one-layer umT5 of the real width (the text encoder is not what is being timed).
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    from engine.testbed.tiny_wan import build_tokenizer

    spec = MODELS[name]
    tokenizer = build_tokenizer(max_length=spec.text_len)
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(model_dtype(device)):
        text_encoder = UMT5EncoderModel(
            UMT5Config(
                vocab_size=len(tokenizer),
                d_model=spec.transformer["text_dim"],
                d_kv=64,
                d_ff=256,
                num_layers=1,
                num_heads=8,
                pad_token_id=0,
                eos_token_id=1,
                decoder_start_token_id=0,
            )
        ).eval()
    with torch.device(device):
        vae = AutoencoderKLWan(**spec.vae).eval()
    experts = [build_transformer(spec.transformer, device, seed + i) for i in range(spec.experts)]
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        transformer=experts[0],
        transformer_2=experts[1] if spec.experts > 1 else None,
        boundary_ratio=spec.boundary_ratio,
        expand_timesteps=spec.expand_timesteps,
    )
