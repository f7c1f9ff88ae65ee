"""What differs between the supported pipelines' __call__, so the Worker drives them all one way.

Wan               encode_prompt -> (positive, negative) embeddings; guidance_scale; callback_on_step_end;
                  height/width
HunyuanVideo 1.5  encode_prompt -> Qwen2.5-VL and ByT5 embeddings + masks, per branch; a `guider` object
                  (ClassifierFreeGuidance) instead of guidance_scale; no step callback; I2V takes the video
                  size from the reference image instead of height/width
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

WAN_TEXT_LEN = 512  # Wan's text length (umT5 tokens)
_HY_TEXT = ("prompt_embeds", "prompt_embeds_mask", "prompt_embeds_2", "prompt_embeds_mask_2")


class PipelineCall:
    def __init__(self, pipe, arch: str):
        self.pipe, self.arch = pipe, arch
        self.params = set(inspect.signature(type(pipe).__call__).parameters)
        if arch == "hunyuanvideo1.5" and "image" in self.params and "height" not in self.params:
            pipe.video_processor = image_sized(pipe.video_processor)

    def encode_text(self, prompt: str, negative: str, cfg: bool, device) -> dict:
        """The prompt through the pipeline's own encode_prompt, before the call (timed as text_encode_s);
        the negative prompt only with CFG. Returns the call's embedding keyword arguments."""
        pipe = self.pipe
        if self.arch == "hunyuanvideo1.5":
            dtype = pipe.transformer.dtype
            kw = dict(zip(_HY_TEXT, pipe.encode_prompt(prompt, device=device, dtype=dtype)))
            if cfg:  # "" is encoded as the pipeline encodes a missing negative prompt
                kw.update(
                    zip(("negative_" + n for n in _HY_TEXT), pipe.encode_prompt(negative, device=device, dtype=dtype))
                )
            return kw
        pos, neg = pipe.encode_prompt(
            prompt,
            negative or None,
            do_classifier_free_guidance=cfg,
            max_sequence_length=self.text_len(),
            device=device,
        )
        return {"prompt_embeds": pos, "negative_prompt_embeds": neg}

    def text_len(self) -> int:
        """Wan pads text to 512 tokens; a model whose tokenizer declares fewer (the embedded one: 32) was
        trained on that length, and 480 extra padding tokens would dilute its cross-attention."""
        tok = getattr(self.pipe, "tokenizer", None)
        declared = getattr(tok, "model_max_length", WAN_TEXT_LEN) or WAN_TEXT_LEN
        return min(WAN_TEXT_LEN, int(declared))

    def guidance(self, scale: float) -> dict:
        """guidance_scale where the pipeline takes it; else set on its guider: enabled only above 1, as Wan
        runs CFG only for guidance_scale > 1 (guidance 1 = one transformer call per step)."""
        if "guidance_scale" in self.params:
            return {"guidance_scale": scale}
        guider = getattr(self.pipe, "guider", None)
        if guider is not None:
            guider.guidance_scale = scale
            guider.enable() if scale > 1.0 else guider.disable()
        return {}

    def size(self, height: int, width: int) -> dict:
        """HunyuanVideo 1.5 I2V has no height/width: the fitted reference image carries the size."""
        return {"height": height, "width": width} if "height" in self.params else {}

    @contextmanager
    def on_step_end(self, fn):
        """fn(pipe, i, t, {'latents': ...}) after every denoising step: as callback_on_step_end where the
        pipeline has one; else after each scheduler.step, which the pipeline calls once per step after all
        guidance branches. Yields the call's keyword arguments."""
        if "callback_on_step_end" in self.params:
            yield {"callback_on_step_end": fn}
            return
        scheduler = self.pipe.scheduler
        inner, count = scheduler.step, [0]

        def step(*args, **kwargs):
            out = inner(*args, **kwargs)
            latents = out[0] if isinstance(out, tuple) else out.prev_sample
            i, count[0] = count[0], count[0] + 1
            fn(self.pipe, i, None, {"latents": latents})
            return out

        scheduler.step = step  # an instance attribute over the method, for this call only
        try:
            yield {}
        finally:
            del scheduler.step


def image_sized(processor):
    """HunyuanVideo 1.5 I2V's image processor, except that the video takes the reference image's size rather
    than the nearest of the model's training sizes: the engine fits the image to the requested size first
    (engine/runtime/images.py), so a request's height/width mean the same for every model."""
    from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

    class ImageSized(HunyuanVideo15ImageProcessor):
        def calculate_default_height_width(self, height: int, width: int, target_size: int):
            return height, width

    return ImageSized.from_config(processor.config)
