"""Render a JSONL manifest: one mp4 + metrics per line, summary.json at the end. Re-running resumes.

  python launch/render.py prompts.jsonl --output-dir out/                        # one process
  torchrun --nproc-per-node 8 launch/render.py prompts.jsonl --output-dir out/ --ulysses 2   # 4 groups of 2
  python launch/render.py prompts.jsonl --output-dir out/ --ray [--address auto] [--groups 4] [--ulysses 2]

A render group has cfg-parallel x ulysses x ring processes (GPUs); here --ulysses defaults to 1, so under
torchrun every process renders its own lines unless you ask for sequence parallelism.

Each line: {"prompt": ..., "negative_prompt", "size": "832x480" or "height"/"width", "num_frames",
"num_inference_steps", "guidance_scale", "seed", "fis": "balanced" or {"preset", "stride", ...}, "id"}.
Exit status 0 once the batch has run, even if some lines failed: they are reported on stderr with their line
numbers and listed in summary.json ("failed", "failures"). 2: bad usage, nothing rendered.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from launch.common import Parser, add_model_args, fail, quiet_libraries, worker_config


def main(argv=None) -> int:
    p = Parser(prog="render", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("manifest", help="JSONL file, one request per line")
    p.add_argument("--output-dir", required=True, help="where ID.mp4, ID.metrics.json and summary.json go")
    add_model_args(p)
    p.add_argument("--fis", default="off", help="FIS preset for lines that name none: off, balanced, fast")
    p.add_argument("--fps", type=int, help="frames per second of the videos (default: the model's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    r = p.add_argument_group("Ray")
    r.add_argument("--ray", action="store_true", help="render on a Ray cluster (a local one unless --address)")
    r.add_argument("--address", help="Ray cluster address, e.g. auto (implies --ray)")
    r.add_argument("--groups", type=int, help="render groups on Ray (default: as many as the GPUs allow)")
    a = p.parse_args(argv)

    quiet_libraries()
    from engine.errors import GroupFailed, UserError
    from engine.serving.batch import Batch
    from engine.serving.executor import ranks_of, render_local
    from engine.serving.schema import FIS_NAMES

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's
    cfg = dataclasses.replace(worker_config(a), ulysses=1 if a.ulysses is None else a.ulysses)
    try:
        if a.fis.lower() not in FIS_NAMES:
            raise UserError(f"--fis must be one of {', '.join(FIS_NAMES)}, got {a.fis!r}")
        ranks = ranks_of(cfg)  # checks the degrees
        if a.groups is not None and a.groups < 1:
            raise UserError("--groups must be >= 1")
        if world % ranks and not (a.ray or a.address):  # on Ray the groups are actors, not these processes
            raise UserError(
                f"{world} process(es) cannot form render groups of {ranks}: run under torchrun with "
                f"a multiple of {ranks} processes, or with --ray"
            )
        batch = Batch(
            a.manifest, a.output_dir, a.fis, cfg, a.fps, progress=rank == 0 and not a.no_progress, report=rank == 0
        )
        if not batch.pending:
            backend, groups = "none", 0  # nothing to render: no model is loaded
        elif a.ray or a.address:
            from engine.serving.ray_executor import render_on_ray

            backend, groups = "ray", render_on_ray(batch, cfg, a.groups, a.address)
        else:
            ctx = render_local(batch, dataclasses.replace(cfg, dp=world // ranks))
            backend, groups = ("torchrun" if ctx.is_distributed else "local"), ctx.degrees.dp
    except (UserError, GroupFailed) as e:
        fail(str(e), "render")
    if rank != 0:
        return 0
    s = batch.summary(backend, groups, ranks)
    print(
        f"{s['done']} rendered, {s['skipped']} skipped (already complete), {s['failed']} failed "
        f"in {s['total_time_s']:.1f} s ({s['videos_per_hour']:.0f} videos/hour); "
        f"summary: {Path(a.output_dir) / 'summary.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
