"""Loading a diffusers video pipeline: local folder or hub id, dtype, device, LoRA, scheduler."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import torch

from engine.errors import UserError, one_line
from engine.models import family_of, is_supported, preset_family, supported, transformers_of

from .request import ModelInfo

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

EMBEDDED = Path(__file__).resolve().parent.parent / "weights" / "shapes-wan"  # launch/train_shapes.py made it
EMBEDDED_NAME = "embedded:shapes-wan"  # how records name it (no --model given)
DEFAULTS_FILE = "engine_defaults.json"  # a model folder's own default size, frames, steps (the embedded model has one)


def resolve_model(model: str | None) -> str:
    """None -> the embedded model shipped in the repository; a folder must be a pipeline."""
    if model is None:
        return str(EMBEDDED)
    p = Path(model).expanduser()
    if p.exists():
        if not (p / "model_index.json").is_file():
            raise UserError(f"model {model!r} is not a diffusers pipeline folder (no model_index.json)")
        return str(p)
    if not _HUB_ID.match(model) or model.startswith((".", "/", "~")):
        raise UserError(f"model {model!r} does not exist (expected a pipeline folder or a hub id like org/name)")
    return model  # a hub id: from_pretrained fetches or reads the local hub cache


def load_pipeline(model: str | None, device: torch.device, dtype: torch.dtype):
    from diffusers import DiffusionPipeline

    if model and model.startswith("random:"):  # real-size architecture, random weights: for speed runs
        from engine.models.random import MODELS, build_random_pipeline

        name = model.split(":", 1)[1]
        if name not in MODELS:
            raise UserError(f"unknown random model {name!r}; valid: {', '.join('random:' + m for m in MODELS)}")
        return build_random_pipeline(name, device, dtype)
    src = resolve_model(model)
    # the embedded model's VAE class: diffusers loads custom components only from modules already imported, by the
    # name model_index.json gives (engine.patch_vae in folders saved before the move to engine/models/)
    import engine.models.patch_vae  # noqa: F401
    import engine.patch_vae  # noqa: F401

    try:
        pipe = DiffusionPipeline.from_pretrained(src, dtype=dtype)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise UserError(f"cannot load model {src!r}: {one_line(e).split(': ', 1)[-1]}", "model") from None
    vae = getattr(pipe, "vae", None)
    if vae is not None and vae.dtype != torch.float32:
        vae.to(torch.float32)  # Wan's VAE is meant to run in fp32; decode casts latents to it
    pipe.to(device)
    return pipe


VAE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "auto": None}  # auto: bf16 on a GPU, fp32 on a CPU


def set_vae_dtype(pipe, name: str = "fp32", device: torch.device | None = None) -> str:
    """The VAE's decode dtype: fp32 (what the Wan VAEs are meant to run in, the loader's default) or bf16 (half the
    activation traffic; its PSNR against fp32 is in docs/benchmarks.md); auto: bf16 on a GPU, fp32 on a CPU (where
    bf16 convolutions are emulated). The pipelines cast the latents to it. Returns the dtype used."""
    if name not in VAE_DTYPES:
        raise UserError(f"unknown VAE dtype {name!r}; valid: {', '.join(VAE_DTYPES)}", "vae_dtype")
    if name == "auto":
        name = "bf16" if device is not None and device.type == "cuda" else "fp32"
    vae = getattr(pipe, "vae", None)
    if vae is not None and vae.dtype != VAE_DTYPES[name]:
        vae.to(VAE_DTYPES[name])
    return name


def load_loras(pipe, lora: str | None, lora_2: str | None = None, scale: float = 1.0) -> None:
    """Wan 2.2 Lightning style: `lora` -> transformer (high noise), `lora_2` -> transformer_2 (low noise).
    The adapters are fused into the weights, so inference pays nothing for them."""
    if not lora and not lora_2:
        return
    for path, name, second in ((lora, "high", False), (lora_2, "low", True)):
        if not path:
            continue
        if second and getattr(pipe, "transformer_2", None) is None:
            raise UserError("--lora-2 given, but this pipeline has no transformer_2")
        p = Path(path)
        if not p.exists():
            raise UserError(f"LoRA file {path!r} does not exist")
        kw = dict(weight_name=p.name) if p.is_file() else {}
        try:
            pipe.load_lora_weights(
                str(p.parent if p.is_file() else p), adapter_name=name, load_into_transformer_2=second, **kw
            )
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"cannot load LoRA {path!r}: {str(e).splitlines()[0]}") from None
    comps = ["transformer"] + (["transformer_2"] if lora_2 else [])
    pipe.fuse_lora(components=comps, lora_scale=scale)
    pipe.unload_lora_weights()


def set_scheduler(pipe, name: str = "default", shift: float | None = None) -> None:
    """'euler' = flow-match Euler (Wan 2.2 Lightning: shift 5, guidance 1.0)."""
    if name == "default" and shift is None:
        return
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    kw = {}
    if name == "euler":
        cls = FlowMatchEulerDiscreteScheduler
        if shift is not None:
            kw["shift"] = shift
    elif name in ("unipc", "default"):
        cls = type(pipe.scheduler) if name == "default" else UniPCMultistepScheduler
        if shift is not None:
            kw["flow_shift" if "flow_shift" in pipe.scheduler.config else "shift"] = shift
    else:
        raise UserError(f"unknown scheduler {name!r}; valid: default, euler, unipc")
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **kw)


def check_supported(pipe) -> list:
    """The pipeline's transformers, or UserError naming what is supported."""
    transformers = transformers_of(pipe)
    if not transformers or not is_supported(transformers[0]):
        found = type(transformers[0]).__name__ if transformers else "no transformer"
        raise UserError(f"{type(pipe).__name__} ({found}) is not supported; supported models: {supported()}", "model")
    return transformers


def model_info(pipe) -> ModelInfo:
    t = transformers_of(pipe)[0]
    cfg = t.config
    family = family_of(t)
    needs_image = "image" in inspect.signature(type(pipe).__call__).parameters
    real = cfg.num_attention_heads * cfg.attention_head_dim >= 1536
    # real sizes for real models (the family's: Wan 480p, HunyuanVideo its own 16:9 size); a CPU-friendly size
    # for small (embedded/test) models
    size = family.default_size(pipe) if real else (128, 128)
    frames, guidance = (81 if real else 33), 1.0
    name = pipe.config.get("_name_or_path")
    own = Path(name) / DEFAULTS_FILE if name else None  # a local folder's own file (hub ids: none)
    if own is not None and own.is_file():  # the model knows its trained size and guidance better than any guess
        d = json.loads(own.read_text())
        size, frames = (int(d["height"]), int(d["width"])), int(d["num_frames"])
        guidance = float(d.get("guidance", 1.0))
    vae_t, vae_s = getattr(pipe, "vae_scale_factor_temporal", 4), getattr(pipe, "vae_scale_factor_spatial", 8)
    return ModelInfo(
        num_blocks=cfg.num_layers,
        vae_t=vae_t,
        vae_s=vae_s,
        patch=tuple(family.adapter.patch(cfg)),
        family=preset_family(cfg),
        needs_image=needs_image,
        arch=family.name,
        default_size=tuple(size),
        default_frames=frames,
        default_guidance=guidance,
        fps=family.fps,
        pipeline_multiple=family.size_multiple,
        dims=family.dims(cfg, vae_s, vae_t, family.text_len(pipe)),
    )
