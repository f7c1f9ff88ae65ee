"""Fidelity harness: dense vs each FIS configuration over a fixed prompt set and seeds.

    python launch/eval.py --out eval/                                   # embedded model, 24 grammar prompts
    python launch/eval.py --model PIPELINE --prompts 24 --seeds 0,1 --steps 4 --frames 49 --height 64 --width 64 \
        --out eval/

Writes eval.json (every sample, summary, targets, command, versions), eval.md (table + targets met/missed)
and eval_psnr.png / eval_frame_psnr.png / eval_frontier.png (speedup vs PSNR, one point per operator x stride).
Configurations: engine/evaluation/fidelity.py CONFIGS (one line each).

    python launch/eval.py --replot --out eval/ --measured operators.json
        # eval.md and the plots again from eval.json, with the GPU-measured speedups (launch/bench_operators.py)
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from launch.common import Parser, check_output_dir, fail, quiet_libraries, read_prompts


def parser() -> Parser:
    p = Parser(prog="eval", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="pipeline folder or hub id (default: the embedded model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--scheduler", default="default")
    p.add_argument("--shift", type=float)
    p.add_argument(
        "--prompts",
        type=int,
        default=24,
        help="grammar prompts drawn deterministically (24: every colour x direction pair once)",
    )
    p.add_argument("--prompt-seed", type=int, default=0, help="seed of the prompt draw")
    p.add_argument("--prompt-file", help="one prompt per line instead (adherence only for grammar prompts)")
    p.add_argument("--seeds", default="0", help="generation seeds, comma-separated")
    p.add_argument(
        "--configs",
        help="configurations besides Dense, comma-separated, or groups: paper (default), operators (the frontier's "
        "operator x stride points), all",
    )
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--frames", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--guidance", type=float, help="default: the model's")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--save-videos", action="store_true", help="also write every video to OUT/videos/")
    p.add_argument(
        "--eq6-prompts",
        type=int,
        default=0,
        help="prompts the paper's Eq. 6 probe runs on, per stride (the first of the set; default 0: not measured)",
    )
    p.add_argument("--replot", action="store_true", help="only rewrite eval.md and the plots from OUT/eval.json")
    p.add_argument(
        "--measured", help="JSON of launch/bench_operators.py: measured real-size speedups for the table and frontier"
    )
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parser().parse_args(argv)
    quiet_libraries()
    from engine.errors import UserError

    try:
        if a.replot:
            return replot(a)
        return run(a, shlex.join(["python", "launch/eval.py", *argv]))
    except UserError as e:
        fail(str(e), "eval")


def inputs(a):
    from engine.errors import UserError
    from engine.evaluation.fidelity import prompt_set
    from parallel import world_size_from_env

    if world_size_from_env() > 1:
        raise UserError("eval runs in one process; run it without torchrun")
    try:
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds must be integers separated by commas, got {a.seeds!r}") from None
    if not seeds or min(seeds) < 0:
        raise UserError(f"--seeds needs at least one seed >= 0, got {a.seeds!r}")
    if a.prompt_file:
        prompts = read_prompts(a.prompt_file)
        if not prompts:
            raise UserError(f"prompt file {a.prompt_file!r} has no prompts")
    elif a.prompts < 1:
        raise UserError(f"--prompts must be >= 1, got {a.prompts}")
    else:
        prompts = prompt_set(a.prompts, a.prompt_seed)
    return prompts, seeds, check_output_dir(a.out, a.overwrite)


def run(a, command: str) -> int:
    prompts, seeds, out = inputs(a)
    measured = read_measured(a.measured)
    if a.eq6_prompts < 0:
        from engine.errors import UserError

        raise UserError(f"--eq6-prompts must be >= 0, got {a.eq6_prompts}")
    from tqdm import tqdm

    from engine.evaluation import fidelity, fidelity_report
    from engine.runtime.io import write_json
    from engine.runtime.request import GenerationRequest
    from engine.runtime.worker import Worker, WorkerConfig

    worker = Worker(WorkerConfig(model=a.model, device=a.device, dtype=a.dtype, scheduler=a.scheduler, shift=a.shift))
    worker.pipe.set_progress_bar_config(disable=True)  # one bar: ours, over the generations
    configs = fidelity.configurations(worker.info.family, a.configs.split(",") if a.configs else None)
    base = fidelity.check(
        worker,
        GenerationRequest(
            prompt=prompts[0], height=a.height, width=a.width, num_frames=a.frames, steps=a.steps, guidance=a.guidance
        ),
        configs,
    )
    out.mkdir(parents=True, exist_ok=True)
    videos = out / "videos" if a.save_videos else None
    if videos:
        videos.mkdir(exist_ok=True)
    t0 = time.time()
    with tqdm(total=len(prompts) * len(seeds) * len(configs), unit="video", desc="eval", file=sys.stderr) as bar:
        rows = fidelity.evaluate(worker, prompts, seeds, base, configs, bar.update, videos)
    errors = None
    if a.eq6_prompts:
        print(f"Eq. 6 probe on {min(a.eq6_prompts, len(prompts))} prompt(s)", file=sys.stderr, flush=True)
        errors = fidelity.eq6(worker, prompts[: a.eq6_prompts], base, configs)
    report = fidelity.report(worker, base, prompts, seeds, configs, rows, command, time.time() - t0, errors, measured)
    write_json(report, out / "eval.json")
    md = fidelity_report.write(report, out)
    for t in report["targets"]:
        print(
            {True: "met     ", False: "MISSED  ", None: "reported"}[t["met"]],
            t["target"],
            "" if t["value"] is None else f"{t['value']:.2f} {t['unit']}",
        )
    print(f"wrote {md} and {out / 'eval.json'}")
    return 0


def read_measured(path):
    """The GPU operator benchmark's JSON (engine/bench/operators.py), or None."""
    if path is None:
        return None
    import json

    from engine.errors import UserError

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--measured {path}: cannot read it ({e})") from None
    if "speedup" not in data:
        raise UserError(f"--measured {path}: not a launch/bench_operators.py result (no 'speedup')")
    return data


def replot(a) -> int:
    import json

    from engine.errors import UserError
    from engine.evaluation import fidelity_report
    from engine.runtime.io import write_json

    path = Path(a.out) / "eval.json"
    if not path.is_file():
        raise UserError(f"--replot: no eval.json in {a.out}")
    report = json.loads(path.read_text())
    measured = read_measured(a.measured)
    if measured is not None:  # the targets again, on the measured speedups
        from engine.evaluation.fidelity import all_targets

        report["measured"] = measured
        report["targets"] = all_targets(report["summary"], measured)
        write_json(report, path)
    print(f"wrote {fidelity_report.write(report, Path(a.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
