"""Speed of every FIS operator on the real-size Wan 2.2 A14B block (random bf16 weights), 480p and 720p: dense,
today's FIS (residual, linear) and the attention-scope operators (attn, kv) at strides 2-5, in one run.

    python launch/bench_operators.py --out $OUT/operators.json       # one H200: about 2-3 minutes
    python launch/bench_operators.py --tiny --out /tmp/ops.json      # CPU smoke run (toy width), seconds

Each operator runs through the engine's own sparse-block code (engine/hooks/fis.run_operator) once per anchor count
its plan produces; CUDA events, warm-up, median of repeats. The JSON holds the block times, the generation speedup
composed from them with the wan-14b preset's plan (4 steps, one head and tail block and the last step dense) and the
FLOPs estimate beside it; `launch/eval.py --replot --out docs/eval --measured operators.json` puts the measured
speedups into the eval table and the frontier plot (engine/bench/operators.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from launch.common import Parser, fail  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="bench_operators", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolutions", default="480p,720p")
    p.add_argument("--operators", help="comma-separated (default: all of fis/operators.py)")
    p.add_argument("--strides", default="2,3,4,5")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--attention-backend", help="a diffusers backend for the block (default: torch SDPA)")
    p.add_argument("--budget-s", type=float, default=280.0, help="operators left when this is spent are skipped")
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", help="toy-width block of the same structure (CPU smoke run)")
    p.add_argument(
        "--fused-glue",
        action="store_true",
        help="the reconstruction as the compiled CUDA kernel (one compile per operator and anchor count)",
    )
    p.add_argument("--out", required=True, help="the JSON to write")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parser().parse_args(argv)
    from engine.errors import UserError

    try:
        return run(a, " ".join(["python", "launch/bench_operators.py", *argv]))
    except UserError as e:
        fail(str(e), "bench_operators")


def run(a, command: str) -> int:
    from engine.bench.operators import operator_sweep, table
    from engine.errors import UserError
    from engine.models.wan import RESOLUTIONS
    from engine.runtime.device import pick_device
    from engine.runtime.io import write_json
    from fis import OPERATORS

    resolutions = [r.strip() for r in a.resolutions.split(",") if r.strip()]
    if not resolutions or set(resolutions) - set(RESOLUTIONS):
        raise UserError(f"--resolutions: choose from {', '.join(RESOLUTIONS)}, got {a.resolutions!r}")
    operators = list(OPERATORS) if a.operators is None else [o.strip() for o in a.operators.split(",") if o.strip()]
    if not operators or set(operators) - set(OPERATORS):
        raise UserError(f"--operators: choose from {', '.join(OPERATORS)}, got {a.operators!r}")
    try:
        strides = [int(s) for s in a.strides.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--strides must be integers separated by commas, got {a.strides!r}") from None
    if not strides or min(strides) < 2:
        raise UserError(f"--strides must be >= 2, got {a.strides!r}")
    if a.warmup < 0 or a.repeats < 1:
        raise UserError("--warmup must be >= 0 and --repeats >= 1")
    device = pick_device(a.device)
    result = operator_sweep(
        device,
        resolutions,
        operators,
        strides,
        a.warmup,
        a.repeats,
        a.attention_backend,
        a.budget_s,
        tiny=a.tiny,
        fused_glue=a.fused_glue,
        log=lambda m: print(m, flush=True),
    )
    result["command"] = command
    write_json(result, Path(a.out))
    print(table(result))
    print(f"wrote {a.out} ({result['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
