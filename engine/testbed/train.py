"""Training the embedded model: a small Wan-architecture video DiT on procedural shapes videos.

Three stages (a fourth for v2), all seeded, into one ordinary WanPipeline folder:
  1. the latent space: a linear patch VAE (engine/models/patch_vae.py: PCA of 4x4x4 pixel patches, x4 spatial and x4
     temporal, 49 frames of 64x64 -> 13 latent frames of 16x16 x 32 channels), fitted in closed form; the latent
     statistics become the config's latents_mean/std, as Wan's pipeline expects. (A learned AutoencoderKLWan
     reached 16 dB in the 2.5 minutes it had on an H100; PCA keeps about 35 dB at no cost.)
  2. a WanTransformer3DModel trained with flow matching on the normalised latents, conditioned on a frozen
     random tiny UMT5 behind a word-level tokenizer trained offline; half the timesteps are the few-step
     sampler's own (4, 6 and 8 Euler steps), so 4-step sampling works without distillation;
  3. the EMA weights saved in fp16 (the folder stays under 30 MB; loading upcasts);
  4. (v2, `distill_steps` > 0) a few-step student distilled from the trained model, as the Lightning models are
     from theirs: from each point of the 4-step Euler grid the teacher integrates its guided ODE to the next point in
     `distill_substeps` Euler steps, and the student learns to land there in one unguided step (guidance 1).

The defaults are the shipped model's settings (engine/weights/shapes-wan/training.json repeats it). V2 is a preset
(`V2`: more and narrower blocks, textured backgrounds under a panning camera, distillation) for real-model-like
redundancy between frames (issue 16: Eq. 6 linear error <= 0.15). A stage can start from a saved pipeline folder
(`train(..., start=...)`), so a run longer than one device command is two commands: the teacher, then the student.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context

import numpy as np
import torch
import torch.nn.functional as F

from engine.runtime.io import to_uint8, write_json
from engine.testbed import shapes_data as shapes

VOCAB = " ".join(
    [
        "a",
        "an",
        "the",
        "on",
        "moving",
        "background",
        *shapes.COLOURS,
        *shapes.SHAPES,
        *shapes.DIRECTIONS,
        *shapes.SPEEDS,
        *shapes.BACKGROUNDS,
    ]
)


@dataclass
class TrainConfig:
    seed: int = 0
    frames: int = 49  # 4k+1: 13 latent frames
    size: int = 64
    clips: int = 4000
    spread: float = 0.3  # start-position randomness (shapes.render)
    text_len: int = 32
    z_dim: int = 32  # patch VAE components
    pca_clips: int = 300
    # transformer
    dit_steps: int = 8000
    dit_batch: int = 64
    dit_lr: float = 4e-4
    ema: float = 0.999
    drop_text: float = 0.1  # the empty prompt, so guidance > 1 has an unconditional branch
    shift: float = 3.0  # the sampler's (FlowMatchEulerDiscreteScheduler) timestep shift
    sampler_steps: tuple = (4, 6, 8)
    layers: int = 10
    heads: int = 4
    head_dim: int = 64
    ffn: int = 768
    dit_budget_s: float | None = None  # wall-clock budget: the step count is cut to fit after 30 timed steps,
    compile: bool = False  # and the count actually run is recorded
    # data (v2): background mix, camera pan, texture kind (shapes.render); the defaults are the shipped model's
    textured: float | None = None  # probability of the textured background (None: the three alike)
    camera: float = 0.0  # camera pan over textured backgrounds, fraction of the frame side per clip
    texture: str = "blocks"
    # distillation (v2): a 4-step unguided student of the trained (guided) model
    distill_steps: int = 0
    distill_batch: int = 32
    distill_lr: float = 1e-4
    distill_guidance: float = 3.0  # the teacher's classifier-free guidance
    distill_substeps: int = 4  # teacher Euler steps per student step
    distill_budget_s: float | None = None
    guidance: float = 3.0  # the model's default guidance (engine_defaults.json): 1.0 for a distilled student
    done: dict = field(default_factory=dict)


# The v2 testbed (issue 16), on top of the defaults: 20 blocks of width 192 (2 protected blocks are 10% of the model,
# not 20%; ~10.3M parameters, ~21 MB in fp16), every other clip on a smooth texture under a panning camera (frames
# share shifted structure, as real video does), and a 4-step unguided student distilled from the guided model.
V2 = dict(
    layers=20,
    heads=3,
    head_dim=64,
    ffn=576,
    textured=0.5,
    camera=0.25,
    texture="smooth",
    distill_steps=2000,
    guidance=1.0,
)


def build_pipeline(cfg: TrainConfig):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from engine.models.patch_vae import PatchVAE
    from engine.models.random import build_tokenizer

    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer(max_length=cfg.text_len, vocab_text=VOCAB)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    ).eval()
    text_encoder.requires_grad_(False)  # frozen: random but fixed features per word and position
    vae = PatchVAE(z_dim=cfg.z_dim, latents_mean=[0.0] * cfg.z_dim, latents_std=[1.0] * cfg.z_dim)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=cfg.heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.z_dim,
        out_channels=cfg.z_dim,
        text_dim=64,
        freq_dim=256,
        ffn_dim=cfg.ffn,
        num_layers=cfg.layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=256,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=cfg.shift)
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


def _clip(args):
    seed, i, frames, size, spread, textured, camera, texture = args
    rng = np.random.default_rng([seed, i])  # per clip, so the data do not depend on the number of workers
    spec = shapes.sample_spec(rng, textured)
    return shapes.render(spec, frames, size, rng, spread, camera, texture), spec.prompt()


def make_clips(cfg: TrainConfig, workers: int = 1):
    """([N, F, H, W, 3] uint8, prompts)."""
    data = (cfg.textured, cfg.camera, cfg.texture)
    jobs = [(cfg.seed, i, cfg.frames, cfg.size, cfg.spread, *data) for i in range(cfg.clips)]
    if workers > 1:
        with get_context("fork").Pool(workers) as pool:
            out = pool.map(_clip, jobs, chunksize=64)
    else:
        out = list(map(_clip, jobs))
    return np.stack([v for v, _ in out]), [p for _, p in out]


def to_pixels(clips_u8: torch.Tensor) -> torch.Tensor:
    """[B, F, H, W, 3] uint8 -> [B, 3, F, H, W] in [-1, 1], the VAE's input."""
    return clips_u8.permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


class _Clock:
    def __init__(self, budget_s):
        self.t0, self.budget = time.perf_counter(), budget_s


def _lr(step, total, peak, warmup=100):
    """Linear warm-up, then cosine to 0. Before `warmup` it does not depend on `total`, so fitting the step
    count to a time budget early on (_fit) keeps a run exactly repeatable with that count."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def _fit(total, step, clock, warmup) -> int:
    """Time steps 10-30 (past the first-call warm-up), then cut `total` to what the wall-clock budget allows."""
    if clock.budget is None or step not in (10, 30):
        return total
    now = time.perf_counter()
    if step == 10:
        clock.t10 = now
        return total
    per_step = (now - clock.t10) / 20
    return min(total, max(warmup + 1, step + int((clock.budget - (now - clock.t0)) / per_step)))


@torch.no_grad()
def encode_all(vae, clips: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """[N, Z, F_lat, h, w] float32 latents."""
    out = [vae.encode(to_pixels(clips[i : i + batch])).latent_dist.mode().float() for i in range(0, len(clips), batch)]
    return torch.cat(out)


def sampler_sigmas(cfg: TrainConfig) -> torch.Tensor:
    """The noise levels the few-step Euler sampler visits (its last one, 0, is the output)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched, out = FlowMatchEulerDiscreteScheduler(shift=cfg.shift), []
    for n in cfg.sampler_steps:
        sched.set_timesteps(n)
        out.append(sched.sigmas[:-1].clone())
    return torch.cat(out).float()


def train_transformer(pipe, latents: torch.Tensor, prompts: list[str], cfg: TrainConfig, log) -> int:
    """Flow matching: x_t = (1 - s) z + s e, the model predicts e - z at timestep 1000 s. latents normalised."""
    dev = latents.device
    model = pipe.transformer.train().requires_grad_(True)
    table = sorted(set(prompts)) + [""]
    emb = pipe.encode_prompt(table, do_classifier_free_guidance=False, max_sequence_length=cfg.text_len, device=dev)[
        0
    ].float()  # [U, L, 64]; exactly what the pipeline computes at inference
    which = torch.tensor([table.index(p) for p in prompts], device=dev)
    sigmas = sampler_sigmas(cfg).to(dev)
    ema = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.dit_lr, weight_decay=0.01, betas=(0.9, 0.99), fused=dev.type == "cuda"
    )
    fwd = torch.compile(model) if cfg.compile and dev.type == "cuda" else model
    g = torch.Generator(device=dev).manual_seed(cfg.seed + 2)
    clock, total, step, B = _Clock(cfg.dit_budget_s), cfg.dit_steps, 0, cfg.dit_batch
    while step < total:
        total = _fit(total, step, clock, 200)
        idx = torch.randint(len(latents), (B,), generator=g, device=dev)
        z = latents[idx]  # [B, C, F, h, w]
        text = emb[torch.where(torch.rand(B, generator=g, device=dev) < cfg.drop_text, len(table) - 1, which[idx])]
        u = torch.rand(B, generator=g, device=dev)
        shifted = cfg.shift * u / (1 + (cfg.shift - 1) * u)  # the sampler's shift applied to uniform noise levels
        on_grid = sigmas[torch.randint(len(sigmas), (B,), generator=g, device=dev)]
        s = torch.where(torch.rand(B, generator=g, device=dev) < 0.5, on_grid, shifted)
        noise = torch.randn(z.shape, generator=g, device=dev)
        x_t = (1 - s.view(B, 1, 1, 1, 1)) * z + s.view(B, 1, 1, 1, 1) * noise
        for group in opt.param_groups:
            group["lr"] = _lr(step, total, cfg.dit_lr, warmup=200)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            try:
                pred = fwd(x_t, s * 1000, text, return_dict=False)[0]
            except Exception as e:  # a compiler failure must not cost the run: go eager
                if fwd is model:
                    raise
                log(f"torch.compile failed ({type(e).__name__}: {str(e)[:120]}); training eager")
                fwd = model
                pred = fwd(x_t, s * 1000, text, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise - z)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1 - decay)
        if step % 200 == 0:
            log(f"dit step {step}/{total}: loss {loss.item():.4f}")
        step += 1
    with torch.no_grad():
        for p, e in zip(model.parameters(), ema):
            p.copy_(e)
    model.eval().requires_grad_(False)
    return total


def train(cfg: TrainConfig, device: torch.device, workers: int = 1, log=print, start: str | None = None):
    """Everything but saving; returns the pipeline (on `device`, fp32) and a report dict.

    start: a pipeline folder this run continues from (its VAE, text encoder and transformer; the data are made
    again from the same seed): only the stages left run, i.e. the distillation of a saved teacher."""
    t0 = time.perf_counter()
    clips_np, prompts = make_clips(cfg, workers)  # before CUDA is touched: the workers are forked
    pipe = build_pipeline(cfg) if start is None else _load(start)
    pipe.to(device)
    clips = torch.from_numpy(clips_np).to(device)  # [N, F, H, W, 3] uint8
    log(f"{len(clips)} clips {tuple(clips.shape[1:])} in {time.perf_counter() - t0:.1f}s")
    t1 = time.perf_counter()
    kept = None
    if start is None:
        kept = pipe.vae.fit(
            [to_pixels(clips[i : i + 50]) for i in range(0, min(cfg.pca_clips, len(clips)), 50)], seed=cfg.seed
        )
    lat = encode_all(pipe.vae, clips)  # [N, Z, F, h, w]
    if start is None:
        mean, std = lat.mean(dim=(0, 2, 3, 4)), lat.std(dim=(0, 2, 3, 4))
        pipe.vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    mean, std = (torch.tensor(pipe.vae.config[k], device=device) for k in ("latents_mean", "latents_std"))
    lat = (lat - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)
    with torch.no_grad():  # reconstruction on clips the PCA did not see
        x = to_pixels(clips[-8:])
        rec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample
        ae_psnr = float(10 * torch.log10(4.0 / F.mse_loss(rec.float(), x)))
    log(f"patch VAE: {cfg.z_dim} components, reconstruction {ae_psnr:.1f} dB")
    t2 = time.perf_counter()
    if start is None:
        cfg.done["dit_steps"] = train_transformer(pipe, lat, prompts, cfg, log)
    t3 = time.perf_counter()
    if cfg.distill_steps > 0:
        cfg.done["distill_steps"] = distill(pipe, lat, prompts, cfg, log)
    t4 = time.perf_counter()
    report = {
        "config": asdict(cfg),
        "started_from": start,
        "latent_shape": list(lat.shape[1:]),
        "ae_recon_psnr_db": ae_psnr,
        "pca_variance_kept": kept,
        "seconds": {"data": t1 - t0, "vae": t2 - t1, "transformer": t3 - t2, "distill": t4 - t3},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    return pipe, report


def _load(folder: str):
    """A saved pipeline (fp16 weights) in fp32, to continue training."""
    from diffusers import WanPipeline

    from engine.models.patch_vae import PatchVAE

    vae = PatchVAE.from_pretrained(folder, subfolder="vae")
    pipe = WanPipeline.from_pretrained(folder, vae=vae, torch_dtype=torch.float32)
    pipe.text_encoder.requires_grad_(False)
    return pipe


def distill(pipe, latents: torch.Tensor, prompts: list[str], cfg: TrainConfig, log) -> int:
    """The few-step student (stage 4). Teacher: a frozen copy of the trained transformer, guided (CFG
    cfg.distill_guidance against the empty prompt, as the pipeline computes it). For a batch of training latents z,
    noise e and a step k of the 4-step Euler grid sigma_0 > ... > sigma_4 = 0: x_k = (1 - s_k) z + s_k e, the teacher
    integrates from x_k to sigma_{k+1} in `distill_substeps` Euler steps, and the student's one Euler step must land on
    the same point: v* = (x_teacher - x_k) / (s_{k+1} - s_k), MSE on the student's unguided velocity. The student
    starts from the teacher; its EMA is what is kept."""
    import copy

    from diffusers import FlowMatchEulerDiscreteScheduler

    dev = latents.device
    student = pipe.transformer.train().requires_grad_(True)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    table = sorted(set(prompts)) + [""]
    with torch.no_grad():  # the text encoder is frozen
        emb = pipe.encode_prompt(
            table, do_classifier_free_guidance=False, max_sequence_length=cfg.text_len, device=dev
        )[0].float()  # [U, L, 64]
    which = torch.tensor([table.index(p) for p in prompts], device=dev)
    sched = FlowMatchEulerDiscreteScheduler(shift=cfg.shift)
    sched.set_timesteps(4)
    grid = sched.sigmas.float().to(dev)  # [5]: the student's sampler, last 0
    ema = [p.detach().clone() for p in student.parameters()]
    opt = torch.optim.AdamW(
        student.parameters(), lr=cfg.distill_lr, weight_decay=0.0, betas=(0.9, 0.99), fused=dev.type == "cuda"
    )
    g = torch.Generator(device=dev).manual_seed(cfg.seed + 3)
    clock, total, step, B = _Clock(cfg.distill_budget_s), cfg.distill_steps, 0, cfg.distill_batch
    autocast = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def velocity(model, x, s, text):  # x [B, C, F, h, w], s [B] noise levels, text [B, L, 64]
        return model(x, s * 1000, text, return_dict=False)[0].float()

    while step < total:
        total = _fit(total, step, clock, 50)
        idx = torch.randint(len(latents), (B,), generator=g, device=dev)
        z, text = latents[idx], emb[which[idx]]
        k = torch.randint(4, (B,), generator=g, device=dev)
        s0, s1 = grid[k], grid[k + 1]  # [B]
        view = (B, 1, 1, 1, 1)
        x0 = (1 - s0.view(view)) * z + s0.view(view) * torch.randn(z.shape, generator=g, device=dev)
        with torch.no_grad(), torch.autocast(**autocast):
            x, uncond = x0, emb[-1:].expand(B, -1, -1)
            for j in range(cfg.distill_substeps):
                a = s0 + (s1 - s0) * j / cfg.distill_substeps
                b = s0 + (s1 - s0) * (j + 1) / cfg.distill_substeps
                v = velocity(teacher, torch.cat([x, x]), torch.cat([a, a]), torch.cat([text, uncond]))
                v_c, v_u = v.chunk(2)
                x = x + (b - a).view(view) * (v_u + cfg.distill_guidance * (v_c - v_u))
            target = (x - x0) / (s1 - s0).view(view)
        for group in opt.param_groups:
            group["lr"] = _lr(step, total, cfg.distill_lr, warmup=50)
        with torch.autocast(**autocast):
            pred = velocity(student, x0, s0, text)
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in student.parameters()], 1 - decay)
        if step % 100 == 0:
            log(f"distill step {step}/{total}: loss {loss.item():.4f}")
        step += 1
    with torch.no_grad():
        for p, e in zip(student.parameters(), ema):
            p.copy_(e)
    student.eval().requires_grad_(False)
    return total


@torch.no_grad()
def check_adherence(pipe, cfg: TrainConfig, prompts: int, seed: int = 1234) -> float | None:
    """Share of grammar prompts whose 4-step video shows the named colour moving the named way."""
    rng, ok = np.random.default_rng(seed), []
    for i in range(prompts):
        spec = shapes.sample_spec(rng)
        video = pipe(
            prompt=spec.prompt(),
            height=cfg.size,
            width=cfg.size,
            num_frames=cfg.frames,
            num_inference_steps=4,
            guidance_scale=cfg.guidance,  # the model's default (engine_defaults.json)
            max_sequence_length=cfg.text_len,  # as trained
            output_type="np",
            generator=torch.Generator("cpu").manual_seed(i),
        ).frames[0]
        res = shapes.adherence(to_uint8(video), spec)
        ok.append(res["colour"] and res["direction"])
    return float(np.mean(ok)) if ok else None


def save(pipe, out, report: dict) -> None:
    """fp16 weights (the repository copy stays small); loading with any dtype upcasts."""
    from pathlib import Path

    pipe.to("cpu")
    for m in (pipe.transformer, pipe.text_encoder):  # the patch VAE is 6k numbers: it stays fp32
        m.to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)
    write_json(report, Path(out) / "training.json")
    defaults = {
        "height": report["config"]["size"],
        "width": report["config"]["size"],
        "num_frames": report["config"]["frames"],
        "steps": 4,
        "guidance": report["config"]["guidance"],
    }
    write_json(defaults, Path(out) / "engine_defaults.json")
