"""The Worker: one per GPU (or CPU process). Loads the pipeline once, serves many requests.

torchrun (launch/generate.py), Ray Serve and batch rendering all drive the same class, by method
name through `execute`, so the model code path is identical everywhere.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.hooks.attention_backend import set_attention_backend
from engine.hooks.compile import compile_blocks
from engine.hooks.fis import FISState, apply_fis
from engine.models.spec import ADAPTERS
from engine.runtime import timing as M
from fis import UNIT, DiTDims, generation_flops
from parallel import Degrees, drop_text_padding, init_parallel, parallelize_pipeline, world_size_from_env

from .images import prepare as prepare_image
from .loader import (
    EMBEDDED_NAME,
    load_loras,
    load_pipeline,
    model_info,
    pick_device,
    pick_dtype,
    set_scheduler,
    transformers_of,
)
from .pipelines import PipelineCall
from .request import GenerationRequest, UserError, validate


class Cancelled(Exception):
    """Raised from the step callback when the caller cancels a running job."""


@dataclass
class WorkerConfig:
    model: str | None = None  # pipeline folder or hub id; None = the embedded model (engine/weights)
    device: str = "auto"
    dtype: str = "auto"
    lora: str | None = None  # -> transformer (Wan 2.2: high-noise expert)
    lora_2: str | None = None  # -> transformer_2 (low-noise expert)
    lora_scale: float = 1.0
    scheduler: str = "default"  # 'euler' + shift 5 for Wan 2.2 Lightning
    shift: float | None = None
    attention_backend: str | None = None  # diffusers backend name, e.g. '_native_cudnn'
    compile: str = "off"  # torch.compile of the blocks: off, static (a graph per token count), auto
    # one video over several processes (torchrun / a Ray worker group): see parallel/
    cfg_parallel: int = 1  # 2: cond and uncond branches on two rank groups
    ulysses: int | None = None  # None: whatever the world size leaves after cfg and ring
    ring: int = 1
    shard: str = "spatial"  # 'spatial' (every rank a slice of every frame) or 'frame'
    sp_attention: str = "diffusers"  # 'diffusers' (native context parallelism) or 'xfuser' (CUDA only)
    dp: int = 1  # replicas rendering different videos (batch rendering under torchrun)

    def degrees(self) -> Degrees:
        ulysses = self.ulysses or max(1, world_size_from_env() // (self.dp * self.cfg_parallel * self.ring))
        return Degrees(cfg=self.cfg_parallel, ulysses=ulysses, ring=self.ring, dp=self.dp)


class Worker:
    def __init__(self, cfg: WorkerConfig):
        self.cfg = cfg
        try:
            self.ctx = init_parallel(cfg.degrees())  # checks the degrees against the launch first
        except ValueError as e:
            raise UserError(str(e)) from None
        self.rank = self.ctx.rank
        self.device = self.ctx.device if self.ctx.is_distributed else pick_device(cfg.device)
        dtype = pick_dtype(cfg.dtype, self.device)
        self.pipe = load_pipeline(cfg.model, self.device, dtype)
        load_loras(self.pipe, cfg.lora, cfg.lora_2, cfg.lora_scale)
        set_scheduler(self.pipe, cfg.scheduler, cfg.shift)
        self.transformers = transformers_of(self.pipe)
        supported = ", ".join(sorted(ADAPTERS))
        if not self.transformers or type(self.transformers[0]).__name__ not in ADAPTERS:
            found = type(self.transformers[0]).__name__ if self.transformers else "no transformer"
            raise UserError(f"{type(self.pipe).__name__} ({found}) is not supported; supported models: {supported}")
        self.info = model_info(self.pipe)
        self.call = PipelineCall(self.pipe, self.info.arch)
        if cfg.attention_backend and not self.ctx.is_distributed:
            for t in self.transformers:
                set_attention_backend(t, cfg.attention_backend)
        try:
            compile_blocks(self.transformers, cfg.compile)  # before the hooks: they stay eager around it
        except ValueError as e:
            raise UserError(str(e)) from None
        self.fis = FISState(None, self.info.num_blocks)  # one state for both experts
        for t in self.transformers:
            apply_fis(t, None, self.fis)
        if self.info.arch == "hunyuanvideo1.5":
            # diffusers builds a dense [B, 1, S, S] text mask in every block (1.2 GiB at 480p/81 frames) and SDPA
            # then takes a slow kernel: dropping the padding instead made the 8B dense forward 2.7x faster (H100,
            # docs/benchmarks.md), same output.
            for t in self.transformers:
                drop_text_padding(t)
        self.parallel = None
        if self.ctx.is_distributed:  # after FIS: the frame layout wraps the FIS block hooks
            try:
                self.parallel = parallelize_pipeline(
                    self.pipe, self.ctx, cfg.shard, cfg.sp_attention, cfg.attention_backend
                )
            except ValueError as e:
                raise UserError(str(e)) from None
        self.pipe.set_progress_bar_config(disable=self.rank != 0, desc="denoise", leave=False)

    def execute(self, method: str, *args, **kwargs):
        """Entry point for remote drivers (Ray actors, torchrun loops): call a method by name."""
        if method.startswith("_"):
            raise AttributeError(method)
        return getattr(self, method)(*args, **kwargs)

    def describe(self) -> dict:
        t = self.transformers[0]
        d = self.ctx.degrees
        return {
            "model": self.cfg.model or EMBEDDED_NAME,
            "pipeline": type(self.pipe).__name__,
            "arch": self.info.arch,
            "image_to_video": self.info.needs_image,
            "experts": len(self.transformers),
            "blocks": self.info.num_blocks,
            "family": self.info.family,
            "device": str(self.device),
            "dtype": str(t.dtype),
            "world_size": self.ctx.world_size,
            "degrees": {"cfg": d.cfg, "ulysses": d.ulysses, "ring": d.ring},
            "shard": self.cfg.shard if self.ctx.is_distributed else None,
        }

    def validate(self, req: GenerationRequest, fit_image: bool = True) -> GenerationRequest:
        return validate(req, self.info, fit_image)

    def dims(self) -> DiTDims:
        """The architecture as the FLOPs counter sees it."""
        cfg, vae = dict(self.transformers[0].config), dict(vae_s=self.info.vae_s, vae_t=self.info.vae_t)
        if self.info.arch == "hunyuanvideo1.5":
            return DiTDims.from_hunyuan15_config(cfg, **vae)
        return DiTDims.from_wan_config(cfg, **vae, text_len=self.call.text_len())

    def flops(self, req: GenerationRequest, fis=None) -> float:
        dims = self.dims()
        plan = (
            None
            if fis is None
            else fis.resolve(self.info.num_blocks, self.info.latent_frames(req.num_frames), req.steps)
        )
        cfg_passes = 2 if req.guidance > 1.0 else 1
        return generation_flops(dims, req.num_frames, req.height, req.width, req.steps, plan, cfg_passes)

    @torch.no_grad()
    def generate(self, req: GenerationRequest, on_step=None, cancel=None, decode: bool = True) -> dict:
        """Run one request. on_step(k, n) after each step; cancel() -> True aborts (Cancelled).
        Returns {'frames': [F, H, W, 3] float array (None if not decode), 'latents': final latents,
        'metrics': dict}."""
        req = self.validate(req, fit_image=False)  # the image is fitted just below, once
        dev, pipe = self.device, self.pipe
        extra = {}
        if self.info.needs_image:  # fitted to the video size: the pipelines' own resizing has nothing left to do
            extra["image"] = prepare_image(req.image, req.height, req.width, req.image_fit)
        M.reset_peak(dev)
        t_start = M.now(dev)
        cfg = req.guidance > 1.0
        text = self.call.encode_text(req.prompt, req.negative_prompt, cfg, dev)
        t_loop = M.now(dev)
        steps_s, final = [], {}

        def on_step_end(p, i, t, kw):
            self.fis.step = i + 1  # the pipeline's real step index: right for CFG and both experts
            tick = M.now(dev)  # one sync per step, never inside the block loop
            steps_s.append(tick - (t_loop if i == 0 else on_step_end.last))
            on_step_end.last = tick
            if i == req.steps - 1:
                final["latents"] = kw["latents"]
            if on_step is not None:
                on_step(i + 1, req.steps)
            if self._cancelled(cancel):
                raise Cancelled()
            return {}

        extra.update(**text, **self.call.guidance(req.guidance), **self.call.size(req.height, req.width))
        self.fis.begin(req.steps, req.fis)
        try:
            with self.call.on_step_end(on_step_end) as callback:
                out = pipe(
                    num_frames=req.num_frames,
                    num_inference_steps=req.steps,
                    generator=torch.Generator("cpu").manual_seed(req.seed),  # same noise on every rank
                    output_type="np" if decode and self.ctx.is_leader else "latent",  # the leader decodes
                    **callback,
                    **extra,
                )
        finally:
            self.fis.begin(1, None)
        t_end = M.now(dev)
        dense = self.flops(req)
        used = self.flops(req, req.fis)
        loop_s = sum(steps_s)
        metrics = {
            "request": req.describe(),
            "worker": self.describe(),
            "latency_s": t_end - t_start,
            "text_encode_s": t_loop - t_start,  # every text encoder, both CFG branches; I2V image encoding is in step 0
            "denoise_s": loop_s,
            "decode_s": t_end - t_loop - loop_s,
            "step_s": steps_s,
            "flops_P": used / UNIT,
            "flops_dense_P": dense / UNIT,
            "speedup_estimate": dense / used,
            "peak_memory_gib": M.peak_memory_gib(dev),
            "gpu": M.gpu_info(dev),
            "versions": versions(),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if self.ctx.degrees.cfg == 2 and not cfg:
            metrics["notes"] = [
                "guidance <= 1 runs no uncond branch: both CFG rank groups computed the same "
                "prediction; without --cfg-parallel those ranks would split the sequence instead"
            ]
        if req.fis is not None:
            plan = req.fis.resolve(self.info.num_blocks, self.info.latent_frames(req.num_frames), req.steps)
            metrics["fis"] = {
                **req.fis.to_dict(),
                "sparse_blocks": list(plan.sparse_blocks),
                "sparse_steps": [s for s in range(req.steps) if plan.step_is_sparse(s)],
            }
        frames = out.frames[0] if decode and self.ctx.is_leader else None
        return {"frames": frames, "latents": final["latents"], "metrics": metrics}

    def _cancelled(self, cancel) -> bool:
        """The replica's leader decides; every rank of the replica must stop at the same step, or the
        others would wait forever in their next collective."""
        flag = bool(cancel()) if cancel is not None and self.ctx.is_leader else False
        if self.ctx.replica_group is not None:
            t = torch.tensor([int(flag)], device=self.device)
            dist.broadcast(t, src=self.ctx.leader_rank(), group=self.ctx.replica_group)
            flag = bool(t.item())
        return flag


def versions() -> dict:
    import diffusers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__}


__all__ = ["Cancelled", "GenerationRequest", "UserError", "Worker", "WorkerConfig"]
