"""FP8 GEMMs (`--quantize fp8`): torchao float8, dynamic activation and weight, rowwise scales, on the linear layers
of the transformer blocks.

What is quantised. The blocks' linear layers (self- and cross-attention projections, FFN) carry almost all of a video
DiT's FLOPs; everything outside the blocks (patch embedding, time and text embedders, the output head) stays bf16, as
do the blocks a family lists as sensitive (`ModelFamily.fp8_keep`: measured, per real size) and any layer whose sides
are not multiples of 16 (`torch._scaled_mm`'s rule; torchao skips them too). Rowwise: one scale per token row of the
activation and per output row of the weight, computed on the fly, so no calibration and no weights file.

Why only with torch.compile. In eager mode torchao quantises each activation in a kernel of its own before the FP8
GEMM; measured on an H200 at 720p shapes (issue 14) that made QKV and FFN-down 6% slower than bf16 and only FFN-up
faster (1.38x). Under torch.compile inductor fuses the activation quantisation into the op before it (the norm and
modulation), which is where FP8 pays. `--quantize fp8` without `--compile` runs, but is not the fast path.

Where in the attach order (engine/runtime/setup.py): first, before the attention backend and compile. The weights
must be final before torch.compile traces the blocks (the graph is built around FP8 tensors), and LoRAs are fused
before it (engine/runtime/loader.py, at load). FIS and parallelism never look at weights, so they compose unchanged.
Quantisation replaces the weights in place and is not undone by `Prepared.remove()`.

What it needs: torchao (pip install 'fis-engine[fp8]') and a GPU with FP8 tensor cores (compute capability >= 8.9:
Ada, Hopper, Blackwell), and bf16 weights (torchao's rowwise FP8 quantises from bf16). Anything missing is one line
before the model loads.
"""

from __future__ import annotations

import importlib.util

import torch

from engine.errors import UserError
from engine.models import adapter_for

MODES = ("off", "fp8", "auto")  # auto: fp8 where it can run (torchao, an FP8 GPU, bf16 weights), else off


def fp8_missing(device: torch.device | None = None) -> list[str]:
    """What `--quantize fp8` lacks here ([] = it can run): torchao, a CUDA GPU, FP8 tensor cores."""
    missing = []
    if importlib.util.find_spec("torchao") is None:
        missing.append("torchao (pip install 'fis-engine[fp8]')")
    if (device is not None and device.type != "cuda") or not torch.cuda.is_available():
        missing.append("a CUDA GPU with FP8 tensor cores (none is in use)")
    else:
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            missing.append(f"a GPU with FP8 tensor cores, compute capability >= 8.9 (this one is {cap[0]}.{cap[1]})")
    return missing


def check_quantize(mode: str, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
    """One line naming what `mode` lacks, before any model loads."""
    if mode not in MODES:
        raise UserError(f"quantize must be one of {', '.join(MODES)}, got {mode!r}", "quantize")
    if mode in ("off", "auto"):
        return
    missing = fp8_missing(device)
    if missing:
        raise UserError(f"--quantize fp8 needs {' and '.join(missing)}", "quantize")
    if dtype is not None and dtype != torch.bfloat16:
        raise UserError(
            f"--quantize fp8 quantises bf16 weights; the model is {str(dtype).split('.')[-1]} (--dtype bf16)"
        )


def resolve_quantize(mode: str, device: torch.device | None = None, dtype: torch.dtype | None = None) -> str:
    """'auto' -> 'fp8' where it can run here, else 'off' (so it can be a default on every machine); others as given."""
    if mode != "auto":
        return mode
    return "fp8" if not fp8_missing(device) and dtype in (None, torch.bfloat16) else "off"


def _fits(module) -> bool:
    return isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0


def fp8_targets(transformer, keep=()) -> list[str]:
    """Module names of the linear layers `--quantize fp8` converts: in the blocks, outside the blocks in `keep`."""
    attr = adapter_for(transformer).blocks_attr
    return [
        f"{attr}.{i}.{name}"
        for i, block in enumerate(getattr(transformer, attr))
        if i not in set(keep)
        for name, m in block.named_modules()
        if _fits(m)
    ]


def quantize_blocks(transformers, mode: str = "fp8", keep=()) -> dict:
    """Convert the blocks' linear layers of every transformer (both Wan 2.2 experts) in place. Returns what was done:
    {'mode', 'layers': count, 'kept_blocks': [...]} (mode 'off': nothing)."""
    if mode == "off":
        return {"mode": "off", "layers": 0, "kept_blocks": []}
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    # set_inductor_config=False: torchao would otherwise change inductor's process-wide settings (coordinate-descent
    # tuning: minutes more per compiled token count) for every model in the process, not only this one
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    layers = 0
    for t in transformers:
        if getattr(t, "_fis_quantized", None) == mode:  # weights already converted (a second Worker on one model)
            continue
        targets = set(fp8_targets(t, keep))
        layers += len(targets)
        quantize_(t, config, filter_fn=lambda m, name, targets=targets: name in targets)
        t._fis_quantized = mode
    return {"mode": mode, "layers": layers, "kept_blocks": sorted(set(keep))}
