"""What every speed benchmark shares: real-size random-weight models and their inputs built on the device, the
denoising loop the pipelines run (timed per step with CUDA events), FIS and MagCache attached and removed through
engine/runtime/setup.py, and the latent fidelity check against the dense reference.
"""

from __future__ import annotations

import dataclasses
import sys
import traceback
from dataclasses import dataclass

import torch

from engine.compat import MAG_CACHE_LEADER_BLOCK_HOOK, reset_stateful_cache
from engine.errors import one_line
from engine.hooks.fis import FISState
from engine.models import preset_family
from engine.models.random import ModelSpec, build_transformer
from engine.runtime.device import pick_dtype
from engine.runtime.setup import Prepared, prepare
from engine.runtime.timing import StepTimer
from fis import FISConfig, generation_flops


@dataclass
class Setup:
    """Everything shared by the rows: models, inputs, schedule."""

    spec: ModelSpec
    device: torch.device
    frames: int
    height: int
    width: int
    steps: int
    experts: list
    noise: torch.Tensor  # [1, C, F, H, W] fp32 initial latents
    prompt: torch.Tensor  # [1, L, text_dim] bf16 random text embeddings
    scheduler: object
    route: list[int]  # expert index per step

    @property
    def family(self) -> str:
        return preset_family(self.spec.transformer)

    @property
    def grid(self) -> tuple[int, int]:
        return self.spec.dims.latent_grid(self.frames, self.height, self.width)

    def token_frames(self, fis: FISConfig | None) -> set[int]:
        """Frame counts a block runs on with this config (dense + anchor counts): one compiled graph each."""
        f = self.grid[0]
        if fis is None:
            return {f}
        plan = fis.resolve(self.spec.transformer["num_layers"], f, self.steps)
        return {f} | {c for i in range(self.steps) for c in plan.anchor_counts(i) if c is not None}

    def flops(self, fis: FISConfig | None = None, skipped=()) -> float:
        plan = None if fis is None else fis.resolve(self.spec.transformer["num_layers"], self.grid[0], self.steps)
        return generation_flops(
            self.spec.dims, self.frames, self.height, self.width, self.steps, plan, skipped_steps=tuple(skipped)
        )


def build_setup(spec: ModelSpec, device, frames: int, height: int, width: int, steps: int, seed: int) -> Setup:
    from diffusers import FlowMatchEulerDiscreteScheduler

    dtype = pick_dtype("auto", device)  # bf16 on the GPU, fp32 for the CPU smoke run
    experts = [build_transformer(spec.transformer, device, seed + i, dtype) for i in range(spec.experts)]
    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)  # the Wan 2.2 Lightning sampler
    scheduler.set_timesteps(steps)
    boundary = None if spec.boundary_ratio is None else spec.boundary_ratio * scheduler.config.num_train_timesteps
    # WanPipeline: t >= boundary -> transformer (high noise), else transformer_2; decided once, on the host
    route = [0 if boundary is None or t >= boundary else 1 for t in scheduler.timesteps.tolist()]
    f = (frames - 1) // spec.dims.vae_t + 1
    c = spec.transformer["in_channels"]
    g = torch.Generator().manual_seed(seed)  # CPU generator: the same noise on any device
    noise = torch.randn(1, c, f, height // spec.vae_s, width // spec.vae_s, generator=g).to(device)
    prompt = torch.randn(1, spec.text_len, spec.transformer["text_dim"], generator=g).to(device, dtype)
    return Setup(spec, device, frames, height, width, steps, experts, noise, prompt, scheduler, route)


def transformer_call(s: Setup, model, latents: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """One denoiser forward as WanPipeline makes it (guidance 1.0: one call). Returns (noise_pred, skipped)."""
    if s.spec.expand_timesteps:  # TI2V: a timestep per token (all equal for text-to-video)
        f, hw = s.grid
        timestep = t.expand(1, f * hw)  # [B, N]
    else:
        timestep = t.expand(1)  # [B]
    with model.cache_context("cond"):
        pred = model(
            hidden_states=latents.to(s.prompt.dtype),
            timestep=timestep,
            encoder_hidden_states=s.prompt,
            return_dict=False,
        )[0]
        return pred, magcache_skipped(model)


def denoise(s: Setup, state: FISState | None) -> tuple[torch.Tensor, list[float], list[int]]:
    """All denoising steps. Returns (final latents [1, C, F, H, W], seconds per step, MagCache-skipped steps)."""
    s.scheduler.set_timesteps(s.steps, device=s.device)
    s.scheduler.set_begin_index(0)  # no timestep lookup (a host sync) inside step()
    for m in s.experts:
        reset_stateful_cache(m)  # MagCache residuals of the previous generation
    if state is not None:
        state.begin(s.steps)
    latents, skipped = s.noise.clone(), []
    timer = StepTimer(s.device)
    timer.mark()
    for i, t in enumerate(s.scheduler.timesteps):
        if state is not None:
            state.step = i
        pred, skip = transformer_call(s, s.experts[s.route[i]], latents, t)
        if skip:
            skipped.append(i)
        latents = s.scheduler.step(pred, t, latents, return_dict=False)[0]
        timer.mark()
    return latents, timer.seconds(), skipped


def magcache_skipped(model) -> bool:
    """Did MagCache reuse the cached residual in the forward that just ran? (read inside its cache_context)"""
    from diffusers.hooks import HookRegistry

    hook = HookRegistry.check_if_exists_or_initialize(model.blocks[0]).get_hook(MAG_CACHE_LEADER_BLOCK_HOOK)
    return hook is not None and not hook.state_manager.get_state().should_compute


def attach(s: Setup, fis: FISConfig | None, magcache: bool) -> Prepared:
    """FIS hooks first (engine.runtime.setup.prepare; the compiled blocks and backend were set once at build),
    MagCache on top: a skipped step then never enters the FIS hooks. `.state` is the FIS state (None: dense)."""
    from diffusers.hooks import MagCacheConfig

    attached = prepare(s.experts, fis=fis) if fis is not None else Prepared()
    if magcache:
        for e, m in enumerate(s.experts):
            owned = [i for i, r in enumerate(s.route) if r == e]
            if owned:
                ratios = [0.0 if i == s.steps - 1 else 1.0 for i in owned]
                m.enable_cache(MagCacheConfig(**MAGCACHE_FORCE, num_inference_steps=len(owned), mag_ratios=ratios))
                attached._undo.append(m.disable_cache)  # the outer hook comes off first
    return attached


def fidelity(x: torch.Tensor, ref: torch.Tensor) -> dict:
    """Relative L2 error of the final latents vs dense, overall and per latent frame (paper Eq. 6)."""
    x, ref = x.float(), ref.float()  # [1, C, F, H, W]
    err = (x - ref).transpose(1, 2).flatten(2)  # [1, F, C*H*W]
    base = ref.transpose(1, 2).flatten(2)
    per_frame = (err.norm(dim=2) / base.norm(dim=2))[0]  # [F]
    return {
        "rel_l2": (err.norm() / base.norm()).item(),
        "frame_err": [round(v, 6) for v in per_frame.tolist()],
        "frame_err_mean": per_frame.mean().item(),
        "frame_err_max": per_frame.max().item(),
    }


def is_oom(e: BaseException) -> bool:
    """torch's OOM, or a library's allocation failure surfacing as a RuntimeError (cuDNN, cuBLAS workspaces)."""
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def failure(e: BaseException) -> str:
    """A row's status for an exception: 'OOM', or 'error: Type: first line' (the traceback goes to stderr)."""
    if is_oom(e):
        return "OOM"
    traceback.print_exc(file=sys.stderr)
    return "error: " + one_line(e, 193)


# MagCache-Force. The paper's row skips one step in four (19.57 of 26.09 PFLOP at 720p) and, combined with
# FIS-Balanced, that step is a sparse one: the final step runs. diffusers' MagCache skips a step when the error
# accumulated from the calibrated magnitude ratios stays under the threshold. Forcing it: ratio 1.0 (no change
# predicted: error 0, always under the threshold) on every step but the last, whose ratio 0.0 (error 1.0) is over
# it; max_skip_steps=1 forbids two skips in a row. Per expert (each keeps its own residual) this skips exactly
# step 1 of 4 on Wan 2.2 A14B, TI2V-5B and 2.1 1.3B alike.
MAGCACHE_FORCE = dict(threshold=0.5, max_skip_steps=1, retention_ratio=0.0)


def setup_for(
    base: Setup | None, spec: ModelSpec, device, frames: int, height: int, width: int, steps: int, seed: int
) -> Setup:
    """Inputs of another resolution around the experts already built (building 2 x 14B again takes minutes)."""
    if base is None:
        return build_setup(spec, device, frames, height, width, steps, seed)
    fresh = build_setup(dataclasses.replace(spec, experts=0), device, frames, height, width, steps, seed)
    return dataclasses.replace(fresh, spec=spec, experts=base.experts)
