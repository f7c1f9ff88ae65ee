"""Tiny HunyuanVideo 1.5 pipelines built offline (random weights, locally trained tokenizers).

Like engine/testbed/tiny_wan.py: built once, `save_pretrained` to a folder, loaded back with `from_pretrained`, so the
real loading path runs. Every component has the class the diffusers pipeline expects, at toy size:
  t2v   HunyuanVideo15Pipeline               Qwen2.5-VL text model + ByT5 glyph encoder, VAE x16 / x4
  i2v   HunyuanVideo15ImageToVideoPipeline   + SigLIP image encoder (its tokens join the context)
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.models.random import VOCAB_TEXT as _WORDS

VARIANTS = ("t2v", "i2v")
_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_pad|>"]
TEXT_DIM, GLYPH_DIM, IMAGE_DIM = 32, 16, 16  # Qwen2.5-VL hidden, ByT5 d_model, SigLIP hidden


def build_qwen_tokenizer(system_message: str):
    """A byte-level BPE trained offline on a few words and the pipeline's system message, as Qwen2Tokenizer
    (the class the pipeline names). Any text tokenizes: every byte is in the vocabulary."""
    import json

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    # Qwen2Tokenizer's own pre-tokenizer, so that the merges learnt here join exactly its pieces
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=_SPECIAL,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator([_WORDS, "system\nuser\nassistant\n", system_message], trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=merges,
        padding_side="right",
        extra_special_tokens={"im_start": "<|im_start|>", "im_end": "<|im_end|>", "vision_pad": "<|vision_pad|>"},
    )
    tok.model_max_length = 4096
    return tok


def chat_template(tok, system_message: str, crop_start: int) -> str:
    """Qwen's chat layout, with the system turn padded so that it and the user turn's header are exactly
    `crop_start` tokens, as the pipeline assumes when it crops them off the encoder output."""
    head = "<|im_start|>system\n{sys}<|im_end|>\n<|im_start|>user\n"
    n = len(tok(head.format(sys=system_message), add_special_tokens=False).input_ids)
    if n > crop_start:
        raise ValueError(f"the tiny tokenizer's template header is {n} tokens, more than crop_start {crop_start}")
    pad = "<|vision_pad|>" * (crop_start - n)
    return (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'system' %}"
        + pad
        + "{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def build_pipeline(variant: str = "t2v", seed: int = 0, num_layers: int = 6):
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        ClassifierFreeGuidance,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15ImageToVideoPipeline,
        HunyuanVideo15Pipeline,
        HunyuanVideo15Transformer3DModel,
    )
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny HunyuanVideo variant {variant!r}; valid: {', '.join(VARIANTS)}")
    torch.manual_seed(seed)
    cls = HunyuanVideo15Pipeline if variant == "t2v" else HunyuanVideo15ImageToVideoPipeline
    import inspect

    system_message = inspect.signature(cls._get_mllm_prompt_embeds).parameters["system_message"].default
    tokenizer = build_qwen_tokenizer(system_message)
    # head_dim 16: the multimodal RoPE sections (t, h, w) must add up to head_dim / 2
    text_encoder = Qwen2_5_VLTextModel(
        Qwen2_5_VLTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_DIM,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=2048,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=tokenizer.pad_token_id,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        )
    ).eval()
    tokenizer_2 = ByT5Tokenizer()  # bytes: no vocabulary file
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=GLYPH_DIM,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    ).eval()
    # five levels: x16 spatial, x4 temporal, as the real VAE; 4 latent channels
    vae = AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1).eval()
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=2 * 4 + 1,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=num_layers,
        num_refiner_layers=1,
        text_embed_dim=TEXT_DIM,
        text_embed_2_dim=GLYPH_DIM,
        image_embed_dim=IMAGE_DIM,
        rope_axes_dim=(4, 6, 6),
        target_size=64,
        task_type=variant,
    ).eval()
    parts = dict(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        guider=ClassifierFreeGuidance(guidance_scale=6.0),
    )
    if variant == "i2v":
        from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

        parts["image_encoder"] = SiglipVisionModel(
            SiglipVisionConfig(
                hidden_size=IMAGE_DIM,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=32,
                patch_size=8,
            )
        ).eval()
        parts["feature_extractor"] = SiglipImageProcessor(size={"height": 32, "width": 32})
    pipe = cls(**parts)
    tokenizer.chat_template = chat_template(tokenizer, pipe.system_message, pipe.prompt_template_encode_start_idx)
    return pipe


def ensure_tiny_hunyuan(variant: str = "t2v", root: Path | None = None) -> Path:
    """Build and save the tiny pipeline once; return its folder (a normal diffusers pipeline folder)."""
    from .tiny_wan import saved_once

    return saved_once(f"tiny-hunyuanvideo15-{variant}-v1", lambda: build_pipeline(variant), root)
