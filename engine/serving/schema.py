"""The JSON request of the HTTP API and of batch manifest lines, checked field by field -> GenerationRequest.

One schema for both entry points, so a POST body and a manifest line accept and reject the same things.
Every error is a FieldError naming the JSON field, raised before any work. FIS is chosen by preset name
(plus overrides), never by file path: a request must not make the server read a file it names. For the same
reason an HTTP request's `image` is the image itself (base64, or a data: URL); only a manifest line names an
image file, relative to the manifest's folder, and it is embedded in the request as it is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from engine.errors import FieldError, UserError
from engine.models.wan import RESOLUTIONS
from engine.runtime import images
from engine.runtime.presets import PRESETS, build_fis
from engine.runtime.request import MAX_FRAMES, MAX_SIDE, GenerationRequest, ModelInfo, validate
from fis import FISConfig, FISConfigError

FIELDS = (
    "prompt",
    "negative_prompt",
    "size",
    "height",
    "width",
    "num_frames",
    "num_inference_steps",
    "guidance_scale",
    "seed",
    "fis",
    "image",
    "image_fit",
)
FIS_OVERRIDES = ("stride", "blocks", "dense_steps", "operator")
FIS_NAMES = ("off", *PRESETS)
ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # a file name on every OS: no separators, no leading dot
_SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")
# engine.runtime.request.validate names fields as the engine does; their names in the JSON where they differ
_JSON_NAME = {"steps": "num_inference_steps", "guidance": "guidance_scale"}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. The server's are tighter than the model's (configs/serve.toml)."""

    max_side: int = MAX_SIDE
    max_frames: int = MAX_FRAMES
    max_steps: int = 1000
    max_image_kib: int = 8192  # the decoded reference image


def parse(
    obj,
    limits: Limits = Limits(),
    default_fis: str = "off",
    family: str = "default",
    allow_id: bool = False,
    image_root: Path | None = None,
) -> tuple[GenerationRequest, str | None]:
    """A decoded JSON object -> (request, its 'id' or None). Model-dependent checks come later (check_for).
    image_root: a manifest's folder, where `image` paths are read from; None (HTTP): `image` is base64 only."""
    if not isinstance(obj, dict):
        raise FieldError("body", f"the request must be a JSON object, got {type(obj).__name__}")
    allowed = (*FIELDS, "id") if allow_id else FIELDS
    unknown = sorted(k for k in obj if k not in allowed)
    if unknown:
        raise FieldError(unknown[0][:60], f"unknown field {_show(unknown[0])}; valid fields: {', '.join(allowed)}")
    job_id = None
    if allow_id and "id" in obj:
        job_id = obj["id"]
        if not isinstance(job_id, str) or not ID.fullmatch(job_id):
            raise FieldError(
                "id", f"id must be 1-128 letters, digits, '.', '_' or '-' (not starting with '.'), got {_show(job_id)}"
            )
    if "prompt" not in obj:
        raise FieldError("prompt", "prompt is required")
    prompt = _str(obj, "prompt")
    if not prompt.strip():
        raise FieldError("prompt", "prompt must be a non-empty string")
    height, width = _size(obj, limits)
    req = GenerationRequest(
        prompt=prompt,
        negative_prompt=_str(obj, "negative_prompt", ""),
        height=height,
        width=width,
        num_frames=_int(obj, "num_frames", None, 1, limits.max_frames),
        steps=_int(obj, "num_inference_steps", 4, 1, limits.max_steps),
        guidance=_number(obj, "guidance_scale", None, 0, 50),
        seed=_int(obj, "seed", 0, 0, 2**63 - 1),
        fis=_fis(obj.get("fis", default_fis), default_fis, family),
        image=_image(obj, limits, image_root),
        image_fit=_str(obj, "image_fit", "crop"),
    )
    if req.image_fit not in images.FITS:
        raise FieldError("image_fit", f"image_fit must be one of {', '.join(images.FITS)}, got {_show(req.image_fit)}")
    return req, job_id


def check_for(req: GenerationRequest, info: ModelInfo) -> GenerationRequest:
    """engine.runtime.request.validate against the loaded model, the failing field under its JSON name."""
    try:
        return validate(req, info)
    except UserError as e:  # validate names the field, in the engine's names
        raise FieldError(_JSON_NAME.get(e.field, e.field or "request"), str(e)) from None


def api_view(d: dict) -> dict:
    """A stored request (GenerationRequest.to_dict) under the API's field names, model defaults filled in."""
    return {
        "prompt": d["prompt"],
        "negative_prompt": d["negative_prompt"],
        "size": f"{d['width']}x{d['height']}",
        "num_frames": d["num_frames"],
        "num_inference_steps": d["steps"],
        "guidance_scale": d["guidance"],
        "seed": d["seed"],
        "fis": d["fis"],
        "image": images.describe(d.get("image")),
        "image_fit": d.get("image_fit", "crop"),
    }


def request_from_dict(d: dict) -> GenerationRequest:
    """The inverse of GenerationRequest.to_dict (job records keep requests as JSON)."""
    fis = d.get("fis")
    if fis is not None:
        fis = FISConfig.from_dict({k: v for k, v in fis.items() if k != "name"}, name=fis.get("name", "custom"))
    return GenerationRequest(**{**d, "fis": fis})


def _str(obj, name, default=None):
    v = obj.get(name, default)
    if not isinstance(v, str):
        raise FieldError(name, f"{name} must be a string, got {_show(v)}")
    return v


def _int(obj, name, default, lo, hi):
    v = obj.get(name, default)
    if v is None and default is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise FieldError(name, f"{name} must be an integer, got {_show(v)}")
    if not lo <= v <= hi:
        raise FieldError(name, f"{name} must be between {lo} and {hi}, got {v}")
    return v


def _number(obj, name, default, lo, hi):
    v = obj.get(name, default)
    if v is None and default is None:  # not given: the model's own default applies (request.validate)
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise FieldError(name, f"{name} must be a number, got {_show(v)}")
    if not lo <= v <= hi:  # also rejects NaN, which json accepts
        raise FieldError(name, f"{name} must be between {lo} and {hi}, got {v}")
    return float(v)


def _size(obj, limits: Limits) -> tuple[int | None, int | None]:
    if "size" not in obj:
        return (_int(obj, "height", None, 1, limits.max_side), _int(obj, "width", None, 1, limits.max_side))
    if "height" in obj or "width" in obj:
        raise FieldError("size", "give size or height/width, not both")
    s = obj["size"]
    if isinstance(s, str) and s in RESOLUTIONS:
        h, w = RESOLUTIONS[s]
    elif isinstance(s, str) and _SIZE.fullmatch(s):
        w, h = map(int, _SIZE.fullmatch(s).groups())
    else:
        raise FieldError(
            "size", f"size must be 'WIDTHxHEIGHT' (e.g. '832x480') or one of {', '.join(RESOLUTIONS)}, got {_show(s)}"
        )
    for v in (w, h):
        if not 1 <= v <= limits.max_side:
            raise FieldError("size", f"size sides must be between 1 and {limits.max_side}, got {s!r}")
    return h, w


def _image(obj, limits: Limits, root: Path | None) -> str | None:
    """-> a data: URL of a checked PNG/JPEG/WebP, or None. HTTP: base64 only; manifest: a path under root (or a
    data: URL)."""
    v = obj.get("image")
    if v is None:
        return None
    if not isinstance(v, str) or not v.strip():
        raise FieldError(
            "image", f"image must be a base64 string{'' if root is None else ' or a file path'}, got {_show(v)}"
        )
    max_bytes = limits.max_image_kib * 1024
    try:
        if root is None or images.is_data(v):
            return images.embed(images.decode_base64(v, max_bytes))
        shown = f"image {v!r}"
        return images.embed(images.read_file(Path(root) / v, v, max_bytes), shown)
    except UserError as e:
        raise FieldError("image", str(e)) from None


def _fis(spec, default: str, family: str) -> FISConfig | None:
    """'off' | preset name | {"preset": name, stride, blocks, dense_steps, operator}. Overrides apply to the
    preset given, else to the default; on 'off' they start from 'balanced' (as on the command line)."""
    if isinstance(spec, str):
        spec = {"preset": spec}
    if not isinstance(spec, dict):
        raise FieldError("fis", f"fis must be a preset name ({', '.join(FIS_NAMES)}) or an object, got {_show(spec)}")
    unknown = sorted(k for k in spec if k not in ("preset", *FIS_OVERRIDES))
    if unknown:
        raise FieldError(
            f"fis.{unknown[0][:60]}",
            f"unknown fis setting {_show(unknown[0])}; valid: preset, {', '.join(FIS_OVERRIDES)}",
        )
    preset = spec.get("preset", default)
    if not isinstance(preset, str) or preset.lower() not in FIS_NAMES:
        raise FieldError("fis.preset", f"unknown FIS preset {_show(preset)}: use one of {', '.join(FIS_NAMES)}")
    overrides = {k: spec[k] for k in FIS_OVERRIDES if k in spec}
    try:
        return build_fis(preset, family, **overrides)
    except FISConfigError as e:
        raise FieldError("fis", str(e)) from None


def _show(v) -> str:
    """A user value in a message, bounded: a huge field must not make a huge error."""
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."
