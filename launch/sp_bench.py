"""Sequence-parallel benchmark: real-size Wan 2.2 A14B with random weights built on every GPU in bf16,
4 steps of 81 frames at 480p and 720p, Dense and FIS-Balanced, for each shard layout and attention implementation.
Prints the time of every step and, from a short torch.profiler run, the share of GPU time spent in all-to-all
(Ulysses) and all-gather (output gather; frame layout: FIS anchors).

    torchrun --nproc_per_node=8 launch/sp_bench.py --out docs/bench/sp8.json
    torchrun --nproc_per_node=1 launch/sp_bench.py --shards spatial --attention diffusers   # 1-GPU baseline
    torchrun --nproc_per_node=2 launch/sp_bench.py --tiny                                   # CPU (gloo) smoke run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from engine.models.random import MODELS  # noqa: E402


def parser() -> argparse.ArgumentParser:
    from launch.common import Parser

    p = Parser(prog="sp_bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="wan2.2-a14b", help=", ".join(MODELS))
    p.add_argument("--resolutions", default="480p,720p")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--ring", type=int, default=1, help="ring degree; ulysses = processes / ring")
    p.add_argument("--shards", default="spatial,frame")
    p.add_argument("--attention", default="diffusers,xfuser", help="xfuser rows are skipped where it is missing")
    p.add_argument("--attention-backend", default=None, help="diffusers backend name (default: torch SDPA)")
    p.add_argument(
        "--compile",
        default="off",
        choices=["off", "static"],
        help="torch.compile each block (under the FIS and SP hooks), as generate.py --compile",
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--check", action="store_true", help="first resolution: rel L2 of each row vs this GPU alone")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--tiny", action="store_true", help="toy-width model on CPU (gloo), for a smoke run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON report (rank 0)")
    return p


def main(argv=None) -> dict | None:
    from engine.bench.sp import run
    from engine.errors import UserError
    from launch.common import fail

    try:
        return run(parser().parse_args(argv))
    except UserError as e:
        fail(str(e), "sp_bench")


if __name__ == "__main__":
    main()
