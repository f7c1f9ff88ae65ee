"""Spawned gloo worlds for tests/scenarios.py: `run_world` runs a list of scenarios in one world of CPU processes
(forked from a forkserver that imported torch, diffusers and the engine once) and collects each one's metrics, or
every failing rank's traceback; `main` is one rank."""

from __future__ import annotations

import json
import os
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from scenarios import SCENARIOS


def _quiet():
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()


def main(rank: int, world: int, port: int, out_dir: str, names: list[str]) -> None:
    """One rank: every scenario in `names`, in order. Rank 0 appends each finished scenario's metrics to
    out_dir/results.jsonl; a rank whose scenario raised writes out_dir/rank<r>.error and exits."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    _quiet()
    # our own init, for the short timeout: a scenario that hangs fails the test instead of the run
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    out = Path(out_dir)
    for name in names:
        start = time.perf_counter()
        try:
            values = SCENARIOS[name]()
            for key, v in values.items():
                if isinstance(v, float):
                    t = torch.tensor([v], dtype=torch.float64)
                    dist.all_reduce(t, op=dist.ReduceOp.MAX)
                    values[key] = t.item()
        except Exception:  # noqa: BLE001 - reported by the test that reads this scenario
            (out / f"rank{rank}.error").write_text(f"{name}\n{traceback.format_exc()}")
            os._exit(1)  # the other ranks' collectives now fail at once; the driver reads the file
        if rank == 0:
            with open(out / "results.jsonl", "a") as f:
                f.write(json.dumps({"name": name, "values": values, "seconds": time.perf_counter() - start}) + "\n")
    from parallel import destroy_parallel

    destroy_parallel()


PRELOAD = [
    "world",
    "scenarios",
    "engine.runtime.worker",
    "engine.testbed.tiny_wan",
    "engine.testbed.tiny_hunyuan",
    "parallel",
    "diffusers",
    "transformers",
]


def run_world(world: int, names: list[str], out_dir: Path) -> dict:
    """{scenario: metrics} for `names` in spawned worlds of `world` gloo processes: one world for all of them, and a
    new one for the rest after a scenario fails (its entry is then {'error': every failing rank's traceback})."""
    import torch.multiprocessing as mp
    from helpers import free_port

    # forkserver: the ranks are forked from one server that imported torch, diffusers and the engine once, instead
    # of each rank importing them anew (~10 s of CPU per process, most of a world's start on the CI machine)
    mp.set_forkserver_preload(PRELOAD)
    results, todo, attempt = {}, list(names), 0
    while todo:
        run_dir = out_dir / f"run{attempt}"
        run_dir.mkdir(parents=True)
        try:
            mp.start_processes(main, (world, free_port(), str(run_dir), todo), nprocs=world, start_method="forkserver")
        except Exception:  # noqa: BLE001 - a rank exited: its .error file says why
            pass
        done = run_dir / "results.jsonl"
        for line in done.read_text().splitlines() if done.exists() else []:
            r = json.loads(line)
            results[r["name"]] = r["values"]
        left = [n for n in todo if n not in results]
        if not left:
            break
        failed = left[0]
        errors = [(e.stem, *e.read_text().split("\n", 1)) for e in sorted(run_dir.glob("rank*.error"))]
        mine = [(rank, tb) for rank, name, tb in errors if name == failed]
        # the rank whose own code raised comes first; the others only saw their peer's connection go away
        mine.sort(key=lambda e: ("Connection closed" in e[1] or "Connection reset" in e[1], e[0]))
        report = "\n".join(f"{rank}: {tb}" for rank, tb in mine)
        results[failed] = {"error": report or f"the world of {world} processes died in {failed}"}
        todo, attempt = left[1:], attempt + 1
    return results
