"""Train the embedded model: a small Wan-architecture video DiT on procedural shapes videos.

  python launch/train_shapes.py --out engine/weights/shapes-wan              # one GPU, about 10 minutes
  python launch/train_shapes.py --out /tmp/smoke --smoke                     # CPU, seconds: checks the script

Seeded end to end; the steps actually run (--dit-minutes fits the count to a time budget) go into
training.json next to the weights, so the run can be repeated exactly with --dit-steps.
"""

from __future__ import annotations

import argparse
import sys
import time
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
    p.add_argument("--workers", type=int, default=8, help="processes rendering the clips")
    p.add_argument("--check", type=int, default=24, help="prompts sampled after training for an adherence check")
    p.add_argument("--smoke", action="store_true", help="tiny settings: checks the script runs, trains nothing useful")
    a = p.parse_args(argv)

    import torch

    from engine.errors import UserError
    from engine.runtime.device import pick_device
    from engine.testbed.train import TrainConfig, check_adherence, save, train

    try:
        dev = pick_device(a.device)
    except UserError as e:
        p.error(str(e))
    cfg = TrainConfig(seed=a.seed)
    if a.smoke:
        cfg = TrainConfig(
            seed=a.seed,
            frames=9,
            size=32,
            clips=16,
            pca_clips=16,
            dit_steps=3,
            dit_batch=2,
            layers=2,
            ffn=64,
            heads=2,
            head_dim=16,
        )
        a.check = min(a.check, 2)
    cfg.compile = a.compile
    for k, v in (("clips", a.clips), ("dit_steps", a.dit_steps), ("dit_batch", a.dit_batch)):
        if v is not None:
            setattr(cfg, k, v)
    cfg.dit_budget_s = a.dit_minutes * 60 if a.dit_minutes else None
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    start = time.strftime("%Y-%m-%d %H:%M:%S")
    pipe, report = train(cfg, dev, workers=a.workers, log=lambda m: print(m, flush=True))

    report["adherence_4_steps"] = check_adherence(pipe, cfg, a.check)
    report["command"] = " ".join(["python", "launch/train_shapes.py", *(argv or sys.argv[1:])])
    report["started"] = start
    print(f"adherence (4 Euler steps, {a.check} prompts): {report['adherence_4_steps']}", flush=True)
    save(pipe, a.out, report)
    size = sum(f.stat().st_size for f in Path(a.out).rglob("*") if f.is_file()) / 2**20
    print(f"saved {a.out} ({size:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
