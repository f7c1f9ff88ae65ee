"""HunyuanVideo 1.5 8B benchmark: the real-size transformer with random bf16 weights, the paper's
I2V setting (480p, 81 frames, 8 steps, sparsity on steps 0-6), Dense vs FIS-Balanced vs FIS-Fast.

    python launch/bench_hunyuan.py --out docs/bench/hunyuan.json          # one GPU
    python launch/bench_hunyuan.py --tiny                                 # CPU smoke run

Context as the I2V pipeline builds it: 1000 Qwen tokens (150 valid), 256 ByT5 tokens (none valid: no quoted
text), 729 SigLIP image tokens; run with the padding dropped (the engine's way, no attention mask) and, for
Dense, as diffusers runs it (a dense [B, 1, S, S] mask in every block); speedups are vs trimmed Dense.
Timing: CUDA events per step, one warm-up generation, median of the repeats; every row in the same process.
Fidelity: relative L2 of the final latents vs Dense (random weights: a consistency check, not a quality score).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from launch.common import Parser, fail  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="bench_hunyuan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=848)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rows", default="Dense,FIS-Balanced,FIS-Fast")
    p.add_argument(
        "--context",
        default="trimmed,masked",
        help="trimmed: text padding dropped, no attention mask (parallel.drop_text_padding); "
        "masked: diffusers as is, a dense [B, 1, S, S] mask in every block (Dense only)",
    )
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out")
    return p


def main(argv=None) -> dict | None:
    from engine.bench.hunyuan import run
    from engine.errors import UserError

    try:
        return run(parser().parse_args(argv))
    except UserError as e:
        fail(str(e), "bench_hunyuan")


if __name__ == "__main__":
    main()
