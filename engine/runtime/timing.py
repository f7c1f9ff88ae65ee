"""Timing and memory, one copy for the engine and its benchmarks: device-synchronised clocks, per-step CUDA-event
timers, medians of repeats, peak memory, GPU facts through pynvml."""

from __future__ import annotations

import resource
import statistics
import sys
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    """Host clock after the device finished its queued work."""
    sync(device)
    return time.perf_counter()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def gpu_info(device: torch.device) -> dict | None:
    """Name, memory and utilisation of the GPU, read through NVML (nvidia-ml-py)."""
    if device.type != "cuda":
        return None
    info = {"name": torch.cuda.get_device_name(device), "torch_cuda": torch.version.cuda}
    try:
        import pynvml

        pynvml.nvmlInit()
        # by UUID: NVML numbers GPUs physically and ignores CUDA_VISIBLE_DEVICES (Ray, torchrun ranks)
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        h = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else "GPU-" + uuid)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        util = pynvml.nvmlDeviceGetUtilizationRates(h)
        info.update(
            memory_used_gib=mem.used / 2**30,
            memory_total_gib=mem.total / 2**30,
            utilization_pct=util.gpu,
            driver=pynvml.nvmlSystemGetDriverVersion(),
        )
    except Exception as e:  # NVML missing in a container is not worth failing a render for
        info["nvml_error"] = str(e)
    return info


class StepTimer:
    """Device time between marks without a host sync between them (CUDA events; the host clock on CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def mark(self) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """Seconds between consecutive marks (one sync, here)."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def time_fn(fn, device: torch.device, warmup: int = 2, reps: int = 5) -> float:
    """Median device seconds of fn() over `reps` calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        timer = StepTimer(device)
        timer.mark()
        fn()
        timer.mark()
        times.append(timer.seconds()[0])
    return statistics.median(times)


def median_steps(runs: list[list[float]]) -> list[float]:
    """Per-step medians over repeated runs (each a list of step seconds)."""
    return [statistics.median(r[i] for r in runs) for i in range(len(runs[0]))]


def free_memory(device: torch.device) -> None:
    """Drop what a failed run's traceback still holds and start a fresh peak (between benchmark rows)."""
    if device.type == "cuda":
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """Peak GPU memory allocated by torch since the last reset, GiB; None off CUDA."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
