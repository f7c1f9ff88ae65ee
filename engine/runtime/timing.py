"""Run metrics: device-synchronised timing, peak memory, GPU facts through pynvml."""

from __future__ import annotations

import resource
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
