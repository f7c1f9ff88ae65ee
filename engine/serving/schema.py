"""The request of the HTTP API and of batch manifest lines, checked field by field -> GenerationRequest.

One schema for both entry points, so a POST body and a manifest line accept and reject the same things.
Every error is a FieldError naming the field, raised before any work. The fields are OpenAI's video fields
(`prompt`, `model`, `seconds`, `size`, `input_reference`) plus the engine's own (`negative_prompt`, `num_frames`,
`num_inference_steps`, `guidance_scale`, `seed`, `fis`, `image`, `image_fit`); a multipart form carries the same
names as text fields (`fis[stride]` for nested ones) and the reference image as a file (form_body).

FIS is chosen by preset name (plus overrides), never by file path: a request must not make the server read a file
it names. For the same reason an HTTP request's image is the image itself (an upload, base64, or a data: URL; a
URL is never fetched); only a manifest line names an image file, relative to the manifest's folder, and it is
embedded in the request as it is read.

A preset the request did not ask for (the server's default) never fails it: where it cannot apply (too few latent
frames for its stride, too few steps) the request runs dense and says so (build: `notes`).

Everything a client sends is bounded before the server builds anything from it: text must be valid Unicode (a lone
surrogate cannot be stored or shown) and at most limits.max_prompt_chars; a size is checked against the model's
multiple and the server's limits; a job's denoising cost against limits.max_pflops; an image from its header
(formats, pixels) before a byte is decoded, and not at all for a model that takes none; every message quotes the
client's values cut short (_show).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from engine.errors import FieldError, UserError
from engine.models.wan import RESOLUTIONS
from engine.runtime import images
from engine.runtime.presets import PRESETS, build_fis
from engine.runtime.request import MAX_FRAMES, MAX_SIDE, GenerationRequest, ModelInfo, check_fis, validate
from fis import FISConfig, FISConfigError

FIELDS = (
    "prompt",
    "model",
    "seconds",
    "size",
    "input_reference",
    "negative_prompt",
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
_SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")  # ASCII digits only: \d takes any script's digits
_INT = re.compile(r"-?[0-9]{1,20}")
_NUMBER = re.compile(r"-?[0-9]{1,20}(\.[0-9]{1,20})?")
# engine.runtime.request.validate names fields as the engine does; their names in the JSON where they differ
_JSON_NAME = {"steps": "num_inference_steps", "guidance": "guidance_scale"}
# multipart text fields that are numbers in JSON
_FORM_INTS = ("height", "width", "num_frames", "num_inference_steps", "seed", "fis.stride", "fis.dense_steps")
_FORM_NUMBERS = ("guidance_scale",)


class ModelNotFound(FieldError):
    """`model` names a model this server does not serve (OpenAI answers 404 model_not_found)."""

    def __init__(self, message: str):
        super().__init__("model", message)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. The server's are tighter than the model's (configs/serve.toml)."""

    max_side: int = MAX_SIDE
    max_frames: int = MAX_FRAMES
    max_steps: int = 1000
    max_image_kib: int = 8192  # the reference image's file
    max_image_pixels: int = images.MAX_PIXELS  # the reference image's width x height, read from its header
    max_prompt_chars: int = 32000  # prompt and negative_prompt, each (OpenAI's bound)
    # a job's denoising cost, in PFLOP as metrics' flops_dense_P counts it; 0: 4x the model's default video at
    # max_steps steps with CFG (model-relative, so the same setting is sane for the embedded model and Wan 14B)
    max_pflops: float = 0.0
    max_job_s: float = 0.0  # a running job is stopped after this long (0: never)


@dataclass(frozen=True)
class Parsed:
    """A request checked against the model: what runs, and what the server decided for it."""

    request: GenerationRequest
    id: str | None = None  # a manifest line's "id"
    fis_source: str = "request"  # or "server default": FIS the request did not ask for
    notes: tuple[str, ...] = ()  # e.g. the default FIS preset could not apply and the request runs dense


def parse(
    obj,
    limits: Limits = Limits(),
    default_fis: str = "off",
    info: ModelInfo | None = None,
    allow_id: bool = False,
    image_root: Path | None = None,
) -> tuple[GenerationRequest, str | None]:
    """A decoded JSON object (or form_body) -> (request, its 'id' or None). Model-dependent checks come later
    (check_for); with the model's `info`, `seconds` becomes frames at its fps and presets are its family's.
    image_root: a manifest's folder, where `image` paths are read from; None (HTTP): the image itself only."""
    if not isinstance(obj, dict):
        raise FieldError("body", f"the request must be a JSON object, got {type(obj).__name__}")
    _valid_text(obj)
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
    for name in ("prompt", "negative_prompt"):
        if isinstance(obj.get(name), str) and len(obj[name]) > limits.max_prompt_chars:
            raise FieldError(name, f"{name} is {len(obj[name])} characters; the limit is {limits.max_prompt_chars}")
    if "model" in obj:
        _str(obj, "model")  # which model: checked against the served one by build()
    height, width = _size(obj, limits)
    family = "default" if info is None else info.family
    req = GenerationRequest(
        prompt=prompt,
        negative_prompt=_str(obj, "negative_prompt", ""),
        height=height,
        width=width,
        num_frames=_frames(obj, limits, info),
        steps=_int(obj, "num_inference_steps", 4, 1, limits.max_steps),
        guidance=_number(obj, "guidance_scale", None, 0, 50),
        seed=_int(obj, "seed", 0, 0, 2**63 - 1),
        fis=_fis(obj.get("fis", default_fis), default_fis, family),
        image=_image(obj, limits, image_root, info),
        image_fit=_str(obj, "image_fit", "crop"),
    )
    if req.image_fit not in images.FITS:
        raise FieldError("image_fit", f"image_fit must be one of {', '.join(images.FITS)}, got {_show(req.image_fit)}")
    return req, job_id


def build(
    obj,
    limits: Limits,
    default_fis: str,
    info: ModelInfo,
    model_name: str | None = None,
    allow_id: bool = False,
    image_root: Path | None = None,
) -> Parsed:
    """parse + check_for against the loaded model: everything a request can be refused for, before it is queued.
    model_name: the served model's id; a request naming another gets ModelNotFound. FIS the request did not ask
    for (the server's `default_fis`) that cannot apply to it is dropped: the request runs dense, with a note."""
    req, job_id = parse(obj, limits, default_fis, info, allow_id, image_root)
    if model_name is not None and obj.get("model", model_name) != model_name:
        raise ModelNotFound(f"model {_show(obj['model'])} is not served here; this server serves {model_name!r}")
    _check_size(req, info, limits, obj)
    asked = "fis" in obj
    notes: list[str] = []
    if not asked and req.fis is not None:
        try:  # the default preset against this request's own size and steps
            dense = validate(replace(req, fis=None), info, fit_image=False)
            check_fis(replace(dense, fis=req.fis), info)
        except UserError as e:
            if e.field != "fis":
                raise _named(e, obj) from None
            notes.append(
                f"the server's default FIS preset {req.fis.name!r} cannot apply to this request ({e}); it runs dense"
            )
            req = replace(req, fis=None)
    try:
        req = validate(req, info)
    except UserError as e:
        raise _named(e, obj) from None
    _check_cost(req, info, limits)
    return Parsed(req, job_id, "request" if asked else "server default", tuple(notes))


def budget_pflops(info: ModelInfo, limits: Limits) -> float | None:
    """The server's denoising budget per job (limits.max_pflops; 0: 4x the model's default video at max_steps
    steps with CFG), or None where the model's FLOPs are unknown."""
    if limits.max_pflops:
        return limits.max_pflops
    h, w = info.default_size
    default = GenerationRequest("x", "", h, w, info.default_frames, limits.max_steps, 2.0)
    cost = info.dense_pflops(default)
    return None if cost is None else 4 * cost


def _check_cost(req: GenerationRequest, info: ModelInfo, limits: Limits) -> None:
    budget, cost = budget_pflops(info, limits), info.dense_pflops(req)
    if budget is not None and cost is not None and cost > budget:
        raise FieldError(
            None,
            f"this request would cost about {cost:.3g} PFLOP of denoising; the server's budget per job is "
            f"{budget:.3g} (limits.max_pflops): ask for a smaller size, fewer frames or fewer steps",
        )


def _check_size(req: GenerationRequest, info: ModelInfo, limits: Limits, obj: dict) -> None:
    """Height and width against the model's multiple and the server's limit, under the field the client sent."""
    m = info.size_multiple
    for name, v in (("height", req.height), ("width", req.width)):
        if v is not None and (v % m or not m <= v <= limits.max_side):
            field = "size" if "size" in obj else name
            shown = f"size {_show(obj['size'])}" if field == "size" else f"{name} {v}"
            raise FieldError(
                field, f"{shown}: each side must be a multiple of {m}, from {m} to {limits.max_side}, for this model"
            )


def _valid_text(obj, where: str = "", depth: int = 0) -> None:
    """Every string of the request, keys too, as valid Unicode: a lone surrogate ("\\ud800", legal JSON) can be
    neither stored as UTF-8 nor shown back."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        name = f"{where}.{k}" if where else str(k)
        for text in (k, v):
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    shown = _safe(name)
                    raise FieldError(shown, f"{shown} is not valid Unicode text (a lone surrogate)") from None
        if isinstance(v, (dict, list)) and depth < 4:
            _valid_text(v, name, depth + 1)


def _safe(text: str) -> str:
    """A name a client made, printable and bounded whatever it holds."""
    return text.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")[:60]


def check_for(req: GenerationRequest, info: ModelInfo) -> GenerationRequest:
    """engine.runtime.request.validate against the loaded model, the failing field under its JSON name."""
    try:
        return validate(req, info)
    except UserError as e:  # validate names the field, in the engine's names
        raise _named(e) from None


def _named(e: UserError, obj=None) -> FieldError:
    """A validation error under the field the client sent: `size` when it gave a size, `seconds` for frames it
    asked for in seconds."""
    field = _JSON_NAME.get(e.field, e.field or "request")
    if isinstance(obj, dict) and field in ("height", "width") and "size" in obj:
        field = "size"
    if isinstance(obj, dict) and field == "num_frames" and "seconds" in obj:
        field = "seconds"
    if isinstance(obj, dict) and field == "image" and "input_reference" in obj:
        field = "input_reference"
    return FieldError(field, str(e))


def form_body(items) -> dict:
    """A multipart form -> the dict parse() takes. items: (name, value) pairs, value a str or, for files, bytes.
    Nested names as OpenAI's client sends them (`fis[stride]`, `input_reference[image_url]`); numbers arrive as
    text and become numbers only where the JSON field is one, in ASCII digits. A name given twice is an error."""
    body: dict = {}
    for name, value in items:
        m = re.fullmatch(r"([a-z_]{1,40})\[([a-z_]{1,40})\]", name)
        parent, key = (m.group(1), m.group(2)) if m else (None, name)
        target = body if parent is None else body.setdefault(parent, {})
        if not isinstance(target, dict):
            raise FieldError(parent, f"{parent} is given both as a value and as {parent}[...] fields")
        dotted = key if parent is None else f"{parent}.{key}"
        if key in target:
            raise FieldError(dotted[:60], f"{_show(dotted)} is given twice")
        if isinstance(value, bytes) and dotted != "input_reference":
            raise FieldError(dotted[:60], f"{_show(dotted)} must be a text field, not a file")
        if isinstance(value, str) and dotted in _FORM_INTS and _INT.fullmatch(value):
            value = int(value)
        elif isinstance(value, str) and dotted in _FORM_NUMBERS and _NUMBER.fullmatch(value):
            value = float(value)
        target[key] = value
    return body


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


def seconds_of(frames: int, fps: int) -> str:
    """A clip's duration as OpenAI's `seconds` shows it: '4', '3.06'."""
    return f"{frames / fps:.2f}".rstrip("0").rstrip(".")


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
        raise FieldError(name, f"{name} must be between {lo} and {hi}, got {_show(v)}")
    return v


def _number(obj, name, default, lo, hi):
    v = obj.get(name, default)
    if v is None and default is None:  # not given: the model's own default applies (request.validate)
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise FieldError(name, f"{name} must be a number, got {_show(v)}")
    if not lo <= v <= hi:  # also rejects NaN, which json accepts
        raise FieldError(name, f"{name} must be between {lo} and {hi}, got {_show(v)}")
    return float(v)


def _frames(obj, limits: Limits, info: ModelInfo | None) -> int | None:
    """num_frames, or OpenAI's `seconds` ("4", "8", "12" or any number) -> frames at the model's fps, rounded to the
    model's 4k+1. Without the model (a manifest being read) `seconds` is only checked as a number."""
    if "seconds" not in obj:
        return _int(obj, "num_frames", None, 1, limits.max_frames)
    if "num_frames" in obj:
        raise FieldError("seconds", "give seconds or num_frames, not both")
    v = obj["seconds"]
    if isinstance(v, str) and _NUMBER.fullmatch(v.strip()):
        v = float(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 10**6:  # also NaN
        raise FieldError(
            "seconds", f"seconds must be a positive number such as '4' or 2.5, got {_show(obj['seconds'])}"
        )
    if info is None:
        return None
    t = info.vae_t
    frames = max(0, round((v * info.fps - 1) / t)) * t + 1
    if frames > limits.max_frames:
        longest = (limits.max_frames - 1) // t * t + 1
        raise FieldError(
            "seconds",
            f"seconds {v:g} is {frames} frames at {info.fps} fps; this server makes up to {longest} frames "
            f"({seconds_of(longest, info.fps)} s)",
        )
    return frames


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
            raise FieldError("size", f"size sides must be between 1 and {limits.max_side}, got {_show(s)}")
    return h, w


def _image(obj, limits: Limits, root: Path | None, info: ModelInfo | None = None) -> str | None:
    """-> a data: URL of a checked PNG/JPEG/WebP, or None. HTTP: `input_reference` (an uploaded file, or
    {"image_url": a data: URL}) or `image` (base64 or a data: URL); a manifest: `image`, a path under root.
    A model that takes no image (info) refuses one before a byte of it is decoded."""
    if "input_reference" in obj and "image" in obj:
        raise FieldError("input_reference", "give input_reference or image, not both")
    name, v = ("input_reference", obj["input_reference"]) if "input_reference" in obj else ("image", obj.get("image"))
    if v is None:
        return None
    max_bytes = limits.max_image_kib * 1024
    if name == "input_reference":
        if isinstance(v, dict):
            if "file_id" in v:
                raise FieldError("input_reference.file_id", "file_id is not supported here: upload the image itself")
            if set(v) != {"image_url"}:
                raise FieldError("input_reference", 'input_reference must be {"image_url": "data:image/..."}')
            name, v = "input_reference.image_url", v["image_url"]
            if isinstance(v, str) and not images.is_data(v):
                raise FieldError(name, "image_url must be a data: URL (data:image/png;base64,...); no URL is fetched")
    if info is not None and not info.needs_image:
        field = name.split(".")[0]
        raise FieldError(field, f"{field} is not accepted: this is a text-to-video model; drop the reference image")
    if name.startswith("input_reference"):
        if isinstance(v, bytes):  # a multipart upload
            if len(v) > max_bytes:
                raise FieldError(name, f"image is {len(v) // 1024} KiB; the limit is {limits.max_image_kib} KiB")
            try:
                return images.embed(v, max_pixels=limits.max_image_pixels)
            except UserError as e:
                raise FieldError(name, str(e)) from None
    if not isinstance(v, str) or not v.strip():
        what = 'an image file, or {"image_url": a data: URL}' if name == "input_reference" else "a base64 string"
        raise FieldError(name, f"{name} must be {what}{' or a file path' if root else ''}, got {_show(v)}")
    try:
        if root is None or images.is_data(v):
            return images.embed(images.decode_base64(v, max_bytes), max_pixels=limits.max_image_pixels)
        shown = f"image {v!r}"
        return images.embed(images.read_file(Path(root) / v, v, max_bytes), shown, max_pixels=limits.max_image_pixels)
    except UserError as e:
        raise FieldError(name, str(e)) from None


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
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 64:
        return f"an integer of {len(str(v))} digits"
    text = repr(v) if not isinstance(v, bytes) else f"<{len(v)} bytes>"
    text = text.encode("ascii", "backslashreplace").decode()
    return text if len(text) <= 60 else text[:57] + "..."


__all__ = ["FIELDS", "Limits", "ModelNotFound", "Parsed", "api_view", "build", "check_for", "form_body", "parse"]
