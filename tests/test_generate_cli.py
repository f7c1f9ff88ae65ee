"""launch/generate.py end to end: a saved pipeline loads offline and makes an mp4; bad input -> exit 2."""

import json

import pytest
from helpers import run_cli

SMALL = ["--height", "32", "--width", "32", "--frames", "17", "--steps", "2"]


@pytest.fixture(scope="module")
def model(tiny_path):
    return tiny_path("t2v")


def test_saved_pipeline_generates_an_mp4(model, tmp_path):
    out = tmp_path / "v.mp4"
    r = run_cli(
        "generate.py",
        "--model",
        model,
        "--prompt",
        "a red circle moving right",
        "--fis",
        "balanced",
        *SMALL,
        "--output",
        out,
        "--save-latents",
    )
    assert r.returncode == 0, r.stderr
    from engine.runtime.io import read_mp4

    frames = read_mp4(out)
    assert frames.shape == (17, 32, 32, 3)
    m = json.loads(out.with_suffix(".metrics.json").read_text())
    assert m["request"]["fis"]["stride"] == 3 and m["flops_P"] < m["flops_dense_P"]
    assert len(m["step_s"]) == 2 and m["latency_s"] > 0
    assert out.with_suffix(".latents.safetensors").exists()
    assert "latency" in r.stdout and "speedup est." in r.stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_default_model_and_overrides(tmp_path):
    """No --model: the embedded (shipped) model; --fis-* overrides apply on top of the preset."""
    out = tmp_path / "d.mp4"
    r = run_cli(
        "generate.py",
        "--prompt",
        "a blue square moving up",
        *SMALL,
        "--fis-stride",
        "2",
        "--fis-operator",
        "linear",
        "--fis-dense-steps",
        "0",
        "--output",
        out,
    )
    assert r.returncode == 0, r.stderr
    fis = json.loads(out.with_suffix(".metrics.json").read_text())["fis"]
    assert (fis["stride"], fis["operator"], fis["dense_steps"]) == (2, "linear", 0)
    assert fis["sparse_steps"] == [0, 1]


BAD = [
    (["--frames", "18"], "4k+1"),
    (["--height", "40"], "multiple of 16"),
    (["--width", "0"], "width must be between"),
    (["--fis", "balanced", "--fis-stride", "0"], "stride must be >= 1"),
    (["--fis", "balanced", "--fis-stride", "5"], "smaller than the number of latent frames"),
    (["--fis", "balanced", "--fis-blocks", "0-3"], "protected head/tail"),
    (["--fis", "balanced", "--fis-blocks", "2-9"], "out of range"),
    (["--fis", "balanced", "--fis-dense-steps", "3"], "exceeds the number of steps"),
    (["--fis", "turbo"], "unknown FIS preset"),
    (["--fis", "balanced", "--fis-operator", "cubic"], "operator must be one of"),
    (["--fis", "/nonexistent/preset.toml"], "not found"),
    (["--model", "/nonexistent/model"], "does not exist"),
    (["--model", "TMPDIR"], "not a diffusers pipeline"),
    (["--output", "/nonexistent/dir/x.mp4"], "does not exist"),
    (["--output", "OUT.gif"], "must end in .mp4"),
    (["--prompt", "   "], "prompt must be a non-empty"),
    (["--steps", "abc"], "invalid int value"),
    (["--resolution", "4k"], "invalid choice"),
]


@pytest.mark.parametrize("args, msg", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_one_clear_line(model, tmp_path, args, msg, capsys):
    """In-process (the CLI's own main) to keep the suite fast; the subprocess path is covered below."""
    from launch.generate import main

    args = [str(tmp_path) if a == "TMPDIR" else str(tmp_path / a) if a.startswith("OUT") else a for a in args]
    base = ["--model", str(model), "--prompt", "a cat", *SMALL, "--output", str(tmp_path / "x.mp4")]
    with pytest.raises(SystemExit) as e:
        main([*base, *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("generate: error:") and msg in err[-1], err
    assert not any(p.suffix in (".mp4", ".json", ".gif") for p in tmp_path.iterdir())  # nothing written


@pytest.mark.slow
def test_bad_input_through_a_real_process(model, tmp_path):
    r = run_cli(
        "generate.py",
        "--model",
        model,
        "--prompt",
        "a cat",
        *SMALL,
        "--frames",
        "18",
        "--output",
        tmp_path / "x.mp4",
        real=True,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert (
        r.stderr.strip().splitlines()[-1]
        == "generate: error: num_frames must be of the form 4k+1 (e.g. 17 or 21), got 18"
    )
    assert not list(tmp_path.iterdir())


def _torchrun(n, *args):
    return run_cli("generate.py", *args, nproc=n)


@pytest.mark.slow
@pytest.mark.parametrize("shard", ["spatial", "frame"])
def test_torchrun_two_processes_match_one(model, tmp_path, shard):
    """torchrun --nproc_per_node=2 on gloo: rank 0 writes the video; latents equal the one-process run."""
    from safetensors.torch import load_file

    args = ["--model", model, "--prompt", "a red circle moving right", *SMALL, "--fis", "balanced", "--save-latents"]
    r = _torchrun(2, *args, "--ulysses", "2", "--shard", shard, "--output", tmp_path / "sp.mp4")
    assert r.returncode == 0, r.stderr[-2000:]
    r1 = run_cli("generate.py", *args, "--output", tmp_path / "one.mp4")
    assert r1.returncode == 0, r1.stderr
    sp = load_file(tmp_path / "sp.latents.safetensors")["latents"]
    one = load_file(tmp_path / "one.latents.safetensors")["latents"]
    assert ((sp - one).norm() / one.norm()).item() < 1e-5
    assert json.loads((tmp_path / "sp.metrics.json").read_text())["worker"]["world_size"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [
            "sp.mp4",
            "sp.metrics.json",
            "sp.latents.safetensors",
            "one.mp4",
            "one.metrics.json",
            "one.latents.safetensors",
        ]
    )


@pytest.mark.slow
def test_cfg_parallel_without_guidance_says_so(model, tmp_path):
    """--cfg-parallel 2 at guidance 1 works (both groups compute the one branch) and the summary says it was
    wasted; at guidance 4 it is silent."""
    args = ["--model", model, "--prompt", "a red circle", *SMALL, "--cfg-parallel", "2"]
    for guidance, noted in (("1", True), ("4", False)):
        r = _torchrun(2, *args, "--guidance", guidance, "--output", tmp_path / f"g{guidance}.mp4")
        assert r.returncode == 0, r.stderr[-2000:]
        notes = json.loads((tmp_path / f"g{guidance}.metrics.json").read_text()).get("notes", [])
        assert bool(notes) == noted and ("both CFG rank groups computed the same prediction" in r.stdout) == noted


@pytest.mark.slow
def test_torchrun_bad_degrees_fail_before_work(model, tmp_path):
    r = _torchrun(2, "--model", model, "--prompt", "a cat", *SMALL, "--ulysses", "3", "--output", tmp_path / "x.mp4")
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if "generate: error" in ln]
    assert len(lines) == 1 and "must equal the number of processes (2)" in lines[0], r.stderr[-2000:]
    assert not list(tmp_path.iterdir())


def test_unknown_random_model_is_a_clear_error(tmp_path, capsys):
    from launch.generate import main

    with pytest.raises(SystemExit):
        main(["--model", "random:wan9", "--prompt", "a cat", "--output", str(tmp_path / "x.mp4")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "unknown random model 'wan9'" in err and "random:wan2.2-a14b" in err


def test_a_user_error_of_one_rank_alone_is_said_by_that_rank(monkeypatch, capsys):
    """Under torchrun a rank other than 0 leaves rank 0 time to report a shared error (torchrun stops it when rank 0
    exits); an error of its own it then reports itself, naming the rank."""
    from launch import common

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setattr(common, "FAIL_GRACE_S", 0.01)
    for rank, line in (("0", "generate: error: bad"), ("1", "generate: error (rank 1): bad")):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as e:
            common.fail("bad")
        assert e.value.code == 2 and capsys.readouterr().err.strip() == line
