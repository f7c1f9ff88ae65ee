"""launch/bench_e2e.py on the tiny CPU model: every part and every phase runs (FA3 through tests/helpers.fake_fa3, FP8
through a stand-in quantiser: the CPU has neither kernel), cache-dit included; the tables, the JSON and the refusals.
The speed itself is measured on the GPU (README: the commands)."""

from __future__ import annotations

import json
import sys

import pytest
from helpers import fake_fa3, run_cli

PHASES = "eager,fa3,fa3-compile,fp8-fa3-compile,cache-dit"  # compile and fp8 alone: the same code paths


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """One tiny run with every phase available: FA3 on the stand-in kernel, FP8 as a recording no-op."""
    from diffusers.models.attention_dispatch import _HUB_KERNELS_REGISTRY, AttentionBackendName

    import engine.bench.cachedit as cachedit
    import engine.bench.e2e as e2e_mod
    import engine.hooks.attention_backend as ab
    import engine.hooks.quantize as quantize
    import engine.runtime.setup as setup
    import engine.runtime.worker as worker

    mp = pytest.MonkeyPatch()
    config = _HUB_KERNELS_REGISTRY[AttentionBackendName._FLASH_3_HUB]
    saved = (config.kernel_fn, config.wrapped_forward_fn, config.wrapped_backward_fn)
    mp.setitem(sys.modules, ab.FA3_MODULE, fake_fa3())
    for module in (ab, e2e_mod, cachedit):
        mp.setattr(module, "fa3_missing", lambda device=None: [])
    mp.setattr(ab, "_enabled", False)
    for module in (quantize, e2e_mod):
        mp.setattr(module, "fp8_missing", lambda device=None: [])
    mp.setattr(worker, "check_quantize", lambda *a, **k: None)  # the tiny CPU model is fp32
    converted = []

    def fake_quantize(transformers, mode, keep):
        converted.append(len(transformers))
        return {"mode": mode, "layers": 0, "kept_blocks": list(keep)}

    mp.setattr(setup, "quantize_blocks", fake_quantize)
    d = tmp_path_factory.mktemp("e2e")
    args = ["--tiny", "--phases", PHASES, "--parts", "text,vae,vae-bf16,shards,mp4,qwen", "--out-json", d / "run.json"]
    whole = ["--whole", "fp8-fa3-compile=FIS-Balanced,cache-dit=Dense"]
    try:
        r = run_cli("bench_e2e.py", *args, *whole, "--docs", d / "benchmarks.md")
    finally:
        mp.undo()
        config.kernel_fn, config.wrapped_forward_fn, config.wrapped_backward_fn = saved
    assert r.returncode == 0, r.stderr[-3000:]
    return d, r.stdout, json.loads((d / "run.json").read_text()), converted


def test_every_phase_and_part_runs(e2e):
    _, stdout, report, converted = e2e
    assert [p["phase"] for p in report["phases"]] == PHASES.split(",")
    for ph in report["phases"]:
        assert ph["status"] == "ok", ph
        names = [r["name"] for r in ph["rows"]]
        assert names == (["Dense"] if ph["phase"] == "cache-dit" else ["Dense", "FIS-Balanced", "FIS-Fast"])
        for r in ph["rows"]:
            assert r["status"] == "ok" and r["denoise_s"] > 0 and r["timing"] == "per-step extrapolation"
            assert r["total_s"] > r["denoise_s"] and "speedup" in r and "vs_cache_dit_e2e" in r
    assert converted == [2]  # fp8-fa3-compile converted both A14B experts, before its compile
    backends = {p["phase"]: p["config"].get("attention_backend") for p in report["phases"]}
    assert backends["fa3"] == "fa3" and backends["eager"] is None
    parts = report["parts"]
    assert all(parts[k]["status"] == "ok" for k in ("text", "vae", "mp4", "qwen")), parts
    assert parts["vae"]["bf16_psnr_db"] > 40 and [x["ranks"] for x in parts["vae"]["shards"]] == [2, 4, 8]
    assert report["packages"]["cache-dit"] and "cache-dit" in stdout


def test_fis_rows_extrapolate_from_their_steps(e2e):
    _, _, report, _ = e2e
    for ph in report["phases"]:
        for r in ph["rows"]:
            dense_steps = report["steps"] - r["sparse_steps"]
            expect = r["sparse_steps"] * r.get("sparse_step_s", 0) + dense_steps * r["dense_step_s"]
            assert abs(r["denoise_s"] - expect) < 1e-12
            assert r["sparse_steps"] == (0 if r["name"] == "Dense" else 3)  # 4 steps, the last one dense


def test_whole_generations_and_the_doc_section(e2e):
    d, _, report, _ = e2e
    whole = {p["phase"]: p["whole"] for p in report["phases"] if p["whole"]}
    assert set(whole) == {"fp8-fa3-compile", "cache-dit"}
    ours, theirs = whole["fp8-fa3-compile"][0], whole["cache-dit"][0]
    for w in (ours, theirs):
        assert w["status"] == "ok" and len(w["step_s"]) == report["steps"]
        assert abs(w["total_s"] - (w["text_s"] + w["denoise_s"] + w["decode_s"] + w["mp4_s"])) < 1e-9
    assert ours["vs_cache_dit"] == theirs["total_s"] / ours["total_s"]
    md = (d / "benchmarks.md").read_text()
    for heading in (
        "end to end",
        "### Parts",
        "### DiT configurations (per-step extrapolation)",
        "### Whole generations (measured)",
        "### Phases",
        "Command: `python launch/bench_e2e.py --tiny",
    ):
        assert heading in md, heading
    assert (d / "bench" / "run.json").exists() or (d / "run.json").exists()


def test_refusals_are_one_line(tmp_path):
    for args, msg in (
        (["--phases", "eager,warp"], "unknown phase 'warp'; valid: eager, fa3"),
        (["--rows", "Dense,Turbo"], "unknown row 'Turbo'; valid: Dense, FIS-Balanced, FIS-Fast"),
        (["--whole", "fa3=Dense", "--phases", "eager"], "--whole names phase 'fa3', which --phases does not run"),
        (["--compile-mode", "off"], "--compile-mode must be static or auto"),
    ):
        r = run_cli("bench_e2e.py", "--tiny", *args, "--out-json", tmp_path / "x.json", "--docs", "none")
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(f"bench_e2e: error: {msg}"), r.stderr
        assert not (tmp_path / "x.json").exists()


def test_a_phase_this_machine_cannot_run_says_why(tmp_path):
    """No fa3-fwd, no GPU: the fa3 phase is skipped with the reason, the rest runs (here: eager alone)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the CPU refusal")
    out = tmp_path / "x.json"
    r = run_cli(
        "bench_e2e.py",
        "--tiny",
        "--phases",
        "eager=Dense,fa3",
        "--whole",
        "",
        "--parts",
        "",
        "--out-json",
        out,
        "--docs",
        "none",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    phases = {p["phase"]: p for p in json.loads(out.read_text())["phases"]}
    assert phases["eager"]["status"] == "ok" and phases["fa3"]["status"].startswith("skipped: needs ")
