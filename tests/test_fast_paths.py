"""The GPU fast paths on a CPU machine: FA3 (`--attention-backend fa3`), FP8 (`--quantize fp8`) and
`--attention-backend auto`.

What a CPU can check: a missing package or GPU is one clear line and exit 2, before the model loads and before any
file is written; the fa3 wiring (diffusers' `_flash_3_hub` backend on fa3-fwd's entry points) gives PyTorch's
attention on Wan and HunyuanVideo 1.5 blocks, with FIS, in one process (here) and under Ulysses
(tests/scenarios.py: `fa3_ulysses`), with tests/helpers.fake_fa3 standing in for the CUDA kernel; the FP8 stage runs
first in the attach order and converts the blocks' linears only. The speed is measured on the GPU
(launch/bench_e2e.py).
"""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import bare_transformer, fake_fa3, hunyuan_run, run_cli, tiny_hunyuan_transformer

import engine.hooks.attention_backend as ab
from engine.errors import UserError
from engine.hooks.quantize import check_quantize, fp8_missing, fp8_targets

SMALL = ["--height", "32", "--width", "32", "--frames", "9", "--steps", "1"]
NO_GPU = not torch.cuda.is_available()


@pytest.fixture
def fa3(monkeypatch):
    """fa3 available: the stand-in module, and no GPU requirement; diffusers' hub-kernel slot put back after."""
    from diffusers.models.attention_dispatch import _HUB_KERNELS_REGISTRY, AttentionBackendName

    config = _HUB_KERNELS_REGISTRY[AttentionBackendName._FLASH_3_HUB]
    saved = (config.kernel_fn, config.wrapped_forward_fn, config.wrapped_backward_fn)
    monkeypatch.setitem(sys.modules, ab.FA3_MODULE, fake_fa3())
    monkeypatch.setattr(ab, "fa3_missing", lambda device=None: [])
    monkeypatch.setattr(ab, "_enabled", False)
    yield
    config.kernel_fn, config.wrapped_forward_fn, config.wrapped_backward_fn = saved


# ---- FA3 ---------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not NO_GPU, reason="checks the CPU refusal")
def test_fa3_without_package_or_gpu_is_one_line(tiny_path, tmp_path):
    out = tmp_path / "v.mp4"
    r = run_cli(
        "generate.py",
        "--model",
        tiny_path("t2v"),
        "--prompt",
        "a cat",
        *SMALL,
        "--attention-backend",
        "fa3",
        "--output",
        out,
    )
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("generate: error: attention backend fa3 needs ") and "a CUDA GPU" in line, r.stderr
    if ab.importlib.util.find_spec(ab.FA3_MODULE) is None:
        assert "the fa3-fwd package (pip install 'fis-engine[fa3]')" in line
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not NO_GPU, reason="checks the CPU refusal")
def test_bench_fa3_on_cpu_is_one_line(tmp_path):
    r = run_cli("bench.py", "--tiny", "--attention-backend", "fa3", "--out-json", tmp_path / "b.json", "--docs", "none")
    assert r.returncode == 2 and "bench: error: attention backend fa3 needs " in r.stderr, r.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("family", ["wan", "hunyuan"])
def test_fa3_equals_pytorch_attention_with_fis(fa3, family):
    from engine.hooks.fis import apply_fis
    from engine.runtime.setup import prepare
    from fis import FISConfig

    if family == "wan":
        model = bare_transformer(heads=2)
        torch.manual_seed(1)
        x, text = torch.randn(1, 16, 5, 4, 4), torch.randn(1, 12, 32)

        def run():
            with torch.no_grad():
                return model(
                    hidden_states=x, timestep=torch.tensor([500]), encoder_hidden_states=text, return_dict=False
                )[0]
    else:
        model = tiny_hunyuan_transformer()

        def run():
            return hunyuan_run(model, (5, 4, 4), "padded")

    apply_fis(model, FISConfig(stride=2, dense_head=1, dense_tail=1)).begin(2)
    ref = run()  # PyTorch SDPA, FIS on
    from engine.hooks.fis import remove_fis

    remove_fis(model)
    # the Worker's order: backend, FIS, the family's speed-ups (HunyuanVideo: text padding dropped: fa3 takes no mask)
    attached = prepare(
        [model], attention_backend="fa3", fis=FISConfig(stride=2, dense_head=1, dense_tail=1), optimise=True
    )
    attached.state.begin(2)
    got = run()
    assert (got - ref).abs().max().item() < 1e-5
    procs = [getattr(m, "processor", None) for m in model.modules()]
    backends = {p._attention_backend.value for p in procs if getattr(p, "_attention_backend", None) is not None}
    assert backends == {"_flash_3_hub"}
    attached.remove()


def test_fa3_ulysses_equals_one_process(spawned):
    r = spawned(2, "fa3_ulysses")
    for name in ("wan", "hunyuan"):
        for mode in ("dense", "fis"):
            assert r[f"{name}_{mode}"] <= 1e-5 and r[f"{name}_backend_{mode}"] == 1.0, r


def test_backend_names():
    assert ab.backend_name("_native_cudnn") == "_native_cudnn"
    if ab.fa3_missing():
        with pytest.raises(UserError, match="attention backend fa3 needs"):
            ab.backend_name("fa3")


# ---- auto --------------------------------------------------------------------------------------------------
def test_auto_settings_on_cpu(tiny_path, tmp_path):
    """Every `auto` can be a default on any machine: on a CPU it is PyTorch SDPA, no FP8, an fp32 decode."""
    import json

    from engine.hooks.quantize import resolve_quantize
    from engine.runtime.attention import pick_backend

    assert pick_backend(40, 128, 1000, torch.device("cpu")) == (None, "auto on CPU: PyTorch SDPA")
    assert resolve_quantize("auto", torch.device("cpu")) == "off" and resolve_quantize("fp8") == "fp8"
    out = tmp_path / "v.mp4"
    auto = ["--attention-backend", "auto", "--quantize", "auto", "--vae-dtype", "auto"]
    r = run_cli("generate.py", "--model", tiny_path("t2v"), "--prompt", "a cat", *SMALL, *auto, "--output", out)
    assert r.returncode == 0, r.stderr
    m = json.loads(out.with_suffix(".metrics.json").read_text())
    assert m["worker"]["attention_backend"] is None and m["worker"]["attention_backend_choice"].startswith(
        "auto on CPU"
    )
    assert m["worker"]["quantize"] is None and m["decode"]["dtype"] == "fp32"


# ---- FP8 ---------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not NO_GPU, reason="checks the CPU refusal")
def test_fp8_on_cpu_is_one_line(tiny_path, tmp_path):
    out = tmp_path / "v.mp4"
    r = run_cli(
        "generate.py", "--model", tiny_path("t2v"), "--prompt", "a cat", *SMALL, "--quantize", "fp8", "--output", out
    )
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("generate: error: --quantize fp8 needs ") and "a CUDA GPU with FP8 tensor cores" in line
    if ab.importlib.util.find_spec("torchao") is None:
        assert "torchao (pip install 'fis-engine[fp8]')" in line
    assert not list(tmp_path.iterdir())
    bad = run_cli("generate.py", "--model", tiny_path("t2v"), "--prompt", "a cat", "--quantize", "int3")
    assert bad.returncode == 2 and "invalid choice: 'int3'" in bad.stderr


def test_fp8_checks(monkeypatch):
    import engine.hooks.quantize as q

    check_quantize("off")
    with pytest.raises(UserError, match="quantize must be one of off, fp8, auto"):
        check_quantize("fp4")
    assert fp8_missing(torch.device("cpu"))[-1] == "a CUDA GPU with FP8 tensor cores (none is in use)"
    monkeypatch.setattr(q, "fp8_missing", lambda device=None: [])
    with pytest.raises(UserError, match=r"quantises bf16 weights; the model is float32 \(--dtype bf16\)"):
        check_quantize("fp8", dtype=torch.float32)
    check_quantize("fp8", dtype=torch.bfloat16)


def test_fp8_targets_are_the_blocks_linears():
    wan = bare_transformer(heads=2)  # dim 32, ffn 64: every block linear fits _scaled_mm's multiples of 16
    names = fp8_targets(wan)
    per_block = {n.split(".", 2)[2] for n in names}
    assert per_block == {
        "attn1.to_q",
        "attn1.to_k",
        "attn1.to_v",
        "attn1.to_out.0",
        "attn2.to_q",
        "attn2.to_k",
        "attn2.to_v",
        "attn2.to_out.0",
        "ffn.net.0.proj",
        "ffn.net.2",
    }
    assert len(names) == 10 * len(wan.blocks) and all(n.startswith("blocks.") for n in names)
    kept = fp8_targets(wan, keep=(0, 3))
    assert not any(n.startswith(("blocks.0.", "blocks.3.")) for n in kept) and len(kept) == 10 * (len(wan.blocks) - 2)
    hy = tiny_hunyuan_transformer()
    assert all(n.startswith("transformer_blocks.") for n in fp8_targets(hy)) and fp8_targets(hy)


def test_quantisation_comes_first_in_the_attach_order(monkeypatch):
    """Stage 0: the blocks are not compiled and carry no hook yet when the weights are converted."""
    import engine.runtime.setup as setup
    from fis import FISConfig

    seen = {}

    def fake_quantize(transformers, mode, keep):
        b = transformers[0].blocks[0]
        seen.update(mode=mode, keep=keep, compiled="forward" in vars(b), hooked=hasattr(b, "_diffusers_hook"))
        return {"mode": mode, "layers": 0, "kept_blocks": list(keep)}

    monkeypatch.setattr(setup, "quantize_blocks", fake_quantize)
    model = bare_transformer(heads=2)
    attached = setup.prepare([model], quantize="fp8", compile="static", fis=FISConfig(stride=2))
    assert seen == {"mode": "fp8", "keep": (), "compiled": False, "hooked": False}
    assert attached.quantized["mode"] == "fp8" and "forward" in vars(model.blocks[0])
    attached.remove()


# ---- the FP8 quality gate (launch/eval_fp8.py) ---------------------------------------------------------------
@pytest.mark.skipif(not NO_GPU, reason="checks the CPU refusal")
def test_eval_fp8_on_cpu_is_one_line(tmp_path):
    r = run_cli("eval_fp8.py", "--out", tmp_path / "o")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("eval_fp8: error: --quantize fp8 needs ")
    assert not (tmp_path / "o").exists()


def test_eval_fp8_plumbing(monkeypatch, tmp_path):
    """With a stand-in quantiser that changes nothing, every variant equals bf16: the harness, its gate and its
    block sweep run end to end on the embedded model (one prompt)."""
    import json

    import engine.evaluation.quantized as quantized
    import engine.hooks.quantize as q
    import engine.runtime.setup as setup
    import engine.runtime.worker as worker

    calls = []

    def fake(transformers, mode, keep=()):
        calls.append(tuple(keep))
        return {"mode": mode, "layers": 0, "kept_blocks": list(keep)}

    monkeypatch.setattr(q, "fp8_missing", lambda device=None: [])
    monkeypatch.setattr(worker, "check_quantize", lambda *a, **k: None)
    monkeypatch.setattr(setup, "quantize_blocks", fake)
    monkeypatch.setattr(quantized, "quantize_blocks", fake)
    small = ["--frames", "9", "--height", "32", "--width", "32", "--steps", "2"]
    args = ["--prompts", "1", "--dtype", "fp32", *small, "--blocks", "0,9", "--out", tmp_path / "o"]
    r = run_cli("eval_fp8.py", *args)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "o" / "fp8.json").read_text())
    assert list(report["summary"]) == ["bf16", "fp8", "fp8-b0", "fp8-b9"]
    assert calls == [(), tuple(range(1, 10)), tuple(range(9))]  # fp8: every block; fp8-bN: block N alone
    assert report["gate"]["met"] and report["summary"]["fp8"]["psnr_mean"] == 100.0  # identical: capped
    assert "| fp8-b9 |" in (tmp_path / "o" / "fp8.md").read_text()
