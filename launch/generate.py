"""Generate one video.  python launch/generate.py --prompt "a red circle moving right" --fis balanced

With no --model it uses the embedded model shipped in engine/weights/shapes-wan (nothing downloaded).
Several GPUs (or CPU processes, gloo): torchrun --nproc_per_node=N launch/generate.py --ulysses N ...
Writes OUTPUT.mp4 and OUTPUT.metrics.json (and OUTPUT.latents.safetensors with --save-latents).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from launch.common import (
    Parser,
    add_model_args,
    add_request_args,
    check_output,
    fail,
    quiet_libraries,
    request,
    summary,
    worker_config,
)


def main(argv=None) -> int:
    p = Parser(prog="generate", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_model_args(p)
    add_request_args(p)
    p.add_argument("--output", default="out.mp4", help="mp4 path (its folder must exist)")
    p.add_argument("--fps", type=int, default=16)
    p.add_argument("--save-latents", action="store_true", help="also save the final latents (safetensors)")
    a = p.parse_args(argv)

    quiet_libraries()
    from engine.errors import UserError

    try:
        out = check_output(a.output)
        if not a.prompt.strip():
            raise UserError("prompt must be a non-empty string")
        if a.image:  # a missing or unreadable image fails before the model loads
            from engine.runtime.images import load

            load(a.image)
        from engine.runtime.worker import Worker

        worker = Worker(worker_config(a))
        req = worker.validate(request(a, worker.info.family))  # every check before any work
        result = worker.generate(req)
    except UserError as e:
        fail(str(e))

    from parallel import destroy_parallel

    if not worker.ctx.is_main:  # rank 0 writes; the others are done
        destroy_parallel()
        return 0
    from engine.runtime.io import save_latents, write_json, write_mp4

    write_mp4(result["frames"], out, fps=a.fps)
    metrics = {**result["metrics"], "output": str(out), "command": " ".join(sys.argv)}
    if a.save_latents:
        metrics["latents"] = str(save_latents(result["latents"], out.with_suffix(".latents.safetensors")))
    write_json(metrics, out.with_suffix(".metrics.json"))
    print(f"wrote {out} ({req.num_frames} frames, {req.width}x{req.height})")
    print(summary(metrics))
    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
