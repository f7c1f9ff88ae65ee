# Not named profile.py: a script folder on sys.path would shadow the stdlib module `profile` (cProfile).
"""Measure a model like the paper's §3.2 and choose its sparse blocks.

  python launch/profile_fis.py run --prompt "a red circle moving right" --prompt "a cat" --stride 3 --out prof/
  python launch/profile_fis.py calibrate --profile prof/ --budget 0.05 --out configs/fis/mine.toml

`run` writes profile.json (Eq. 1-6 numbers), three PNG figures and report.md; `calibrate` writes a
FIS preset that `launch/generate.py --fis <toml>` accepts and prints its predicted FLOPs saving.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fis.operators import OPERATORS
from launch.common import (
    Parser,
    add_model_args,
    check_output_dir,
    fail,
    quiet_libraries,
    read_prompts,
    worker_config,
)


def main(argv=None) -> int:
    p = Parser(prog="profile", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser)
    r = sub.add_parser("run", help="profile a model")
    add_model_args(r)
    r.add_argument("--prompt", action="append", default=[], help="repeat for several prompts")
    r.add_argument("--prompts", help="a text file, one prompt per line")
    r.add_argument("--stride", type=int, required=True)
    r.add_argument("--frames", type=int)
    r.add_argument("--height", type=int)
    r.add_argument("--width", type=int)
    r.add_argument("--steps", type=int, default=4)
    r.add_argument("--guidance", type=float, help="default: the model's")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", required=True)
    r.add_argument("--overwrite", action="store_true")
    c = sub.add_parser("calibrate", help="choose the sparse blocks from a profile")
    c.add_argument("--profile", required=True, help="a profile folder (or its profile.json)")
    c.add_argument("--budget", type=float, required=True, help="max mean Eq. 6 error of a sparse block")
    c.add_argument("--operator", default="residual", choices=list(OPERATORS))
    c.add_argument("--dense-steps", type=int, default=1)
    c.add_argument("--out", required=True, help="the FIS preset .toml to write")
    a = p.parse_args(argv)
    quiet_libraries()
    from engine.errors import UserError

    try:
        return run(a) if a.cmd == "run" else calibrate(a)
    except UserError as e:
        fail(str(e), "profile")


def run(a) -> int:
    from engine.errors import UserError
    from engine.evaluation.probe import OPERATORS, block_error, profile
    from engine.evaluation.probe_report import report
    from engine.runtime.io import write_json
    from engine.runtime.request import GenerationRequest

    prompts = [x for x in a.prompt if x.strip()]
    if a.prompts:
        prompts += read_prompts(a.prompts)
    if not prompts:
        raise UserError("the prompt set is empty: give --prompt (repeatable) or --prompts FILE")
    if a.stride < 2:
        raise UserError(f"--stride must be >= 2 to measure sparse evaluation, got {a.stride}")
    out = check_output_dir(a.out, a.overwrite)
    from engine.runtime.worker import Worker

    try:
        worker = Worker(worker_config(a))
        req = GenerationRequest(
            prompt=prompts[0],
            height=a.height,
            width=a.width,
            num_frames=a.frames,
            steps=a.steps,
            guidance=a.guidance,
            seed=a.seed,
        )
        prof = profile(worker, prompts, req, a.stride, progress=lambda k, n: print(f"prompt {k}/{n}", flush=True))
    except ValueError as e:  # e.g. a model FIS has no adapter for
        raise UserError(str(e).splitlines()[0]) from None
    if not worker.ctx.is_main:  # under torchrun every rank measured its slice; rank 0 holds the sums and writes
        return 0
    out.mkdir(parents=True, exist_ok=True)
    write_json(prof, out / "profile.json")
    errs = {op: block_error(prof, op, dense_steps=1) for op in OPERATORS}
    print(
        f"{len(prompts)} prompt(s) in {sum(prof['seconds_per_prompt']):.1f} s, peak memory "
        f"{prof['peak_memory_gib']:.1f} GiB ({'GPU' if prof['gpu'] else 'RSS'})"
    )
    print(f"wrote {report(prof, errs, out)}")
    return 0


def calibrate(a) -> int:
    from engine.errors import UserError
    from engine.evaluation.probe import block_error
    from engine.runtime.presets import load_fis
    from fis import UNIT, DiTDims, generation_flops
    from fis.analysis import calibrate as choose

    path = Path(a.profile)
    path = path / "profile.json" if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"no profile at {a.profile!r} (run `profile_fis.py run` first)")
    prof = json.loads(path.read_text())
    base = load_fis("balanced").replace(stride=prof["stride"], operator=a.operator, dense_steps=a.dense_steps)
    errs = block_error(prof, a.operator, a.dense_steps)
    try:
        cfg = choose(errs, a.budget, base)
    except ValueError as e:
        raise UserError(str(e)) from None
    Path(a.out).write_text(f"# calibrated from {path} with budget {a.budget} ({a.operator})\n" + cfg.to_toml())
    req, dims = prof["request"], prof.get("dims")
    steps, L = prof["steps"], prof["num_blocks"]
    if dims:
        d = DiTDims(**{**dims, "patch": tuple(dims["patch"])})
        plan = cfg.resolve(L, prof["num_frames"], steps)
        dense = generation_flops(d, req["num_frames"], req["height"], req["width"], steps)
        fis = generation_flops(d, req["num_frames"], req["height"], req["width"], steps, plan)
        print(f"predicted FLOPs: {fis / UNIT:.4g} P vs dense {dense / UNIT:.4g} P ({dense / fis:.2f}x)")
    print(f"sparse blocks {list(cfg.blocks)} of {L} (max error {max(errs[b] for b in cfg.blocks):.4f}); wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
