"""FISConfig: what to sparsify (paper §3.3), validated, loadable from TOML.

A config is model-agnostic; `FISConfig.resolve(num_blocks, num_frames, num_steps)` checks it
against one model and one request and returns the concrete `FISPlan` (schedule.py).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from .operators import OPERATORS


class FISConfigError(ValueError):
    """A FIS setting that cannot work; the message names the field and the valid range."""


MAX_BLOCKS = 1024  # no video DiT comes near (Wan 40, HunyuanVideo 1.5 54): a bound before anything is expanded
_INDEX = re.compile(r"[0-9]{1,4}")  # ASCII digits: int() would take any script's


def parse_blocks(spec) -> tuple[int, ...] | None:
    """'auto'/None -> None; '2-37' -> (2..37) inclusive; '1,3,5-7' or a list -> explicit tuple. Indices are
    checked against MAX_BLOCKS before any range is expanded, and messages quote at most a few of them: a short
    spec must not cost memory, time or a long error in proportion to the numbers in it."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "auto")):
        return None
    if isinstance(spec, range):
        spec = list(spec) if len(spec) <= MAX_BLOCKS else [spec.stop]
    if isinstance(spec, (list, tuple)):
        if len(spec) > MAX_BLOCKS:
            raise FISConfigError(f"fis blocks: {len(spec)} indices; a model has at most {MAX_BLOCKS} blocks")
        out = []
        for x in spec:
            if isinstance(x, bool) or not isinstance(x, int):
                raise FISConfigError(f"fis blocks: {_short(x)} is not a block index")
            if not 0 <= x < MAX_BLOCKS:
                raise FISConfigError(f"fis blocks: index {_short(x)} is out of range 0-{MAX_BLOCKS - 1}")
            out.append(x)
        return tuple(out)
    if not isinstance(spec, str):
        raise FISConfigError(f"fis blocks: expected 'auto', 'a-b', 'a,b,c' or a list, got {_short(spec)}")
    parts = spec.replace(" ", "").split(",")
    if len(parts) > MAX_BLOCKS:
        raise FISConfigError(f"fis blocks: {len(parts)} parts; a model has at most {MAX_BLOCKS} blocks")
    out = []
    for part in parts:
        ends = part.split("-", 1) if "-" in part else [part, part]
        if not all(_INDEX.fullmatch(e) for e in ends):
            raise FISConfigError(
                f"fis blocks: cannot parse {_short(part)} in {_short(spec)} (use 'a-b' or 'a,b,c', "
                f"indices 0-{MAX_BLOCKS - 1})"
            )
        lo, hi = int(ends[0]), int(ends[1])
        if hi >= MAX_BLOCKS:
            raise FISConfigError(f"fis blocks: index {hi} is out of range 0-{MAX_BLOCKS - 1}")
        if hi < lo:
            raise FISConfigError(f"fis blocks: range {_short(part)} is empty (end < start)")
        out.extend(range(lo, hi + 1))
        if len(out) > MAX_BLOCKS:
            raise FISConfigError(f"fis blocks: more than {MAX_BLOCKS} indices; a model has at most that many blocks")
    return tuple(out)


def _short(v, limit: int = 40) -> str:
    """A value in a message, bounded."""
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _listed(blocks) -> str:
    """Block indices in a message: compact ranges, bounded."""
    return _short(_compact(tuple(blocks)), 60)


@dataclass(frozen=True)
class FISConfig:
    """Frame Interleaved Sparsity settings (paper Eq. 10-15).

    Attributes:
        stride: anchor stride s; a sparse block computes every s-th latent frame (plus the first
            and last), so roughly 1/s of the tokens. s=1 means every frame is an anchor (= dense).
        dense_head: protected head blocks [0, dense_head) that always run all frames (Eq. 13).
        dense_tail: protected tail blocks [L - dense_tail, L).
        blocks: the sparse block set. None ('auto') = every block between the protected head and
            tail; otherwise explicit indices, which must not touch the protected head/tail.
        dense_steps: the final K denoising steps run dense (Eq. 14).
        operator: what a sparse block computes (fis/operators.py). 'linear' interpolates anchor *outputs*
            (paper Eq. 10); 'residual' interpolates each anchor's update y - x and adds it to the skipped
            frame's own input; 'attn' and 'kv' run the block on every frame and make only its
            self-attention sparse (anchors-only attention interpolated / every query against the
            anchors' keys and values), so a skipped frame gets its own update.
        interleave: rotate the anchor offset (l - l0) mod s across sparse blocks (Eq. 11). Off =
            the same anchors in every sparse block (paper Table 2 ablation).
    """

    stride: int = 3
    dense_head: int = 1
    dense_tail: int = 1
    blocks: tuple[int, ...] | None = None
    dense_steps: int = 1
    operator: str = "residual"
    interleave: bool = True
    name: str = field(default="custom", compare=False)

    def __post_init__(self):
        object.__setattr__(self, "blocks", parse_blocks(self.blocks))
        for key in ("stride", "dense_head", "dense_tail", "dense_steps"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int):
                raise FISConfigError(f"fis {key}: expected an integer, got {_short(v)}")
        if self.stride < 1:
            raise FISConfigError(f"fis stride must be >= 1, got {_short(self.stride)}")
        if self.dense_head < 0 or self.dense_tail < 0 or self.dense_steps < 0:
            raise FISConfigError("fis dense_head, dense_tail and dense_steps must be >= 0")
        if self.operator not in OPERATORS:
            raise FISConfigError(f"fis operator must be one of {', '.join(OPERATORS)}, got {_short(self.operator)}")
        if not isinstance(self.interleave, bool):
            raise FISConfigError(f"fis interleave: expected true/false, got {_short(self.interleave)}")
        if self.blocks is not None and len(set(self.blocks)) != len(self.blocks):
            raise FISConfigError(f"fis blocks: duplicate indices in {_listed(self.blocks)}")

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict, name: str = "custom") -> FISConfig:
        known = {f.name for f in dataclasses.fields(cls)} - {"name"}
        unknown = set(data) - known
        if unknown:
            raise FISConfigError(f"unknown fis setting(s) {sorted(unknown)}; valid: {sorted(known)}")
        return cls(**data, name=data.get("name", name))

    @classmethod
    def from_toml(cls, path: str | Path) -> FISConfig:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise FISConfigError(f"fis config file not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise FISConfigError(f"fis config {path} is not valid TOML: {e}") from None
        data = data.get("fis", data)  # accept a [fis] table or top-level keys
        return cls.from_dict(data, name=path.stem)

    def replace(self, **overrides) -> FISConfig:
        """Copy with the non-None overrides applied (CLI flags)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_toml(self) -> str:
        blocks = "auto" if self.blocks is None else _compact(self.blocks)
        return (
            "[fis]\n"
            f"stride = {self.stride}\n"
            f"dense_head = {self.dense_head}\n"
            f"dense_tail = {self.dense_tail}\n"
            f'blocks = "{blocks}"\n'
            f"dense_steps = {self.dense_steps}\n"
            f'operator = "{self.operator}"\n'
            f"interleave = {str(self.interleave).lower()}\n"
        )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["blocks"] = "auto" if self.blocks is None else _compact(self.blocks)
        return d

    # ---- checks against a model and a request ------------------------------------------
    def sparse_blocks(self, num_blocks: int) -> tuple[int, ...]:
        lo, hi = self.dense_head, num_blocks - self.dense_tail  # protected: [0, lo) and [hi, L)
        if lo > hi:
            raise FISConfigError(
                f"fis dense_head ({self.dense_head}) + dense_tail ({self.dense_tail}) exceed the model's "
                f"{num_blocks} blocks"
            )
        if self.blocks is None:
            return tuple(range(lo, hi))
        bad = [b for b in self.blocks if not 0 <= b < num_blocks]
        if bad:
            raise FISConfigError(f"fis blocks {_listed(bad)} out of range: the model has blocks 0-{num_blocks - 1}")
        clash = [b for b in self.blocks if b < lo or b >= hi]
        if clash:
            raise FISConfigError(
                f"fis blocks {_listed(clash)} overlap the protected head/tail (dense blocks 0-{lo - 1} and "
                f"{hi}-{num_blocks - 1}); "
                f"lower dense_head/dense_tail to sparsify them"
            )
        return tuple(sorted(self.blocks))

    def resolve(self, num_blocks: int, num_frames: int, num_steps: int):
        """Validate against a model (num_blocks), a latent frame count and a step count -> FISPlan."""
        from .schedule import FISPlan

        if num_frames >= 1 and self.stride >= num_frames and self.stride > 1:
            raise FISConfigError(
                f"fis stride {_short(self.stride)} must be smaller than the number of latent frames ({num_frames})"
            )
        if self.dense_steps > num_steps:
            raise FISConfigError(
                f"fis dense_steps ({_short(self.dense_steps)}) exceeds the number of steps ({num_steps})"
            )
        return FISPlan(self, self.sparse_blocks(num_blocks), num_frames, num_steps)


def _compact(blocks: tuple[int, ...]) -> str:
    """(1,2,3,7) -> '1-3,7'."""
    parts, run = [], []
    for b in sorted(blocks):
        if run and b == run[-1] + 1:
            run.append(b)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [b]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)
