"""Real-size architectures with random weights, built directly on the GPU (no download), and the offline tokenizer
they (and the tiny test pipelines) use.

Used by the benchmarks (engine/bench/) and by `--model random:<name>` in launch/generate.py, so a real-size run of
the whole engine needs no weights: speed is the same as with trained weights. The configs are the model families'
own (engine/models/wan.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace

import torch

from engine.compat import keep_in_fp32_modules
from fis import DiTDims

from . import wan

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
# Text encoders of the real size (transformers configs): Wan's umT5-XXL (google/umt5-xxl, 5.7B, 24 layers of 4096)
# and HunyuanVideo 1.5's Qwen2.5-VL-7B language model (28 layers of 3584, grouped-query attention).
UMT5_XXL = dict(
    vocab_size=256384,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6,
    tie_word_embeddings=False,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)
QWEN25_VL_7B = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=128000,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
)
_TINY_TEXT = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8)
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
    text_encoder: dict = field(default_factory=lambda: dict(UMT5_XXL))  # UMT5Config of the real text encoder

    def size(self, resolution: str) -> tuple[int, int]:
        return self.sizes.get(resolution, wan.RESOLUTIONS[resolution])

    @property
    def dims(self) -> DiTDims:
        return DiTDims.from_wan_config(self.transformer, vae_s=self.vae_s, text_len=self.text_len)

    def tiny(self) -> ModelSpec:
        """Same structure (experts, channels, per-token timesteps, VAE kind) at toy width, for the CPU smoke run."""
        return replace(
            self,
            name=f"{self.name} (tiny)",
            transformer={**self.transformer, **_TINY},
            vae={**self.vae, **_TINY_VAE},
            text_len=16,
            text_encoder={**self.text_encoder, **_TINY_TEXT, "d_model": _TINY["text_dim"]},
        )


MODELS = {
    "wan2.2-a14b": ModelSpec("wan2.2-a14b", wan.A14B, experts=2, boundary_ratio=0.875),
    # 16x VAE + 2x2 patch: sides divisible by 32
    "wan2.2-ti2v-5b": ModelSpec(
        "wan2.2-ti2v-5b", wan.TI2V_5B, expand_timesteps=True, vae=wan.VAE_2_2, vae_s=16, sizes={"720p": (704, 1280)}
    ),
    "wan2.1-1.3b": ModelSpec("wan2.1-1.3b", wan.T2V_1_3B),
}
VOCAB_TEXT = (
    "a the an of on in with and at to over under moving left right up down quickly slowly red green blue "
    "yellow white black orange purple circle square triangle ball cat dog car bird tree sky sea city night "
    "day dark light background bright small large video of walking running flying driving"
)


def build_tokenizer(max_length: int = 32, vocab_text: str = VOCAB_TEXT):
    """A word-level tokenizer trained offline with `tokenizers`, wrapped for transformers."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"])
    tok.train_from_iterator([vocab_text], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_transformer(config: dict, device: torch.device, seed: int, dtype: torch.dtype):
    """Random-weight WanTransformer3DModel, materialised directly on the device in `dtype` (bf16 on a GPU: 14B never
    exists in fp32).

    Like `from_pretrained(torch_dtype=bf16)`, the `_keep_in_fp32_modules` (norms, modulation table, time embedder)
    are fp32, so the elementwise work is the real one. diffusers' default init keeps the residual stream bounded
    (hidden RMS 0.58 -> 0.60 over the 30 blocks of the 1.3B config), so it needs no rescaling.
    """
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        model = WanTransformer3DModel(**config)
    keep = keep_in_fp32_modules(model)
    for name, p in model.named_parameters():
        if any(k in name.split(".") for k in keep):
            p.data = p.data.float()
    return model.eval().requires_grad_(False)


def build_block(config: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """One WanTransformerBlock of `config` (`dtype`, fp32 norms/modulation), for the kernel sweep."""
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    torch.manual_seed(seed)
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    with torch.device(device), default_dtype(dtype):
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


def build_text_encoder(config: dict, device: torch.device, dtype: torch.dtype, seed: int = 0, vocab: int | None = None):
    """Random-weight UMT5EncoderModel of `config` (UMT5_XXL: the real one), materialised on the device in `dtype`.
    vocab: a smaller vocabulary (the offline tokenizer's) for the small encoders; the real one keeps its 256k rows."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        model = UMT5EncoderModel(UMT5Config(**{**config, **({"vocab_size": vocab} if vocab else {})}))
    return model.eval().requires_grad_(False)


def build_qwen_text(device: torch.device, dtype: torch.dtype, seed: int = 0, config: dict | None = None):
    """Random-weight Qwen2.5-VL language model (HunyuanVideo 1.5's prompt encoder), real size unless `config`."""
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        model = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(**(config or QWEN25_VL_7B)))
    return model.eval().requires_grad_(False)


def build_random_pipeline(
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    text: str = "small",
    spec: ModelSpec | None = None,
):
    """A whole WanPipeline of real size with random weights: `--model random:wan2.2-a14b`.

    The transformers are the real architecture in `dtype` (the engine's auto: bf16 on GPU, fp32 on CPU); the VAE is
    the real config in fp32. text: 'small' (default; a one-layer umT5 of the real width: the text encoder is not what
    `--model random:` times) or 'real' (the spec's text encoder, umT5-XXL, in `dtype`: what the end-to-end benchmark
    times). spec: a ModelSpec to build instead of MODELS[name] (its tiny() variant for CPU smoke runs).
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    spec = spec or MODELS[name]
    tokenizer = build_tokenizer(max_length=spec.text_len)
    if text == "real":
        text_encoder = build_text_encoder(spec.text_encoder, device, dtype, seed)
    else:
        small = dict(d_model=spec.transformer["text_dim"], d_kv=64, d_ff=256, num_layers=1, num_heads=8)
        text_encoder = build_text_encoder({**UMT5_XXL, **small}, device, dtype, seed, vocab=len(tokenizer))
    with torch.device(device):
        vae = AutoencoderKLWan(**spec.vae).eval()
    experts = [build_transformer(spec.transformer, device, seed + i, dtype) for i in range(spec.experts)]
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
