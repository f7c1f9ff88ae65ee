"""Procedural videos with prompts from a small grammar, and the check that a video obeys its prompt.

The data of the embedded model: "a red circle moving right quickly on a dark background".
A video is one shape of one named colour crossing a plain or textured background in a straight line at a
named speed. `adherence` reads a video back (colour mask, centroid track) so prompt adherence is measured
by analysing frames, with no learned metric.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 220, 50),
    "white": (245, 245, 245),
    "purple": (150, 60, 200),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"right": (1.0, 0.0), "left": (-1.0, 0.0), "down": (0.0, 1.0), "up": (0.0, -1.0)}  # (dx, dy)
SPEEDS = {"slowly": 0.3, "quickly": 0.6}  # fraction of the frame side crossed over the whole clip
BACKGROUNDS = {"dark": (20, 20, 28), "light": (200, 200, 190), "textured": None}


@dataclass(frozen=True)
class Spec:
    colour: str
    shape: str
    direction: str
    speed: str
    background: str

    def prompt(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction} {self.speed} on a {self.background} background"


def sample_spec(rng: np.random.Generator, textured: float | None = None) -> Spec:
    """A random grammar prompt. textured: the probability of the textured background (None: the three backgrounds
    alike, one draw fewer: the embedded model's data)."""
    pick = lambda xs: list(xs)[rng.integers(len(xs))]  # noqa: E731
    if textured is None:
        bg = pick(BACKGROUNDS)
    else:
        bg = "textured" if rng.uniform() < textured else pick([b for b in BACKGROUNDS if b != "textured"])
    colour = pick([c for c in COLOURS if not (bg == "light" and c in ("white", "yellow"))])  # keep it visible
    return Spec(colour, pick(SHAPES), pick(DIRECTIONS), pick(SPEEDS), bg)


def parse_prompt(text: str) -> Spec | None:
    """The Spec a grammar prompt names, or None if it is not one."""
    words = text.lower().replace(",", " ").split()
    found = {}
    for key, vocab in (
        ("colour", COLOURS),
        ("shape", SHAPES),
        ("direction", DIRECTIONS),
        ("speed", SPEEDS),
        ("background", BACKGROUNDS),
    ):
        hits = [w for w in words if w in vocab]
        if len(hits) != 1:
            return None
        found[key] = hits[0]
    return Spec(**found)


def render(
    spec: Spec,
    frames: int,
    size: int,
    rng: np.random.Generator,
    spread: float = 1.0,
    camera: float = 0.0,
    texture: str = "blocks",
) -> np.ndarray:
    """[F, H, W, 3] uint8. The shape starts so that its whole path stays inside the frame; `spread` < 1 draws
    the start from the middle part of that range only (the training data of the embedded model: a few-step
    sampler makes sharper videos when the prompt leaves little to chance).

    camera > 0: the camera pans over the textured background by up to that fraction of the frame side over the clip
    (a random direction and speed per clip; the shape's own motion, the prompt's, is unchanged), so consecutive
    frames share shifted structure as in real video. texture: 'blocks' (4x4 flat cells, the embedded model's data)
    or 'smooth' (two octaves of bilinearly upsampled noise, the detail real backgrounds have). The defaults draw
    exactly what the embedded model was trained on."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    pan = np.zeros((frames, 2), np.float32)  # per frame, the background offset (x, y) in pixels
    if BACKGROUNDS[spec.background] is None:  # textured: low-frequency noise, different every clip
        if camera > 0:
            angle, amount = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 1.0) * camera * size
            t = np.linspace(0.0, 1.0, frames, dtype=np.float32)[:, None]
            pan = t * amount * np.array([np.cos(angle), np.sin(angle)], np.float32)
        pad = int(np.ceil(np.abs(pan).max())) if camera > 0 else 0
        big = size + 2 * pad + 2 * (pad > 0)  # one pixel more each side for the bilinear window
        if texture == "blocks":
            cells = -(-big // (size // 4))
            base = rng.uniform(60, 160, size=(cells, cells, 3)).astype(np.float32)
            bg = np.kron(base, np.ones((size // 4, size // 4, 1), np.float32))[:big, :big]
        elif texture == "smooth":
            bg = 110 + 40 * _octave(rng, big, 16) + 15 * _octave(rng, big, 6)
        else:
            raise ValueError(f"texture must be 'blocks' or 'smooth', got {texture!r}")
    else:
        pad = 0
        bg = np.broadcast_to(np.array(BACKGROUNDS[spec.background], np.float32), (size, size, 3))
    r = size * rng.uniform(0.08, 0.12)  # with the fastest travel the path still fits
    travel = SPEEDS[spec.speed] * size
    dx, dy = DIRECTIONS[spec.direction]
    margin = r + 1
    lo_x, hi_x = margin + max(0.0, -dx * travel), size - margin - max(0.0, dx * travel)
    lo_y, hi_y = margin + max(0.0, -dy * travel), size - margin - max(0.0, dy * travel)
    x0 = (lo_x + hi_x) / 2 + (rng.uniform() - 0.5) * spread * (hi_x - lo_x)
    y0 = (lo_y + hi_y) / 2 + (rng.uniform() - 0.5) * spread * (hi_y - lo_y)
    colour = np.array(COLOURS[spec.colour], np.float32)
    out = np.empty((frames, size, size, 3), np.uint8)
    for f in range(frames):
        t = f / max(1, frames - 1)
        cx, cy = x0 + dx * travel * t, y0 + dy * travel * t
        mask = _mask(spec.shape, xx - cx, yy - cy, r)
        frame_bg = bg if pad == 0 else _window(bg, pad + pan[f, 0], pad + pan[f, 1], size)
        out[f] = np.where(mask[..., None], colour, frame_bg).astype(np.uint8)
    return out


def _octave(rng: np.random.Generator, size: int, cell: int) -> np.ndarray:
    """[size, size, 3] smooth noise in about [-1, 1]: uniform values on a grid of `cell`-pixel cells, bilinear."""
    n = size // cell + 2
    grid = rng.uniform(-1, 1, size=(n, n, 3)).astype(np.float32)
    pos = np.arange(size, dtype=np.float32) / cell
    i, w = pos.astype(int), (pos - pos.astype(int))[:, None]
    rows = grid[i] * (1 - w[..., None]) + grid[i + 1] * w[..., None]  # [size, n, 3]
    return rows[:, i] * (1 - w[None]) + rows[:, i + 1] * w[None]


def _window(bg: np.ndarray, x0: float, y0: float, size: int) -> np.ndarray:
    """The size x size view of `bg` at sub-pixel offset (x0, y0), bilinear."""
    ix, iy = int(np.floor(x0)), int(np.floor(y0))
    fx, fy = x0 - ix, y0 - iy
    v = bg[iy : iy + size + 1, ix : ix + size + 1]
    top = v[:-1, :-1] * (1 - fx) + v[:-1, 1:] * fx
    bottom = v[1:, :-1] * (1 - fx) + v[1:, 1:] * fx
    return top * (1 - fy) + bottom * fy


def _mask(shape: str, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return x * x + y * y <= r * r
    if shape == "square":
        return (np.abs(x) <= r * 0.85) & (np.abs(y) <= r * 0.85)
    return (y <= r * 0.8) & (y >= -r) & (np.abs(x) <= (y + r) * 0.55)  # triangle, apex up


def centroid_track(video: np.ndarray, colour: str, tol: float = 60.0) -> np.ndarray:
    """Per frame, the centroid (x, y) of the pixels close to the named colour; NaN where there are none."""
    target = np.array(COLOURS[colour], np.float32)
    dist = np.linalg.norm(video.astype(np.float32) - target, axis=-1)  # [F, H, W]
    out = np.full((video.shape[0], 2), np.nan, np.float32)
    yy, xx = np.mgrid[0 : video.shape[1], 0 : video.shape[2]]
    for f, d in enumerate(dist):
        m = d < tol
        if m.sum() >= 4:
            out[f] = xx[m].mean(), yy[m].mean()
    return out


def adherence(video: np.ndarray, spec: Spec, min_travel: float = 0.1) -> dict:
    """Does the named colour appear, and does its centroid move in the named direction (by at least
    `min_travel` of the frame side, mostly along that axis)?"""
    track = centroid_track(video, spec.colour)
    seen = ~np.isnan(track[:, 0])
    colour_ok = bool(seen.mean() >= 0.5)
    if seen.sum() < 2:
        return {"colour": colour_ok, "direction": False, "displacement": [0.0, 0.0]}
    first, last = track[seen][0], track[seen][-1]
    move = (last - first) / video.shape[2]  # in frame sides
    want = np.array(DIRECTIONS[spec.direction], np.float32)
    along = float(move @ want)
    across = float(abs(move @ want[::-1]))
    return {
        "colour": colour_ok,
        "direction": bool(along >= min_travel and along > across),
        "displacement": [float(move[0]), float(move[1])],
    }
