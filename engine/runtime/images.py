"""Reference images (image-to-video): read, checked and fitted to the video size the same way everywhere.

A reference is a file path (the command line; manifests, resolved against the manifest's folder) or a
`data:image/...;base64,` URL (the HTTP API: a request never names a file on the server; manifests turn their
paths into one, so a render group on another node needs no shared disk). Only PNG, JPEG and WebP are decoded:
PIL's other plugins (EPS runs Ghostscript) have no place behind a server.

A few KB of PNG can expand to hundreds of MB of pixels, so an image is checked in two stages: `header` reads its
format and size and refuses one past the pixel limits without decoding anything (all a server does before it knows
that the model takes an image); `decode` then decodes it whole, a couple at a time per process, and refuses one
whose pixel data ends early.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import struct
import threading
import zlib
from pathlib import Path

from engine.errors import UserError

FITS = ("crop", "stretch", "strict")  # crop: cover + centre crop; stretch: resize; strict: must match
FORMATS = ("PNG", "JPEG", "WEBP")
MAX_FILE_BYTES = 64 * 2**20
MAX_SIDE = 8192
MAX_PIXELS = 40_000_000  # ~160 MB as RGBA while decoding: a bound on what one small file may expand to
_DATA = re.compile(r"data:(image/[\w.+-]+)?(;base64)?,", re.IGNORECASE)
_DECODING = threading.BoundedSemaphore(2)  # full decodes at once in one process: a burst cannot multiply the memory


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


def header(raw: bytes, shown: str = "image", max_side: int = MAX_SIDE, max_pixels: int = MAX_PIXELS):
    """-> (format, width, height) from the file's header alone, nothing decoded; UserError for anything that is not
    a PNG/JPEG/WebP or is larger than max_side a side or max_pixels in all. The plugins are opened directly: PIL's
    own Image.open refuses very large images with a message that gives no size."""
    from PIL import Image

    Image.init()
    for fmt in FORMATS:
        factory, accept = Image.OPEN[fmt]
        if accept is not None and not accept(raw[:16]):
            continue
        try:
            im = factory(io.BytesIO(raw), "")
        except (OSError, ValueError, SyntaxError, struct.error):
            raise UserError(f"{shown} cannot be decoded (truncated or corrupt)") from None
        w, h = im.size
        if max(w, h) > max_side or w * h > max_pixels:
            raise UserError(
                f"{shown} is {w}x{h}; images up to {max_side} pixels a side and "
                f"{max_pixels / 10**6:g} megapixels are accepted"
            )
        return im.format or fmt, w, h
    raise UserError(f"{shown} is not a PNG, JPEG or WebP image")


def decode(raw: bytes, shown: str = "image", max_side: int = MAX_SIDE, max_pixels: int = MAX_PIXELS):
    """Bytes -> (RGB PIL image, format); UserError for anything that is not a whole PNG/JPEG/WebP within the pixel
    limits (checked from the header first)."""
    from PIL import Image, ImageOps

    fmt, w, h = header(raw, shown, max_side, max_pixels)
    if fmt == "PNG":
        _png_complete(raw, shown)
    try:
        with _DECODING:
            im = Image.open(io.BytesIO(raw), formats=FORMATS)
            im.load()
            return ImageOps.exif_transpose(im).convert("RGB"), fmt  # upright as a phone camera tagged it
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise UserError(f"{shown} cannot be decoded (truncated or corrupt)") from None


def _png_complete(raw: bytes, shown: str) -> None:
    """PIL accepts a PNG whose pixel stream ends before the last row (a header for 8192x4880, ten rows of data):
    count the rows' bytes the stream holds, without keeping them, against what the header promises."""
    pos, idat, ihdr = 8, [], None
    while pos + 8 <= len(raw):
        (length,), kind = struct.unpack(">I", raw[pos : pos + 4]), raw[pos + 4 : pos + 8]
        data = raw[pos + 8 : pos + 8 + length]
        if kind == b"IHDR" and len(data) == 13:
            ihdr = struct.unpack(">IIBBBBB", data)
        elif kind == b"IDAT":
            idat.append(data)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if ihdr is None:
        raise UserError(f"{shown} cannot be decoded (truncated or corrupt)")
    w, h, depth, colour, _, _, interlace = ihdr
    if interlace:  # Adam7: PIL checks those passes itself
        return
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour, 1)
    expected = h * (1 + (w * channels * depth + 7) // 8)
    stream, got = zlib.decompressobj(), 0
    try:
        for data in idat:
            chunk = stream.decompress(data, 2**20)
            got += len(chunk)
            while stream.unconsumed_tail and got < expected:
                chunk = stream.decompress(stream.unconsumed_tail, 2**20)
                got += len(chunk)
            if got >= expected:
                return
    except zlib.error:
        raise UserError(f"{shown} cannot be decoded (truncated or corrupt)") from None
    if got < expected:
        rows = got * h // max(1, expected)
        raise UserError(f"{shown} cannot be decoded (truncated: its pixel data ends after {rows} of {h} rows)")


def _shown(ref: str) -> str:
    return "image" if is_data(ref) else f"image {ref!r}"


def load(ref: str):
    """A reference (path or data: URL) -> RGB PIL image."""
    if is_data(ref):
        return decode(decode_base64(ref, MAX_FILE_BYTES))[0]
    return decode(read_file(Path(ref), ref), _shown(ref))[0]


def embed(raw: bytes, shown: str = "image", max_side: int = MAX_SIDE, max_pixels: int = MAX_PIXELS) -> str:
    """Image bytes, checked from their header, -> a data: URL (what a request carries when it must not name a
    file). Decoding is left to whoever needs the pixels (validation fits the image to the video size)."""
    fmt = header(raw, shown, max_side, max_pixels)[0]
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
