"""The Worker: one per GPU (or CPU process). Loads the pipeline once, serves many requests.

torchrun (launch/generate.py), Ray worker groups and batch rendering all drive the same class (through
engine/serving/executor.py, by method name: `execute`), so the model code path is identical everywhere.

A running request can be cancelled between transformer blocks, not only between steps (one step of a large video
can take minutes): a pre-hook on every block asks the request's cancel callback. Under sequence or CFG parallelism
every rank of the replica must stop at the same block, or the others would wait forever in their next collective;
so the leader decides and broadcasts, at block counts every rank reaches together, spaced (from the last step's
timing) to about a quarter second apart: a check costs one tiny broadcast, a few per second. An error the pipeline
raises before its first transformer forward (its own input checks) is the request's, not a broken worker's:
UserError, like validation's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.errors import Cancelled, UserError, one_line
from engine.hooks.attention_backend import check_attention_backend
from engine.hooks.quantize import check_quantize, resolve_quantize
from engine.models import adapter_for, family_of
from engine.runtime import timing
from fis import UNIT, DiTDims, generation_flops
from parallel import Degrees, init_parallel, world_size_from_env
from parallel.vae import parallelize_vae

from .attention import pick_backend
from .device import pick_device, pick_dtype
from .images import prepare as prepare_image
from .loader import (
    EMBEDDED_NAME,
    VAE_DTYPES,
    check_supported,
    load_loras,
    load_pipeline,
    model_info,
    set_scheduler,
    set_vae_dtype,
)
from .pipelines import PipelineCall
from .request import GenerationRequest, validate
from .setup import prepare


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
    # defaults: the fastest settings that keep quality, measured on an H200 (docs/benchmarks.md, 2026-12-01); each
    # auto falls back to the plain path on a CPU or without the package
    attention_backend: str | None = "auto"  # diffusers backend name, e.g. '_native_cudnn'; fa3; auto (fastest measured)
    compile: str = "off"  # torch.compile of the blocks: off, static (a graph per token count), auto
    quantize: str = "auto"  # fp8: torchao float8 rowwise GEMMs in the blocks (engine/hooks/quantize.py); auto
    vae_dtype: str = "auto"  # VAE decode dtype: fp32, bf16, auto (bf16 on a GPU)
    vae_parallel: str = "auto"  # auto: decode over every rank of the replica (parallel/vae.py); off: the leader alone
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
    def __init__(self, cfg: WorkerConfig, pipe=None):
        """pipe: an already built pipeline on the right device to serve instead of loading cfg.model (the end-to-end
        benchmark runs several Workers, one configuration each, on one real-size random-weight pipeline)."""
        self.cfg = cfg
        check_config(cfg)  # before anything starts or loads
        try:
            self.ctx = init_parallel(cfg.degrees())  # checks the degrees against the launch first
        except ValueError as e:
            raise UserError(str(e)) from None
        self.rank = self.ctx.rank
        self.device = self.ctx.device if self.ctx.is_distributed else pick_device(cfg.device)
        dtype = pick_dtype(cfg.dtype, self.device) if pipe is None else pipe.transformer.dtype
        check_attention_backend(cfg.attention_backend, self.device)
        check_quantize(cfg.quantize, self.device, dtype)
        self.quantize = resolve_quantize(cfg.quantize, self.device, dtype)  # auto -> fp8 or off
        self.pipe = load_pipeline(cfg.model, self.device, dtype) if pipe is None else pipe
        load_loras(self.pipe, cfg.lora, cfg.lora_2, cfg.lora_scale)
        set_scheduler(self.pipe, cfg.scheduler, cfg.shift)
        self.transformers = check_supported(self.pipe)
        self.family = family_of(self.transformers[0])
        self.info = model_info(self.pipe)
        self.call = PipelineCall(self.pipe, self.family)
        self.attention = self._attention_backend(cfg.attention_backend)  # (backend, why)
        try:  # the one attach order (engine/runtime/setup.py); FIS hooks on, FIS off until a request asks
            self.attached = prepare(
                self.transformers,
                self.pipe,
                quantize=self.quantize,
                attention_backend=self.attention[0],
                compile=cfg.compile,
                fis=None,
                optimise=True,
                ctx=self.ctx,
                shard=cfg.shard,
                sp_attention=cfg.sp_attention,
            )
        except ValueError as e:  # bad compile mode, degrees that do not fit the model, shard
            raise UserError(str(e)) from None
        self.fis = self.attached.state  # one state for both experts
        # the decode dtype first: the decoder's shards share its parameters
        self.vae_dtype = set_vae_dtype(self.pipe, cfg.vae_dtype, self.device)
        self.decoder = parallelize_vae(getattr(self.pipe, "vae", None), self.ctx, cfg.vae_parallel == "auto")
        self.interrupt = _Interrupt(self)
        self.pipe.set_progress_bar_config(disable=self.rank != 0, desc="denoise", leave=False)

    def _attention_backend(self, requested: str | None) -> tuple[str | None, str]:
        """'auto': the fastest measured at this model's heads per rank and default video size
        (engine/runtime/attention.py); anything else as given."""
        if requested != "auto":
            return requested, "--attention-backend" if requested else "default (PyTorch SDPA)"
        c = self.transformers[0].config
        h, w = self.info.default_size
        f = self.info.latent_frames(self.info.default_frames)
        tokens = f * (h // self.info.vae_s // self.info.patch[1]) * (w // self.info.vae_s // self.info.patch[2])
        return pick_backend(
            c.num_attention_heads // self.ctx.degrees.ulysses, c.attention_head_dim, tokens, self.device
        )

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
            "attention_backend": self.attention[0],
            "attention_backend_choice": self.attention[1],
            "quantize": self.attached.quantized,
            "compile": self.cfg.compile,
            "world_size": self.ctx.world_size,
            "degrees": {"cfg": d.cfg, "ulysses": d.ulysses, "ring": d.ring},
            "shard": self.cfg.shard if self.ctx.is_distributed else None,
        }

    def validate(self, req: GenerationRequest, fit_image: bool = True) -> GenerationRequest:
        return validate(req, self.info, fit_image)

    def dims(self) -> DiTDims:
        """The architecture as the FLOPs counter sees it."""
        return self.family.dims(self.transformers[0].config, self.info.vae_s, self.info.vae_t, self.call.text_len())

    def plan(self, req: GenerationRequest):
        """The request's FIS plan on this model, or None (dense). The request is validated: it fits."""
        if req.fis is None:
            return None
        return req.fis.resolve(self.info.num_blocks, self.info.latent_frames(req.num_frames), req.steps)

    def flops(self, req: GenerationRequest, plan=None) -> float:
        """Denoising FLOPs of a validated request: dense, or with FIS plan `plan`."""
        cfg_passes = 2 if req.guidance > 1.0 else 1
        return generation_flops(self.dims(), req.num_frames, req.height, req.width, req.steps, plan, cfg_passes)

    @torch.no_grad()
    def generate(
        self, req: GenerationRequest, on_step=None, cancel=None, decode: bool = True, in_step: bool = False
    ) -> dict:
        """Run one request. on_step(k, n) after each step; cancel() -> True aborts (Cancelled), asked at each step's
        end, and with in_step also between transformer blocks (cancel must then be cheap: a flag).
        Returns {'frames': [F, H, W, 3] float array (None if not decode), 'latents': final latents,
        'metrics': dict}."""
        req = self.validate(req, fit_image=False)  # the image is fitted just below, once
        dev, pipe = self.device, self.pipe
        extra = {}
        if self.info.needs_image:  # fitted to the video size: the pipelines' own resizing has nothing left to do
            extra["image"] = prepare_image(req.image, req.height, req.width, req.image_fit)
        timing.reset_peak(dev)
        t_start = timing.now(dev)
        cfg = req.guidance > 1.0
        text = self.call.encode_text(req.prompt, req.negative_prompt, cfg, dev)
        clock = _StepClock(dev, req.steps)

        def on_step_end(p, i, t, kw):
            self.fis.step = i + 1  # the pipeline's real step index: right for CFG and both experts
            clock.tick(i, kw["latents"])  # one sync per step, never inside the block loop
            if on_step is not None:
                on_step(i + 1, req.steps)
            if self._cancelled(cancel, self.interrupt.spacing(clock.steps_s[-1])):
                raise Cancelled()
            return {}

        extra.update(**text, **self.call.guidance(req.guidance), **self.call.size(req.height, req.width))
        self.fis.begin(req.steps, req.fis)
        self.interrupt.begin(cancel if in_step else None)
        try:
            # every rank of the replica decodes its band of rows when they split (parallel/vae.py); the leader
            # alone gets the whole video, and decodes alone when they do not
            rows = req.height // self.info.vae_s  # latent rows
            with self.call.on_step_end(on_step_end) as callback, self.decoder.decoding(rows) as ranks:
                out = pipe(
                    num_frames=req.num_frames,
                    num_inference_steps=req.steps,
                    generator=torch.Generator("cpu").manual_seed(req.seed),  # same noise on every rank
                    output_type="np" if decode and (self.ctx.is_leader or ranks > 1) else "latent",
                    **callback,
                    **extra,
                )
        except ValueError as e:
            if self.interrupt.started:  # mid-denoise: not an input check
                raise
            raise UserError(f"the pipeline refused the request: {one_line(e).split(': ', 1)[-1]}") from None
        finally:
            self.interrupt.end()
            self.fis.begin(1, None)
        t_end = timing.now(dev)
        frames = out.frames[0] if decode and self.ctx.is_leader else None
        metrics = self._metrics(req, t_start, clock, t_end)
        metrics["decode"] = {**self.decoder.describe(), "ranks": ranks if decode else 0, "dtype": self.vae_dtype}
        return {"frames": frames, "latents": clock.latents, "metrics": metrics}

    def _metrics(self, req: GenerationRequest, t_start: float, clock: _StepClock, t_end: float) -> dict:
        plan = self.plan(req)
        dense, used = self.flops(req), self.flops(req, plan)
        loop_s = sum(clock.steps_s)
        metrics = {
            "request": req.describe(),
            "worker": self.describe(),
            "latency_s": t_end - t_start,
            "text_encode_s": clock.t0 - t_start,  # every text encoder, both CFG branches; I2V image encoding: step 0
            "denoise_s": loop_s,
            "decode_s": t_end - clock.t0 - loop_s,
            "step_s": clock.steps_s,
            "flops_P": used / UNIT,
            "flops_dense_P": dense / UNIT,
            "speedup_estimate": dense / used,
            "peak_memory_gib": timing.peak_memory_gib(self.device),
            "gpu": timing.gpu_info(self.device),
            "versions": versions(),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if self.ctx.degrees.cfg == 2 and req.guidance <= 1.0:
            metrics["notes"] = [
                "guidance <= 1 runs no uncond branch: both CFG rank groups computed the same "
                "prediction; without --cfg-parallel those ranks would split the sequence instead"
            ]
        if plan is not None:
            metrics["fis"] = {
                **req.fis.to_dict(),
                "sparse_blocks": list(plan.sparse_blocks),
                "sparse_steps": [s for s in range(req.steps) if plan.step_is_sparse(s)],
            }
        return metrics

    def _cancelled(self, cancel, spacing: int | None = None) -> bool:
        """The replica's leader decides; every rank of the replica must stop at the same step (or block), or the
        others would wait forever in their next collective. `spacing` (at step ends): the leader's choice of how
        many blocks apart the in-step checks are from now on, sent along."""
        flag = bool(cancel()) if cancel is not None and self.ctx.is_leader else False
        if self.ctx.replica_group is not None:
            t = torch.tensor([int(flag), spacing or 0], device=self.device)
            dist.broadcast(t, src=self.ctx.leader_rank(), group=self.ctx.replica_group)
            flag, spacing = bool(t[0].item()), int(t[1].item())
        if spacing:
            self.interrupt.every = spacing
        return flag


VAE_PARALLEL = ("auto", "off")


def check_config(cfg: WorkerConfig) -> None:
    """The settings that can be refused before any process group starts or any weight loads (one line each)."""
    if cfg.vae_dtype not in VAE_DTYPES:
        raise UserError(f"unknown VAE dtype {cfg.vae_dtype!r}; valid: {', '.join(VAE_DTYPES)}", "vae_dtype")
    if cfg.vae_parallel not in VAE_PARALLEL:
        raise UserError(f"vae_parallel must be one of {', '.join(VAE_PARALLEL)}, got {cfg.vae_parallel!r}")


class _Interrupt:
    """Cancellation between transformer blocks (see the module docstring), and whether the pipeline has reached its
    first transformer forward. A forward pre-hook on every block of every transformer; while no request runs, or
    the request has no cancel callback, a hook is one attribute test."""

    TARGET_S = 0.25  # seconds between in-step checks under parallelism

    def __init__(self, worker: Worker):
        self.worker, self.cancel, self.started = worker, None, False
        self.count = self.mark = 0
        self.every = 1
        for t in worker.transformers:
            t.register_forward_pre_hook(self._forward)
            for block in getattr(t, adapter_for(t).blocks_attr):
                block.register_forward_pre_hook(self._block)

    def begin(self, cancel) -> None:
        self.cancel, self.started, self.count, self.mark, self.every = cancel, False, 0, 0, 1

    def end(self) -> None:
        self.cancel = None

    def spacing(self, step_s: float) -> int:
        """Blocks between checks for the next step, from the step just timed: ~TARGET_S apart (one process: every
        block, the check is free)."""
        blocks, self.mark = self.count - self.mark, self.count
        if self.worker.ctx.replica_group is None or blocks == 0:
            return 1
        return max(1, int(self.TARGET_S * blocks / max(step_s, 1e-6)))

    def _forward(self, module, args) -> None:
        self.started = True

    def _block(self, module, args) -> None:
        if self.cancel is None:
            return
        self.count += 1
        if self.count % self.every == 0 and self.worker._cancelled(self.cancel):
            raise Cancelled()


class _StepClock:
    """Seconds per denoising step (host clock after a device sync, at each step's end) and the final latents."""

    def __init__(self, device, steps: int):
        self.device, self.steps = device, steps
        self.t0 = self.last = timing.now(device)  # the loop starts now: text encoding is done
        self.steps_s: list[float] = []
        self.latents = None

    def tick(self, i: int, latents) -> None:
        tick = timing.now(self.device)
        self.steps_s.append(tick - self.last)
        self.last = tick
        if i == self.steps - 1:
            self.latents = latents


def versions() -> dict:
    import diffusers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__}


__all__ = ["Cancelled", "GenerationRequest", "UserError", "Worker", "WorkerConfig"]
