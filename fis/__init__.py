"""FIS-DiT, the algorithm: schedule, gates, reconstruction and FLOPs. No diffusers, no distributed."""

from .config import OPERATORS, FISConfig, FISConfigError, parse_blocks
from .flops import UNIT, DiTDims, generation_flops
from .schedule import FISPlan, anchor_frames, interp_table

__all__ = [
    "OPERATORS",
    "FISConfig",
    "FISConfigError",
    "parse_blocks",
    "UNIT",
    "DiTDims",
    "generation_flops",
    "FISPlan",
    "anchor_frames",
    "interp_table",
]
