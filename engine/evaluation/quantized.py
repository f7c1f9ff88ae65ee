"""FP8 against bf16 on a model with trained weights: video PSNR, prompt adherence, and each block's sensitivity.

Issue 14's gate: `--quantize fp8` becomes a default only if, on the embedded model run on the GPU, FP8 vs bf16 PSNR
is >= 35 dB with unchanged prompt adherence. Random weights cannot answer that (their errors say nothing about a
trained model's), so this runs the embedded model (engine/weights/shapes-wan, trained, 10 blocks) or any pipeline
folder with weights, over the grammar prompts whose colour and direction the harness reads back from the frames
(engine/testbed/shapes_data.py).

Variants, each against the bf16 video of the same prompt and seed:
  fp8        every block's linears in FP8 (what --quantize fp8 does, minus the family's fp8_keep blocks)
  fp8-bN     block N alone in FP8: its share of the error; the blocks whose share is large are the ones to keep in
             bf16 (engine/models/<family>.py FP8_KEEP for that size)
Each variant is a fresh Worker (quantisation is in place); eager, because compile changes the kernels, not the
rounding of the FP8 GEMMs. Numbers: `launch/eval_fp8.py`, report in docs/benchmarks.md.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from engine.hooks.quantize import quantize_blocks
from engine.runtime.io import to_uint8
from engine.runtime.request import GenerationRequest
from engine.runtime.worker import Worker, WorkerConfig, versions
from engine.testbed.shapes_data import parse_prompt

from .fidelity import PSNR_CAP, adhere
from .video_metrics import psnr

PSNR_GATE_DB = 35.0


def _videos(worker: Worker, base: GenerationRequest, prompts, seeds) -> list[np.ndarray]:
    return [
        to_uint8(worker.generate(dataclasses.replace(base, prompt=p, seed=s))["frames"]) for p in prompts for s in seeds
    ]


def evaluate(cfg: WorkerConfig, base: GenerationRequest, prompts, seeds, blocks=None, progress=None) -> dict:
    """{variant: {psnr per sample, adherence per sample}} for bf16 (the reference), fp8 and fp8-bN for N in `blocks`
    (None: every block)."""
    specs = [parse_prompt(p) for p in prompts for _ in seeds]

    def worker(quantize: str = "off") -> Worker:
        w = Worker(dataclasses.replace(cfg, quantize=quantize))
        w.pipe.set_progress_bar_config(disable=True)
        return w

    ref_worker = worker()
    base = ref_worker.validate(base)
    n = ref_worker.info.num_blocks
    ref = _videos(ref_worker, base, prompts, seeds)
    variants = {"bf16": ref}
    if progress:
        progress("bf16")
    del ref_worker
    variants["fp8"] = _videos(worker("fp8"), base, prompts, seeds)
    if progress:
        progress("fp8")
    for b in range(n) if blocks is None else [b for b in blocks if 0 <= b < n]:
        w = worker()
        quantize_blocks(w.transformers, "fp8", keep=[i for i in range(n) if i != b])  # block b alone in FP8
        variants[f"fp8-b{b}"] = _videos(w, base, prompts, seeds)
        if progress:
            progress(f"fp8-b{b}")
    out = {}
    for name, videos in variants.items():
        out[name] = {
            "psnr": [min(PSNR_CAP, psnr(v, r)) for v, r in zip(videos, ref)],
            "adherence": [adhere(v, spec)["adherence"] for v, spec in zip(videos, specs)],
        }
    return out


def summarise(samples: dict) -> dict:
    ref = samples["bf16"]["adherence"]
    out = {}
    for name, s in samples.items():
        judged = [a for a in s["adherence"] if a is not None]
        agree = [a["both"] == r["both"] for a, r in zip(s["adherence"], ref) if a is not None and r is not None]
        out[name] = {
            "psnr_mean": float(np.mean(s["psnr"])),
            "psnr_min": float(np.min(s["psnr"])),
            "adherence_both_pct": 100.0 * float(np.mean([a["both"] for a in judged])) if judged else None,
            "adherence_agreement_pct": 100.0 * float(np.mean(agree)) if agree else None,
        }
    return out


def gate(summary: dict) -> dict:
    """Issue 14: FP8 vs bf16 PSNR >= 35 dB and prompt adherence unchanged (every sample judged alike)."""
    fp8 = summary["fp8"]
    ok = fp8["psnr_mean"] >= PSNR_GATE_DB and fp8["adherence_agreement_pct"] in (None, 100.0)
    blocks = sorted(((k, v["psnr_mean"]) for k, v in summary.items() if k.startswith("fp8-b")), key=lambda kv: kv[1])
    return {
        "psnr_mean_db": fp8["psnr_mean"],
        "threshold_db": PSNR_GATE_DB,
        "adherence_agreement_pct": fp8["adherence_agreement_pct"],
        "met": bool(ok),
        "most_sensitive_blocks": [{"block": int(k[5:]), "psnr_mean": v} for k, v in blocks[:3]],
    }


def report(cfg: WorkerConfig, base: GenerationRequest, prompts, seeds, samples: dict, command: str, t0: float) -> dict:
    summary = summarise(samples)
    return {
        "kind": "fp8-quality",
        "command": command,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "elapsed_s": time.time() - t0,
        "versions": versions(),
        "model": cfg.model or "embedded",
        "request": {"steps": base.steps, "frames": base.num_frames, "height": base.height, "width": base.width},
        "prompts": prompts,
        "seeds": list(seeds),
        "summary": summary,
        "gate": gate(summary),
        "samples": samples,
    }


def _pct(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def markdown(r: dict) -> str:
    rows = [
        f"| {name} | {s['psnr_mean']:.2f} | {s['psnr_min']:.2f} | {_pct(s['adherence_both_pct'])} | "
        f"{_pct(s['adherence_agreement_pct'])} |"
        for name, s in r["summary"].items()
    ]
    g = r["gate"]
    return "\n".join(
        [
            f"## {r['date']} · FP8 vs bf16 quality · {r['model']}",
            "",
            f"- Command: `{r['command']}`; {len(r['prompts'])} prompts x {len(r['seeds'])} seeds; "
            f"{r['request']['frames']} frames {r['request']['width']}x{r['request']['height']}, {r['request']['steps']}"
            " steps; eager (FP8 rounding does not depend on compile); versions "
            + ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
            "",
            "| Variant | PSNR vs bf16 mean (dB) | min (dB) | Adherence (colour, direction) % | Same as bf16 % |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"- Gate (issue 14): FP8 mean PSNR {g['psnr_mean_db']:.2f} dB >= {g['threshold_db']:.0f} dB and adherence "
            f"unchanged ({g['adherence_agreement_pct']}%): {'met' if g['met'] else 'MISSED'}",
            "- Most sensitive blocks (block alone in FP8, lowest PSNR): "
            + ", ".join(f"{b['block']} ({b['psnr_mean']:.1f} dB)" for b in g["most_sensitive_blocks"]),
            "",
        ]
    )
