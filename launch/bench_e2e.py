"""End-to-end benchmark of the whole video (issue 14): text encode, denoise, VAE decode, mp4 — each part timed — for
the engine's DiT configurations (eager, FA3, compile, FP8, combined) and cache-dit's fastest dense setting, in one
process on one real-size random-weight model (engine/bench/e2e.py says how and what is extrapolated).

python launch/bench_e2e.py --model wan2.2-a14b --resolution 720p --phases eager,fa3,fa3-compile --out-json A.json
python launch/bench_e2e.py --tiny                      # CPU smoke run of every code path, seconds
python launch/bench_e2e.py --append-docs A.json        # add a finished run to docs/benchmarks.md (+ docs/bench/)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from launch.common import Parser, fail, quiet_libraries  # noqa: E402


def parser() -> Parser:
    from engine.bench.e2e import PARTS, PHASES, Options

    d = Options()
    p = Parser(prog="bench_e2e", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=d.model, help="wan2.2-a14b, wan2.2-ti2v-5b or wan2.1-1.3b")
    p.add_argument("--resolution", default=d.resolution, help="480p (832x480) or 720p (1280x720)")
    p.add_argument(
        "--phases", default=d.phases, help=f"comma-separated, each NAME or NAME=Row+Row: {', '.join(PHASES)}"
    )
    p.add_argument(
        "--rows", default=d.rows, help="rows of a phase given without its own: Dense, FIS-Balanced, FIS-Fast"
    )
    p.add_argument("--whole", default=d.whole, help="PHASE=Row+Row,...: also one whole generation each ('' for none)")
    p.add_argument("--parts", default=d.parts, help=f"comma-separated: {', '.join(PARTS)} ('' for none)")
    p.add_argument("--compile-mode", default=d.compile_mode, help="static (a graph per token count) or auto")
    p.add_argument("--vae-dtype", default=d.vae_dtype, help="the decode the end-to-end totals use: fp32 or bf16")
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed calls per step (median)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed calls per step")
    p.add_argument("--frames", type=int, default=d.frames)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--max-seconds", type=float, default=d.max_seconds, help="skip stages that would end past this")
    p.add_argument("--tiny", action="store_true", help="toy-width model on CPU (smoke test)")
    p.add_argument("--out-json", help="default: docs/bench/<date>-e2e-<model>-<resolution>.json")
    p.add_argument("--docs", default="docs/benchmarks.md", help="Markdown file to append to, or 'none'")
    p.add_argument("--append-docs", metavar="JSON", help="only append the section of a finished run's JSON")
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    from engine.bench.report import append_docs, e2e_console, e2e_section

    if a.append_docs:
        try:
            report = json.loads(Path(a.append_docs).read_text())
        except (OSError, ValueError) as e:
            fail(f"cannot read {a.append_docs}: {e}", "bench_e2e")
        print(f"appended to {append_docs(report, a.docs, a.append_docs, section=e2e_section)}")
        return 0

    from engine.bench.e2e import Options, run
    from engine.bench.rows import BenchError

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M")
    out_json = a.out_json or f"docs/bench/{stamp}-e2e-{a.model}-{'tiny' if a.tiny else a.resolution}.json"
    given = {**vars(a), "out_json": out_json}
    given["command"] = shlex.join(["python", "launch/bench_e2e.py", *(sys.argv[1:] if argv is None else argv)])
    opts = Options(**{f.name: given[f.name] for f in dataclasses.fields(Options)})
    quiet_libraries()
    try:
        report = run(opts)
    except BenchError as e:
        fail(str(e), "bench_e2e")
    print("\n" + e2e_console(report))
    print(f"\nJSON: {out_json}")
    if a.docs.lower() != "none":
        print(f"Markdown: {append_docs(report, a.docs, out_json, section=e2e_section)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
