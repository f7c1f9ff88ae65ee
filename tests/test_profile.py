"""The paper's measurements (Eq. 1-6), the profiler CLI and calibration, on tiny models."""

import json

import pytest
import torch

from fis import FISConfig, anchor_frames
from fis.analysis import calibrate, coefficient_of_variation, magnitude_map, per_frame_error, relative_change

ARGS = ["--frames", "17", "--height", "32", "--width", "32", "--steps", "2"]


def test_eq1_to_eq3_by_hand():
    # 1 batch, 3 frames, 2 tokens per frame, 2 channels: token norms are 5, 0 | 5, 5 | 10, 0
    x = torch.tensor([[[3.0, 4.0], [0.0, 0.0], [3.0, 4.0], [4.0, 3.0], [6.0, 8.0], [0.0, 0.0]]])
    m = magnitude_map(x, 3)
    assert m.tolist() == [[[5.0, 0.0], [5.0, 5.0], [10.0, 0.0]]]
    r = relative_change(m)[0]
    # ||(0, 5)|| / ||(5, 0)|| = 1 ; ||(5, -5)|| / ||(5, 5)|| = 1
    assert r.tolist() == pytest.approx([1.0, 1.0])
    m2 = torch.tensor([[1.0, 0.0], [2.0, 0.0], [2.0, 0.0]])
    assert relative_change(m2).tolist() == pytest.approx([1.0, 0.0])


def test_eq4_eq5_by_hand():
    r = torch.tensor([[1.0, 3.0], [2.0, 2.0]])  # two prompts' curves
    cv = coefficient_of_variation(r)
    assert cv.tolist() == pytest.approx([0.5, 0.0])  # std 1 / mean 2; flat curve -> 0
    assert cv.mean().item() == pytest.approx(0.25)  # Eq. 5: mean over prompts


def test_eq6_by_hand():
    full = torch.ones(1, 4, 2)  # 2 frames x 2 tokens
    sparse = full.clone()
    sparse[0, 2:] *= 1.5  # frame 1 off by 50 %
    assert per_frame_error(sparse, full, 2).tolist() == pytest.approx([0.0, 0.5])


def test_calibrate_respects_budget():
    err = [0.5, 0.05, 0.2, 0.04, 0.01, 0.03, 0.9]
    cfg = calibrate(err, 0.06, FISConfig(stride=3))
    assert cfg.blocks == (1, 3, 4, 5) and (cfg.dense_head, cfg.dense_tail) == (1, 1)
    assert all(err[b] <= 0.06 for b in cfg.blocks)
    cfg.resolve(7, 9, 4)  # a valid config for this model
    with pytest.raises(ValueError, match="no block meets"):
        calibrate(err, 0.001, FISConfig(stride=3))


@pytest.fixture(scope="module")
def profile_dir(tiny_path, tmp_path_factory):
    from launch.profile_fis import main

    out = tmp_path_factory.mktemp("prof") / "p"
    assert (
        main(
            [
                "run",
                "--model",
                str(tiny_path("t2v")),
                "--prompt",
                "a red circle moving right",
                "--prompt",
                "a blue square moving up",
                "--stride",
                "2",
                *ARGS,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


def test_profile_writes_numbers_plots_and_report(profile_dir):
    from PIL import Image

    prof = json.loads((profile_dir / "profile.json").read_text())
    P, T, L, F = 2, 2, 6, 5
    assert torch.tensor(prof["curves"]).shape == (P, T, L, F - 1)
    assert torch.tensor(prof["cv"]).shape == (T, L)
    for key in ("frame_error", "interp_error"):
        assert torch.tensor(prof[key]["residual"]).shape == (P, T, L, F)
    for name in ("fig1_relative_change.png", "fig2_cv_heatmap.png", "fig3_frame_error.png"):
        data = (profile_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        Image.open(profile_dir / name).verify()
    assert "fig2_cv_heatmap.png" in (profile_dir / "report.md").read_text()


def test_eq6_is_zero_on_anchor_frames_and_not_elsewhere(profile_dir):
    prof = json.loads((profile_dir / "profile.json").read_text())
    err = torch.tensor(prof["interp_error"]["linear"])  # [P, T, L, F]
    for b in range(6):
        anchors = anchor_frames(5, 2, b % 2)
        skipped = [f for f in range(5) if f not in anchors]
        assert err[:, :, b, list(anchors)].abs().max() == 0
        assert (err[:, :, b, skipped] > 0).all()


def test_calibrated_toml_loads_and_runs(profile_dir, tiny_path, tmp_path, capsys):
    from engine.evaluation.probe import block_error
    from launch.generate import main as generate
    from launch.profile_fis import main

    prof = json.loads((profile_dir / "profile.json").read_text())
    budget = sorted(block_error(prof, "residual", 1)[1:-1])[2]  # admits some middle blocks, not all
    toml = tmp_path / "cal.toml"
    assert main(["calibrate", "--profile", str(profile_dir), "--budget", str(budget), "--out", str(toml)]) == 0
    cfg = FISConfig.from_toml(toml)
    errs = block_error(prof, "residual", 1)
    assert cfg.blocks and all(errs[b] <= budget for b in cfg.blocks)
    assert "predicted FLOPs" in capsys.readouterr().out
    out = tmp_path / "v.mp4"
    assert (
        generate(
            ["--model", str(tiny_path("t2v")), "--prompt", "a cat", *ARGS, "--fis", str(toml), "--output", str(out)]
        )
        == 0
    )
    assert json.loads(out.with_suffix(".metrics.json").read_text())["fis"]["sparse_blocks"] == list(cfg.blocks)


@pytest.mark.parametrize(
    "args, msg",
    [
        (["run", "--prompt", "a", "--out", "OUT"], "required: --stride"),
        (["run", "--stride", "2", "--out", "OUT"], "prompt set is empty"),
        (["run", "--stride", "2", "--prompt", "  ", "--out", "OUT"], "prompt set is empty"),
        (["run", "--stride", "2", "--prompts", "/nonexistent.txt", "--out", "OUT"], "does not exist"),
        (["run", "--stride", "1", "--prompt", "a", "--out", "OUT"], "--stride must be >= 2"),
        (["run", "--stride", "2", "--prompt", "a", "--out", "FULL"], "not empty (use --overwrite)"),
        (["run", "--stride", "2", "--prompt", "a", "--model", "OTHER", "--out", "OUT"], "is not supported"),
        (["calibrate", "--profile", "/nonexistent", "--budget", "0.1", "--out", "x.toml"], "no profile"),
    ],
)
def test_bad_input(args, msg, tmp_path, capsys, other_pipeline):
    from launch.profile_fis import main

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    sub = {"OUT": str(tmp_path / "out"), "FULL": str(tmp_path / "full"), "OTHER": str(other_pipeline)}
    with pytest.raises(SystemExit) as e:
        main([sub.get(a, a) for a in args] + (ARGS if args[0] == "run" else []))
    assert e.value.code == 2
    assert msg in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def other_pipeline(tmp_path_factory):
    """A diffusers pipeline of a model FIS does not know (a tiny DDPM UNet)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    path = tmp_path_factory.mktemp("ddpm")
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 8),
        norm_num_groups=4,
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
    )
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(path)
    return path


@pytest.mark.slow
def test_profile_under_sequence_parallelism_matches_one_process(tiny_path, tmp_path):
    """torchrun, 2 gloo ranks, spatial shards: the shard sums give the one-process Eq. 3 and Eq. 6 numbers."""
    from helpers import run_cli

    args = ["run", "--model", str(tiny_path("t2v")), "--prompt", "a red circle moving right", "--stride", "2", *ARGS]
    r = run_cli("profile_fis.py", *args, "--ulysses", "2", "--out", tmp_path / "sp", nproc=2)
    assert r.returncode == 0, r.stderr[-2000:]
    r1 = run_cli("profile_fis.py", *args, "--out", tmp_path / "one")
    assert r1.returncode == 0, r1.stderr[-2000:]
    sp, one = (json.loads((tmp_path / d / "profile.json").read_text()) for d in ("sp", "one"))
    assert sp["model"]["world_size"] == 2
    for key in ("curves", "cv"):
        torch.testing.assert_close(torch.tensor(sp[key]), torch.tensor(one[key]), rtol=1e-3, atol=1e-5)
    for key in ("frame_error", "interp_error"):
        for op in ("linear", "residual"):
            torch.testing.assert_close(torch.tensor(sp[key][op]), torch.tensor(one[key][op]), rtol=1e-3, atol=1e-5)
