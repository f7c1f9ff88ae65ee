"""Train the embedded model: a small Wan-architecture video DiT on procedural shapes videos.

  python launch/train_shapes.py --out engine/weights/shapes-wan              # one GPU, about 10 minutes
  python launch/train_shapes.py --out /tmp/smoke --smoke                     # CPU, seconds: checks the script

The v2 testbed (issue 16; engine/testbed/train.py V2: 20 narrower blocks, textured backgrounds under a panning
camera, a distilled 4-step unguided student) in two runs of under 9 minutes each, the teacher and then its student:

  python launch/train_shapes.py --preset v2 --stage teacher --out T --workers 12 --compile --dit-minutes 7
  python launch/train_shapes.py --preset v2 --stage student --teacher T --out V2 --workers 12 --distill-minutes 6.5
  python launch/train_shapes.py --preset v2 --out /tmp/smoke --smoke         # CPU, seconds: both stages

Seeded end to end; the steps actually run (--dit-minutes / --distill-minutes fit the counts to a time budget) go
into training.json next to the weights, so the run can be repeated exactly with --dit-steps / --distill-steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    from launch.common import Parser

    p = Parser(prog="train_shapes", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="pipeline folder to write")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clips", type=int)
    p.add_argument("--dit-steps", type=int)
    p.add_argument("--dit-batch", type=int)
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer for training (GPU)")
    p.add_argument("--dit-minutes", type=float, help="time budget of the transformer stage (fits its step count)")
    p.add_argument("--preset", choices=["v1", "v2"], default="v1", help="v1: the shipped model; v2: issue 16's testbed")
    p.add_argument(
        "--stage",
        choices=["all", "teacher", "student"],
        default="all",
        help="teacher: stop before distilling (a guided model); student: distil --teacher (a folder of a teacher run)",
    )
    p.add_argument("--teacher", help="the teacher's pipeline folder (--stage student)")
    p.add_argument("--distill-steps", type=int)
    p.add_argument("--distill-minutes", type=float, help="time budget of the distillation (fits its step count)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any TrainConfig field on top of the preset (repeatable), e.g. --set layers=16 --set camera=0: the "
        "variants of docs/eval/v2.md",
    )
    p.add_argument("--workers", type=int, default=8, help="processes rendering the clips")
    p.add_argument("--check", type=int, default=24, help="prompts sampled after training for an adherence check")
    p.add_argument("--smoke", action="store_true", help="tiny settings: checks the script runs, trains nothing useful")
    a = p.parse_args(argv)

    import torch

    from engine.errors import UserError
    from engine.runtime.device import pick_device
    from engine.testbed.train import V2, TrainConfig, check_adherence, save, train

    try:
        dev = pick_device(a.device)
    except UserError as e:
        p.error(str(e))
    if (a.stage == "student") != (a.teacher is not None):
        p.error("--stage student needs --teacher FOLDER, and --teacher goes with --stage student only")
    if a.teacher is not None and not (Path(a.teacher) / "model_index.json").is_file():
        p.error(f"--teacher {a.teacher}: not a pipeline folder (no model_index.json)")
    preset = V2 if a.preset == "v2" else {}
    cfg = TrainConfig(seed=a.seed, **preset, **overrides(p, a.set))
    if a.smoke:
        tiny = dict(frames=9, size=32, clips=16, pca_clips=16, dit_steps=3, dit_batch=2, layers=2, ffn=64, heads=2)
        cfg = TrainConfig(**{**asdict(cfg), **tiny, "head_dim": 16, "distill_batch": 2})
        if cfg.distill_steps:
            cfg.distill_steps = 3
        a.check = min(a.check, 2)
    if a.stage == "teacher":  # the guided model alone; its student is the next run's
        cfg.distill_steps, cfg.guidance = 0, TrainConfig.guidance
    cfg.compile = a.compile
    for k, v in (
        ("clips", a.clips),
        ("dit_steps", a.dit_steps),
        ("dit_batch", a.dit_batch),
        ("distill_steps", a.distill_steps),
    ):
        if v is not None:
            setattr(cfg, k, v)
    cfg.dit_budget_s = a.dit_minutes * 60 if a.dit_minutes else None
    cfg.distill_budget_s = a.distill_minutes * 60 if a.distill_minutes else None
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    start = time.strftime("%Y-%m-%d %H:%M:%S")
    pipe, report = train(cfg, dev, workers=a.workers, log=lambda m: print(m, flush=True), start=a.teacher)
    if a.teacher is not None:  # how the teacher was made travels with its student
        report["teacher"] = json.loads((Path(a.teacher) / "training.json").read_text())

    report["adherence_4_steps"] = check_adherence(pipe, cfg, a.check)
    report["command"] = " ".join(["python", "launch/train_shapes.py", *(argv or sys.argv[1:])])
    report["started"] = start
    print(f"adherence (4 Euler steps, {a.check} prompts): {report['adherence_4_steps']}", flush=True)
    save(pipe, a.out, report)
    size = sum(f.stat().st_size for f in Path(a.out).rglob("*") if f.is_file()) / 2**20
    print(f"saved {a.out} ({size:.1f} MiB)")
    return 0


def overrides(p, items: list[str]) -> dict:
    """--set KEY=VALUE pairs -> TrainConfig fields; values are Python literals (numbers, strings, None), else text."""
    import ast
    from dataclasses import fields

    from engine.testbed.train import TrainConfig

    known = {f.name for f in fields(TrainConfig)} - {"done", "seed"}
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in known:
            p.error(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(known))}")
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text
    return out


if __name__ == "__main__":
    sys.exit(main())
