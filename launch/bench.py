"""GPU benchmark of FIS-DiT (paper Tables 1-3) on real-size Wan models with random weights.

python launch/bench.py --model wan2.2-a14b --resolution 480p --attention-sweep --ablations --profile
python launch/bench.py --tiny                      # CPU smoke run of everything, seconds
python launch/bench.py --append-docs RUN.json      # add a finished run to docs/benchmarks.md (+ docs/bench/)
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
    p = Parser(prog="bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="wan2.2-a14b", help="wan2.2-a14b, wan2.2-ti2v-5b or wan2.1-1.3b")
    p.add_argument("--resolution", default="480p", help="480p (832x480) or 720p (1280x720)")
    p.add_argument("--rows", default="all", help="'all' (Table 1), 'none' (sweep only) or row names, comma-separated")
    p.add_argument("--ablations", action="store_true", help="add the Table 2-3 ablation rows (after the others)")
    p.add_argument("--attention-backend", default="auto", help="diffusers backend name, or auto (fastest measured)")
    p.add_argument("--attention-sweep", action="store_true", help="time every backend + torch.compile on one block")
    p.add_argument("--sweep-compile", default="static", help="compile mode in the sweep: off, static, auto")
    p.add_argument("--compile", default="off", help="compile the blocks of the rows: off, static, auto")
    p.add_argument("--profile", action="store_true", help="torch.profiler over one sparse step (FIS glue share)")
    p.add_argument("--vae", action="store_true", help="also time VAE decode (random weights, real config)")
    p.add_argument("--repeats", type=int, default=3, help="timed generations per row (median)")
    p.add_argument("--ablation-repeats", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1, help="untimed generations per row")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=540, help="skip rows that would end past this wall time")
    p.add_argument("--tiny", action="store_true", help="toy-width model on CPU (smoke test)")
    p.add_argument("--out-json", help="default: docs/bench/<date>-<model>-<resolution>.json")
    p.add_argument("--docs", default="docs/benchmarks.md", help="Markdown file to append to, or 'none'")
    p.add_argument("--append-docs", metavar="JSON", help="only append the section of a finished run's JSON")
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    from engine.bench.report import append_docs, console_table

    if a.append_docs:
        try:
            report = json.loads(Path(a.append_docs).read_text())
        except (OSError, ValueError) as e:
            fail(f"cannot read {a.append_docs}: {e}", "bench")
        print(f"appended to {append_docs(report, a.docs, a.append_docs)}")
        return 0

    from engine.bench.run import BenchError, Options, run

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M")
    res = "tiny" if a.tiny else a.resolution
    out_json = a.out_json or f"docs/bench/{stamp}-{a.model}-{res}.json"
    given = {**vars(a), "out_json": out_json}
    given["command"] = shlex.join(["python", "launch/bench.py", *(sys.argv[1:] if argv is None else argv)])
    opts = Options(**{f.name: given[f.name] for f in dataclasses.fields(Options)})
    quiet_libraries()
    try:
        report = run(opts)
    except BenchError as e:
        fail(str(e), "bench")
    print("\n" + console_table(report))
    print(f"\nJSON: {out_json}")
    if a.docs.lower() != "none":
        print(f"Markdown: {append_docs(report, a.docs, out_json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
