"""The benchmark's rows (paper Tables 1-3: Dense, the FIS presets, MagCache-Force, the ablations), how one row is
measured (warm-up, median of repeats, every failure kept as the row's status), and the run's time budget."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from engine.models import preset_family
from engine.runtime.presets import load_fis
from engine.runtime.timing import free_memory, median_steps, peak_gib
from fis import UNIT, FISConfig, FISConfigError

from .setup import Setup, attach, denoise, failure, fidelity


class BenchError(ValueError):
    """Bad benchmark input; the message is one line and lists the valid values."""


# ---- rows -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    name: str
    preset: str | None = None  # FIS preset (engine.runtime.presets), None = dense
    overrides: tuple = ()  # (field, value) pairs on top of the preset: the ablations
    magcache: bool = False
    ablation: bool = False

    def fis(self, family: str) -> FISConfig | None:
        if self.preset is None:
            return None
        return load_fis(self.preset, family).replace(name=self.name, **dict(self.overrides))


MAIN_ROWS = (
    Row("Dense"),
    Row("FIS-Balanced", "balanced"),
    Row("FIS-Fast", "fast"),
    Row("MagCache-Force", magcache=True),
    Row("FIS-Balanced+MagCache-Force", "balanced", magcache=True),
)
# Paper Table 2 (interleaved vs fixed anchors; s=3 and s=5 interleaved are FIS-Balanced / FIS-Fast) and Table 3.
ABLATION_ROWS = (
    Row("FIS-s3-fixed", "balanced", (("stride", 3), ("interleave", False)), ablation=True),
    Row("FIS-s4", "balanced", (("stride", 4),), ablation=True),
    Row("FIS-s4-fixed", "balanced", (("stride", 4), ("interleave", False)), ablation=True),
    Row("FIS-s5-fixed", "balanced", (("stride", 5), ("interleave", False)), ablation=True),
    Row("FIS-no-block-protection", "balanced", (("dense_head", 0), ("dense_tail", 0)), ablation=True),
    Row("FIS-no-step-protection", "balanced", (("dense_steps", 0),), ablation=True),
    Row("FIS-no-protection", "balanced", (("dense_head", 0), ("dense_tail", 0), ("dense_steps", 0)), ablation=True),
    Row("FIS-linear", "balanced", (("operator", "linear"),), ablation=True),
)
ROWS = {r.name: r for r in MAIN_ROWS + ABLATION_ROWS}


def parse_rows(spec: str, ablations: bool) -> list[Row]:
    """'all' = the Table 1 rows, 'none' = no rows (a sweep-only run); names are comma separated and
    case-insensitive; --ablations appends Tables 2-3. Always in table order: Dense first, the reference."""
    by_lower = {n.lower(): r for n, r in ROWS.items()}
    rows = list(ABLATION_ROWS) if ablations else []
    for name in (s.strip() for s in spec.split(",") if s.strip()):
        if name.lower() == "all":
            rows += MAIN_ROWS
        elif name.lower() in by_lower:
            rows.append(by_lower[name.lower()])
        elif name.lower() != "none":
            raise BenchError(f"unknown row {name!r}; valid: all, none, {', '.join(ROWS)}")
    order = {r.name: i for i, r in enumerate(MAIN_ROWS + ABLATION_ROWS)}
    return sorted(set(rows), key=lambda r: order[r.name])


def measure_row(s: Setup, row: Row, warmup: int, repeats: int, dense: dict | None) -> dict:
    """Warm-up, then `repeats` timed generations (median). Any failure becomes the row's status."""
    out = {"name": row.name, "ablation": row.ablation, "magcache": row.magcache, "status": "ok"}
    start, attached = time.perf_counter(), None
    try:
        fis = row.fis(s.family)
        out["fis"] = None if fis is None else fis.to_dict()
        free_memory(s.device)
        attached = attach(s, fis, row.magcache)
        for _ in range(warmup):
            denoise(s, attached.state)
        runs = [denoise(s, attached.state) for _ in range(repeats)]
        latents, _, skipped = runs[-1]
        out["peak_gib"] = peak_gib(s.device)
        totals = [sum(r[1]) for r in runs]
        out["latency_s"] = statistics.median(totals)
        out["latencies_s"] = totals
        out["step_s"] = median_steps([r[1] for r in runs])
        out["skipped_steps"] = skipped
        out["flops_P"] = s.flops(fis, skipped) / UNIT
        out["tflops"] = out["flops_P"] * UNIT / out["latency_s"] / 1e12
        out["finite"] = bool(torch.isfinite(latents).all())
        out["latent_rms"] = latents.float().pow(2).mean().sqrt().item()
        if not out["finite"]:
            out["status"] = "non-finite output"
        if row.name == "Dense":
            out["latents"] = latents  # the reference of every later row; dropped before JSON
        elif dense is not None:
            out["speedup"] = dense["latency_s"] / out["latency_s"]
            out.update(fidelity(latents, dense["latents"]))
            if out["peak_gib"] is not None:
                out["peak_vs_dense_pct"] = 100 * (out["peak_gib"] / dense["peak_gib"] - 1)
    except Exception as e:  # OOM or a broken row: report it, keep the others
        out["status"] = failure(e)
    finally:
        if attached is not None:
            attached.remove()
        out["wall_s"] = time.perf_counter() - start
        free_memory(s.device)
    return out


COMPILE_SHAPE_S = 45.0  # allowance per new token count under --compile (inductor, one block graph)


def estimate_row_s(s: Setup, row: Row, dense: dict | None, generations: int, new_shapes: int = 0) -> float:
    """Rough wall time of a row from the dense row: latency scales with FLOPs, with a floor for the dense step."""
    if dense is None:
        return 0.0
    ratio = s.flops(row.fis(s.family)) / s.flops()
    if row.magcache:
        ratio *= 1 - 1 / s.steps
    return generations * dense["latency_s"] * max(ratio, 0.3) + new_shapes * COMPILE_SHAPE_S + 5.0


class Budget:
    """Wall-clock guard: a stage that would end past `seconds` is skipped and says so."""

    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def refuse(self, estimate: float) -> str | None:
        e = self.elapsed()
        if e + estimate <= self.seconds:
            return None
        return f"skipped: time budget ({e:.0f} s + ~{estimate:.0f} s > {self.seconds:.0f} s)"


def check_rows(rows: list[Row], spec, latent_frames: int, steps: int) -> None:
    """Every row's FIS config must fit this model and request: fail before any GPU time is spent."""
    for row in rows:
        try:
            fis = row.fis(preset_family(spec.transformer))
            if fis is not None:
                fis.resolve(spec.transformer["num_layers"], latent_frames, steps)
        except FISConfigError as e:
            raise BenchError(f"row {row.name}: {e}") from None
