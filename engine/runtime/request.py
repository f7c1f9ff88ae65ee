"""One generation request, and its validation against a loaded model, before any work starts.

Shared by the CLI, the HTTP endpoint and batch rendering, so every entry point rejects the same
inputs with the same one-line messages.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from engine.errors import UserError
from fis import UNIT, DiTDims, FISConfig, FISConfigError, generation_flops

from .images import FITS, describe, prepare

MAX_SIDE = 4096
MAX_FRAMES = 1025


@dataclass(frozen=True)
class ModelInfo:
    """What validation needs to know about a loaded pipeline."""

    num_blocks: int
    vae_t: int  # temporal compression
    vae_s: int  # spatial compression
    patch: tuple[int, int, int]
    family: str = "default"
    needs_image: bool = False
    arch: str = ""  # the model family (engine/models), as ModelFamily.name
    default_size: tuple[int, int] = (480, 832)
    default_frames: int = 81
    default_guidance: float = 1.0
    fps: int = 16  # the family's frame rate: `seconds` converts with it, the mp4 plays at it
    pipeline_multiple: int = 1  # what the family's pipelines demand of height and width on top of VAE x patch
    dims: DiTDims | None = None  # the architecture as the FLOPs counter sees it (a request's cost, up front)

    @property
    def size_multiple(self) -> int:
        return math.lcm(self.vae_s * max(self.patch[1], self.patch[2]), self.pipeline_multiple)

    def latent_frames(self, frames: int) -> int:
        return ((frames - 1) // self.vae_t + 1) // self.patch[0]

    def dense_pflops(self, req: GenerationRequest) -> float | None:
        """Denoising PFLOP of a completed request without FIS (what metrics call flops_dense_P); None if unknown."""
        if self.dims is None:
            return None
        cfg_passes = 2 if req.guidance > 1.0 else 1
        return generation_flops(self.dims, req.num_frames, req.height, req.width, req.steps, None, cfg_passes) / UNIT


@dataclass
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    steps: int = 4
    guidance: float | None = None  # None: the model's default (1.0 unless its folder says otherwise)
    seed: int = 0
    fis: FISConfig | None = None
    image: str | None = None  # reference image (I2V): a file path or a data: URL (engine/runtime/images.py)
    image_fit: str = "crop"  # crop, stretch or strict: how the image meets the video size

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fis"] = None if self.fis is None else self.fis.to_dict()
        return d

    def describe(self) -> dict:
        """to_dict for records people read (metrics): an embedded image as its format, size and hash."""
        return {**self.to_dict(), "image": describe(self.image)}


def _int(name, v, lo, hi):
    if isinstance(v, bool) or not isinstance(v, int):
        raise UserError(f"{name} must be an integer, got {v!r}", name)
    if not lo <= v <= hi:
        raise UserError(f"{name} must be between {lo} and {hi}, got {v}", name)
    return v


def validate(req: GenerationRequest, info: ModelInfo, fit_image: bool = True) -> GenerationRequest:
    """Fill model defaults and check everything; returns the completed request or raises UserError.
    fit_image=False leaves decoding and fitting the reference image to a caller that does it next anyway."""
    if not isinstance(req.prompt, str) or not req.prompt.strip():
        raise UserError("prompt must be a non-empty string", "prompt")
    if not isinstance(req.negative_prompt, str):
        raise UserError("negative_prompt must be a string", "negative_prompt")
    h = info.default_size[0] if req.height is None else req.height
    w = info.default_size[1] if req.width is None else req.width
    m = info.size_multiple
    for name, v in (("height", h), ("width", w)):
        _int(name, v, m, MAX_SIDE)
        if v % m:
            raise UserError(f"{name} {v} must be a multiple of {m} ({_multiple_reason(info)})", name)
    frames = info.default_frames if req.num_frames is None else req.num_frames
    _int("num_frames", frames, 1, MAX_FRAMES)
    if (frames - 1) % info.vae_t:
        lo = (frames - 1) // info.vae_t * info.vae_t + 1
        raise UserError(
            f"num_frames must be of the form {info.vae_t}k+1 (e.g. {lo} or {lo + info.vae_t}), got {frames}",
            "num_frames",
        )
    _int("steps", req.steps, 1, 1000)
    guidance = info.default_guidance if req.guidance is None else req.guidance
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not 0 <= guidance <= 50:
        raise UserError(f"guidance must be a number between 0 and 50, got {guidance!r}", "guidance")
    _int("seed", req.seed, 0, 2**63 - 1)
    if not isinstance(req.image_fit, str) or req.image_fit not in FITS:
        raise UserError(f"image_fit must be one of {', '.join(FITS)}, got {req.image_fit!r}", "image_fit")
    if req.image is not None and not isinstance(req.image, str):
        raise UserError(f"image must be a path or a data: URL, got {type(req.image).__name__}", "image")
    if info.needs_image and not req.image:
        raise UserError("image is required: this is an image-to-video model; give a reference image", "image")
    if req.image and not info.needs_image:
        raise UserError("image is not accepted: this is a text-to-video model; drop the reference image", "image")
    if req.image and fit_image:
        try:  # exists, decodes, fits (image_fit strict: the size matches)
            prepare(req.image, h, w, req.image_fit)
        except UserError as e:
            raise UserError(str(e), "image") from None
    out = GenerationRequest(
        req.prompt,
        req.negative_prompt,
        h,
        w,
        frames,
        req.steps,
        float(guidance),
        req.seed,
        req.fis,
        req.image,
        req.image_fit,
    )
    check_fis(out, info)
    return out


def _multiple_reason(info: ModelInfo) -> str:
    own = info.vae_s * max(info.patch[1], info.patch[2])
    reason = f"VAE x{info.vae_s} times patch {info.patch[1]}"
    return (
        reason
        if info.size_multiple == own
        else f"{reason}; the pipeline itself wants multiples of {info.pipeline_multiple}"
    )


def check_fis(req: GenerationRequest, info: ModelInfo) -> None:
    """The FIS configuration of a completed request against the model (blocks, latent frames, steps)."""
    if req.fis is not None:
        try:
            req.fis.resolve(info.num_blocks, info.latent_frames(req.num_frames), req.steps)
        except FISConfigError as e:
            raise UserError(str(e), "fis") from None
