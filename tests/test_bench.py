"""launch/bench.py: the whole benchmark end to end on the tiny CPU model, its table and JSON, and bad inputs."""

import json
import math

import pytest
from helpers import run_cli

from engine.bench.report import append_docs
from engine.bench.rows import ABLATION_ROWS, MAIN_ROWS, ROWS
from launch.bench import main


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    r = run_cli(
        "bench.py",
        "--tiny",
        "--ablations",
        "--profile",
        "--attention-sweep",
        "--sweep-compile",
        "off",
        "--vae",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--out-json",
        d / "run.json",
        "--docs",
        d / "benchmarks.md",
        timeout=240,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return d, r.stdout, json.loads((d / "run.json").read_text())


def test_every_row_runs_and_is_in_the_table(tiny_run):
    _, stdout, report = tiny_run
    names = [r["name"] for r in report["rows"]]
    assert names == [r.name for r in MAIN_ROWS + ABLATION_ROWS]  # Dense first, ablations last
    for r in report["rows"]:
        assert r["status"] == "ok", r
        assert r["finite"]
        assert r["name"] in stdout
    assert "Speedup" in stdout and "FLOPs (P)" in stdout


def test_flops_and_speedup_columns_are_consistent(tiny_run):
    _, _, report = tiny_run
    rows = {r["name"]: r for r in report["rows"]}
    dense = rows["Dense"]
    assert math.isclose(dense["flops_P"], report["flops_dense_P"])
    for name, r in rows.items():
        if name == "Dense":
            continue
        assert r["flops_P"] < dense["flops_P"], name  # every FIS or MagCache row computes less
        assert math.isclose(r["speedup"], dense["latency_s"] / r["latency_s"], rel_tol=1e-9), name
        assert math.isclose(r["tflops"], r["flops_P"] * 1e3 / r["latency_s"], rel_tol=1e-9), name
        assert 0 <= r["rel_l2"] < 1 and len(r["frame_err"]) == report["latent_frames"], name
    # MagCache-Force skips one step of four (the paper's 25 %), and never the final one
    assert rows["MagCache-Force"]["skipped_steps"] == [1]
    assert rows["FIS-Balanced+MagCache-Force"]["flops_P"] < rows["FIS-Balanced"]["flops_P"]
    assert rows["FIS-Fast"]["flops_P"] < rows["FIS-Balanced"]["flops_P"]
    assert rows["FIS-no-protection"]["flops_P"] < rows["FIS-no-step-protection"]["flops_P"]


def test_sweep_profile_and_vae_sections(tiny_run):
    _, _, report = tiny_run
    ok = [e for e in report["sweep"]["entries"] if e["status"] == "ok"]
    assert any(e["backend"] == "native" for e in ok)
    assert report["attention_backend"] in {e["backend"] for e in ok}
    assert report["profile"]["status"] == "ok" and 0 < report["profile"]["glue_pct"] < 100
    assert report["vae"]["status"] == "ok" and report["vae"]["decode_s"] > 0


def test_docs_are_appended_never_rewritten(tiny_run, tmp_path):
    d, _, report = tiny_run
    text = (d / "benchmarks.md").read_text()
    assert text.startswith("# Benchmarks") and "### Table 1" in text and "### Table 2" in text
    assert "| FIS-Balanced |" in text and report["command"] in text
    assert (d / "bench" / "run.json").exists()  # the run's JSON is copied next to the docs
    docs = tmp_path / "docs" / "benchmarks.md"
    append_docs(report, docs, d / "run.json")
    append_docs(report, docs, d / "run.json")
    text = docs.read_text()
    assert text.count("# Benchmarks\n") == 1 and text.count("### Table 1") == 2
    assert (tmp_path / "docs" / "bench" / "run.json").exists()


@pytest.mark.parametrize(
    "args, valid",
    [
        (["--model", "wan9"], "wan2.2-a14b, wan2.2-ti2v-5b, wan2.1-1.3b"),
        (["--resolution", "1080p"], "480p, 720p"),
        (["--rows", "Dense,Bogus"], ", ".join(ROWS)),
        (["--attention-backend", "fa9"], "_native_cudnn"),
        (["--compile", "max"], "off, static, auto"),
    ],
)
def test_bad_input_is_one_clear_line(args, valid, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--tiny", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bench: error: unknown") and "\n" not in err and valid in err
    assert "Traceback" not in err


def test_a_failing_row_reports_oom_and_leaves_the_models_clean(monkeypatch):
    import torch
    from diffusers.hooks import HookRegistry

    from engine.bench import rows as B
    from engine.bench.setup import build_setup
    from engine.hooks.fis import MODEL_HOOK
    from engine.models.random import MODELS, TINY_VIDEO

    s = build_setup(MODELS["wan2.2-a14b"].tiny(), torch.device("cpu"), *TINY_VIDEO, 4, 0)
    dense = B.measure_row(s, B.ROWS["Dense"], 0, 1, None)
    real = B.denoise

    def oom(setup, state):
        if state is not None:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(setup, state)

    monkeypatch.setattr(B, "denoise", oom)
    assert B.measure_row(s, B.ROWS["FIS-Balanced+MagCache-Force"], 0, 1, dense)["status"] == "OOM"
    for m in s.experts:  # the failed row's FIS and MagCache hooks are gone
        assert HookRegistry.check_if_exists_or_initialize(m).get_hook(MODEL_HOOK) is None and not m.is_cache_enabled
    monkeypatch.undo()
    assert B.measure_row(s, B.ROWS["FIS-Balanced"], 0, 1, dense)["status"] == "ok"
    again = B.measure_row(s, B.ROWS["Dense"], 0, 1, None)
    assert torch.equal(again["latents"], dense["latents"])  # removing the hooks restores the dense model exactly


def test_time_budget_skips_later_rows_and_sweep_only_runs(tmp_path):
    out = tmp_path / "budget.json"
    assert (
        main(
            [
                "--tiny",
                "--rows",
                "Dense,FIS-Fast",
                "--max-seconds",
                "0",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--out-json",
                str(out),
                "--docs",
                "none",
            ]
        )
        == 0
    )
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["status"] == "ok"  # the reference row always runs
    assert rows[1]["status"].startswith("skipped: time budget")
    assert (
        main(
            [
                "--tiny",
                "--rows",
                "none",
                "--attention-sweep",
                "--sweep-compile",
                "off",
                "--out-json",
                str(out),
                "--docs",
                "none",
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert report["rows"] == [] and report["sweep"]["entries"] and report["attention_backend"]
