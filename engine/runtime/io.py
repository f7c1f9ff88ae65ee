"""Writing results: mp4 through imageio-ffmpeg, latents, metrics — each atomically (temp + rename)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np


def _atomic(path: Path, suffix: str):
    """A temp file beside `path` (same filesystem, so os.replace is atomic), with normal permissions."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return Path(tmp)


def to_uint8(frames) -> np.ndarray:
    """[F, H, W, 3] float in [0, 1] (diffusers 'np' output) -> uint8."""
    frames = np.asarray(frames)
    if frames.ndim == 5:  # [B, F, H, W, 3]: one video per request
        frames = frames[0]
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return frames


def write_mp4(frames, path: str | Path, fps: int = 16) -> Path:
    """H.264 through imageio-ffmpeg; OpenCV's mp4v where imageio-ffmpeg is not installed (GPU images)."""
    path = Path(path)
    frames = to_uint8(frames)  # [F, H, W, 3]
    tmp = _atomic(path, ".mp4")
    try:
        try:
            import imageio.v2 as imageio
            import imageio_ffmpeg  # noqa: F401

            with imageio.get_writer(
                tmp, fps=fps, codec="libx264", quality=8, macro_block_size=1, ffmpeg_log_level="error"
            ) as w:
                for f in frames:
                    w.append_data(f)
        except ImportError:
            import cv2

            h, w = frames.shape[1:3]
            vw = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
            for f in frames:
                vw.write(f[:, :, ::-1])  # OpenCV wants BGR
            vw.release()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_mp4(path: str | Path) -> np.ndarray:
    """Decode an mp4 to [F, H, W, 3] uint8 (used by tests and the eval harness)."""
    import imageio_ffmpeg

    gen = imageio_ffmpeg.read_frames(str(path))
    w, h = next(gen)["size"]
    return np.stack([np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in gen])


def write_bytes(data: bytes, path: str | Path) -> Path:
    path = Path(path)
    tmp = _atomic(path, path.suffix)
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def mp4_bytes(frames, fps: int = 16) -> bytes:
    """The mp4 file's bytes (encoded through a temporary file: the encoders want a path)."""
    with tempfile.TemporaryDirectory() as d:
        return write_mp4(frames, Path(d) / "v.mp4", fps).read_bytes()


def write_json(obj, path: str | Path) -> Path:
    """Atomic, into a folder made if missing (reports land in new folders; outputs are checked before work)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_bytes(json.dumps(obj, indent=2, default=str).encode(), path)


def save_latents(latents, path: str | Path) -> Path:
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    tmp = _atomic(path, ".safetensors")
    save_file({"latents": latents.detach().to("cpu", torch.float32).contiguous()}, str(tmp))
    os.replace(tmp, path)
    return path
