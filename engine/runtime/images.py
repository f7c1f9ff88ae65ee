"""Reference images (image-to-video): read, checked and fitted to the video size the same way everywhere.

A reference is a file path (the command line; manifests, resolved against the manifest's folder) or a
`data:image/...;base64,` URL (the HTTP API: a request never names a file on the server; manifests turn their
paths into one, so a render group on another node needs no shared disk). Only PNG, JPEG and WebP are decoded:
PIL's other plugins (EPS runs Ghostscript) have no place behind a server.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
from pathlib import Path

from engine.errors import UserError

FITS = ("crop", "stretch", "strict")  # crop: cover + centre crop; stretch: resize; strict: must match
FORMATS = ("PNG", "JPEG", "WEBP")
MAX_FILE_BYTES = 64 * 2**20
MAX_SIDE = 8192
MAX_PIXELS = 40_000_000  # ~160 MB as RGBA while decoding: a bound on what one small file may expand to
_DATA = re.compile(r"data:(image/[\w.+-]+)?(;base64)?,", re.IGNORECASE)


def is_data(ref: str) -> bool:
    return ref[:5].lower() == "data:"


def decode_base64(text: str, max_bytes: int) -> bytes:
    """Base64 (or a data: URL holding it) -> the file's bytes, refused past max_bytes before decoding."""
    m = _DATA.match(text)
    if m and not m.group(2):
        raise UserError("image must be base64-encoded (a data: URL needs ';base64,')")
    payload = re.sub(r"\s+", "", text[m.end() :] if m else text)
    if len(payload) * 3 // 4 > max_bytes:
        raise UserError(f"image is about {len(payload) * 3 // 4 // 1024} KiB; the limit is {max_bytes // 1024} KiB")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise UserError(
            "image is not valid base64: send a PNG or JPEG file base64-encoded, "
            "optionally as a data:image/png;base64,... URL"
        ) from None
    if not raw:
        raise UserError("image is empty")
    return raw


def read_file(path: Path, shown: str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    if not path.exists():
        raise UserError(f"image {shown!r} does not exist")
    if not path.is_file():
        raise UserError(f"image {shown!r} is not a file")
    if path.stat().st_size > max_bytes:
        raise UserError(f"image {shown!r} is {path.stat().st_size // 1024} KiB; the limit is {max_bytes // 1024} KiB")
    return path.read_bytes()


def decode(raw: bytes, shown: str = "image"):
    """Bytes -> (RGB PIL image, format); UserError for anything that is not a whole PNG/JPEG/WebP."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(raw), formats=FORMATS)
        w, h = im.size
        if max(w, h) > MAX_SIDE or w * h > MAX_PIXELS:  # checked from the header, before decoding
            raise UserError(
                f"{shown} is {w}x{h}; images up to {MAX_SIDE} pixels a side and "
                f"{MAX_PIXELS // 10**6} megapixels are accepted"
            )
        fmt = im.format
        im.load()
        return ImageOps.exif_transpose(im).convert("RGB"), fmt  # upright as a phone camera tagged it
    except UserError:
        raise
    except UnidentifiedImageError:
        raise UserError(f"{shown} is not a PNG, JPEG or WebP image") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise UserError(f"{shown} cannot be decoded (truncated or corrupt)") from None


def _shown(ref: str) -> str:
    return "image" if is_data(ref) else f"image {ref!r}"


def load(ref: str):
    """A reference (path or data: URL) -> RGB PIL image."""
    if is_data(ref):
        return decode(decode_base64(ref, MAX_FILE_BYTES))[0]
    return decode(read_file(Path(ref), ref), _shown(ref))[0]


def embed(raw: bytes, shown: str = "image") -> str:
    """Checked image bytes -> a data: URL (what a request carries when it must not name a file)."""
    fmt = decode(raw, shown)[1]
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(raw).decode()}"


def fit(im, height: int, width: int, policy: str = "crop", shown: str = "image"):
    """The image at the video size. crop: scaled to cover, centred crop; stretch: resized; strict: as given."""
    from PIL import Image, ImageOps

    if im.size == (width, height):
        return im
    if policy == "strict":
        raise UserError(
            f"{shown} is {im.size[0]}x{im.size[1]}, not the video size {width}x{height} (image_fit "
            "strict); resize it, or use image_fit crop or stretch"
        )
    if policy == "stretch":
        return im.resize((width, height), Image.Resampling.LANCZOS)
    return ImageOps.fit(im, (width, height), Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def prepare(ref: str, height: int, width: int, policy: str = "crop"):
    """Read, check and fit: what validation runs (so every error comes before any work) and the Worker uses."""
    return fit(load(ref), height, width, policy, _shown(ref))


def describe(ref: str | None) -> str | None:
    """A reference as records show it: a path as is, embedded data as its format, size and hash."""
    if not ref or not is_data(ref):
        return ref
    m = _DATA.match(ref)
    raw = ref[m.end() :] if m else ref
    kind = (m.group(1) if m and m.group(1) else "image").lower()
    return f"{kind}, {len(raw) * 3 // 4 // 1024} KiB, sha256 {hashlib.sha256(raw.encode()).hexdigest()[:16]}"


def digest(ref: str) -> str:
    return hashlib.sha256(ref.encode()).hexdigest()
