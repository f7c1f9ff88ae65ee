"""Driving every supported pipeline's __call__ one way. What a family does differently in prompt encoding and
pipeline fixes lives in its engine/models/ module; what differs in the call's signature is read from it here:

  guidance   guidance_scale (Wan) or a `guider` object (HunyuanVideo 1.5)
  size       height/width, except HunyuanVideo 1.5 I2V, which takes the size from the fitted reference image
  steps      callback_on_step_end, or (HunyuanVideo 1.5) a wrapper around scheduler.step
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

from engine.models import ModelFamily


class PipelineCall:
    def __init__(self, pipe, family: ModelFamily):
        self.pipe, self.family = pipe, family
        self.params = set(inspect.signature(type(pipe).__call__).parameters)
        family.prepare_pipeline(pipe)

    def encode_text(self, prompt: str, negative: str, cfg: bool, device) -> dict:
        """The prompt through the pipeline's own encode_prompt, before the call (timed as text_encode_s);
        the negative prompt only with CFG. Returns the call's embedding keyword arguments."""
        return self.family.encode_text(self.pipe, prompt, negative, cfg, device)

    def text_len(self) -> int:
        return self.family.text_len(self.pipe)

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
