"""The `fis` console command (installed with the package): one command, the launch scripts as subcommands, with
exactly their flags.

    fis generate --prompt "a red circle moving right" --fis balanced --output out.mp4
    fis serve --config my-serve.toml serve.port=8080
    fis render prompts.jsonl --output-dir out/
    fis bench --tiny          fis profile run ...          fis eval --out eval/
    torchrun --nproc_per_node=2 -m launch.cli generate --ulysses 2 --prompt "..."   # several processes
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "generate": ("launch.generate", "one video (torchrun: over several processes)"),
    "serve": ("launch.serve", "the HTTP endpoint on Ray Serve"),
    "render": ("launch.render", "a JSONL manifest, one video per line"),
    "bench": ("launch.bench", "the GPU benchmark on real-size random-weight models"),
    "bench-e2e": ("launch.bench_e2e", "the whole video end to end, part by part, and cache-dit, in one process"),
    "profile": ("launch.profile_fis", "the paper's measurements on a model; calibrate a preset"),
    "eval": ("launch.eval", "fidelity of FIS against dense on the embedded model's grammar"),
    "eval-fp8": ("launch.eval_fp8", "FP8 against bf16 on trained weights: PSNR, adherence, block sensitivity"),
    "train": ("launch.train_shapes", "train the embedded model"),
    "sp-bench": ("launch.sp_bench", "the sequence-parallel benchmark (under torchrun)"),
    "bench-operators": ("launch.bench_operators", "every FIS operator on the real-size Wan 2.2 A14B block (GPU)"),
}


def usage() -> str:
    rows = "\n".join(f"  {name:<15} {help}" for name, (_, help) in COMMANDS.items())
    return f"usage: fis COMMAND [flags]   (fis COMMAND --help for its flags)\n\ncommands:\n{rows}\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fis: error: unknown command {name!r}; valid: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    rc = module.main(rest)  # some return their report: a script's exit status is 0 then
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
