"""FP8 vs bf16 on a model with trained weights (default: the embedded model): video PSNR, prompt adherence and each
block's sensitivity — issue 14's gate for making `--quantize fp8` a default (engine/evaluation/quantized.py).

    python launch/eval_fp8.py --out eval-fp8/                 # GPU: torchao and a GPU with FP8 tensor cores
    python launch/eval_fp8.py --prompts 8 --blocks none --out eval-fp8/

Writes OUT/fp8.json (every sample, summary, gate) and OUT/fp8.md (the table).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from launch.common import Parser, check_output_dir, fail, quiet_libraries


def parser() -> Parser:
    p = Parser(prog="eval_fp8", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="pipeline folder (default: the embedded model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bf16", help="the reference precision (torchao's rowwise FP8 quantises bf16)")
    p.add_argument("--prompts", type=int, default=8, help="grammar prompts drawn deterministically")
    p.add_argument("--seeds", default="0", help="generation seeds, comma-separated")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--frames", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--blocks", default="all", help="blocks of the sensitivity sweep: all, none, or e.g. 0,9")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parser().parse_args(argv)
    quiet_libraries()
    from engine.errors import UserError

    try:
        return run(a, shlex.join(["python", "launch/eval_fp8.py", *argv]))
    except UserError as e:
        fail(str(e), "eval_fp8")


def run(a, command: str) -> int:
    from engine.errors import UserError
    from engine.evaluation import quantized
    from engine.evaluation.fidelity import prompt_set
    from engine.hooks.quantize import check_quantize
    from engine.runtime.device import pick_device
    from engine.runtime.io import write_bytes, write_json
    from engine.runtime.request import GenerationRequest
    from engine.runtime.worker import WorkerConfig

    try:
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds must be integers separated by commas, got {a.seeds!r}") from None
    if not seeds or a.prompts < 1:
        raise UserError("--prompts must be >= 1 and --seeds must name at least one seed")
    try:
        blocks = None if a.blocks == "all" else [] if a.blocks == "none" else [int(b) for b in a.blocks.split(",")]
    except ValueError:
        raise UserError(f"--blocks must be all, none or block numbers separated by commas, got {a.blocks!r}") from None
    device = pick_device(a.device)
    check_quantize("fp8", device)  # torchao and an FP8 GPU, before anything loads
    out = check_output_dir(a.out, a.overwrite)
    prompts = prompt_set(a.prompts)
    cfg = WorkerConfig(model=a.model, device=a.device, dtype=a.dtype)
    base = GenerationRequest(prompts[0], height=a.height, width=a.width, num_frames=a.frames, steps=a.steps)
    t0 = time.time()
    samples = quantized.evaluate(cfg, base, prompts, seeds, blocks, lambda v: print(f"  {v}", flush=True))
    report = quantized.report(cfg, base, prompts, seeds, samples, command, t0)
    out.mkdir(parents=True, exist_ok=True)
    write_json(report, out / "fp8.json")
    write_bytes(quantized.markdown(report).encode(), out / "fp8.md")
    g = report["gate"]
    print(
        f"FP8 vs bf16 {g['psnr_mean_db']:.2f} dB, adherence agreement {g['adherence_agreement_pct']}%: "
        f"{'met' if g['met'] else 'MISSED'}; wrote {out / 'fp8.md'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
