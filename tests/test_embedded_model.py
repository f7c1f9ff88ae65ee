"""The embedded model: shipped weights that load offline and make videos that obey their prompt."""

import json

import numpy as np
import pytest
import torch
from helpers import run_cli

from engine.evaluation.video_metrics import psnr
from engine.models.patch_vae import PatchVAE
from engine.testbed import shapes_data as shapes


@pytest.fixture(scope="module")
def worker():
    from engine.runtime.worker import Worker, WorkerConfig

    return Worker(WorkerConfig(model=None))


def _video(worker, prompt, fis=None, seed=0):
    from engine.runtime.request import GenerationRequest

    out = worker.generate(GenerationRequest(prompt=prompt, seed=seed, fis=fis))
    return (np.clip(out["frames"], 0, 1) * 255).round().astype(np.uint8)  # [F, H, W, 3]


def test_shipped_model_loads_offline_with_its_own_defaults(worker):
    from engine.runtime.loader import EMBEDDED

    assert (EMBEDDED / "model_index.json").is_file()
    size = sum(f.stat().st_size for f in EMBEDDED.rglob("*") if f.is_file())
    assert size <= 30 * 2**20, size  # the limit for a committed checkpoint
    assert worker.info.default_size == (64, 64) and worker.info.default_frames == 49
    assert worker.info.latent_frames(49) == 13  # enough latent frames for frame sparsity


@pytest.mark.parametrize(
    "spec",
    [
        shapes.Spec("red", "circle", "right", "quickly", "dark"),
        shapes.Spec("blue", "square", "left", "quickly", "light"),
        shapes.Spec("white", "circle", "up", "quickly", "dark"),
    ],
)
def test_generated_video_obeys_its_prompt(worker, spec):
    video = _video(worker, spec.prompt())
    assert video.shape == (49, 64, 64, 3)
    res = shapes.adherence(video, spec)
    assert res["colour"] and res["direction"], res


def test_fis_balanced_keeps_the_prompt_on_trained_weights(worker):
    """FIS runs sparse blocks on the shipped weights and the video still obeys its prompt. Its distance to the
    dense video is the eval's job (docs/eval: on this small model the sample drifts, about 18 dB)."""
    from engine.runtime.presets import load_fis

    spec = shapes.Spec("red", "circle", "right", "quickly", "dark")
    dense = _video(worker, spec.prompt())
    fis = _video(worker, spec.prompt(), load_fis("balanced", worker.info.family))
    assert not np.array_equal(dense, fis)  # FIS did run sparse blocks
    res = shapes.adherence(fis, spec)
    assert res["colour"] and res["direction"], res
    assert psnr(fis, dense) > 20.8 - 1.0  # measured 20.80 dB on this prompt (2-core CPU); ~1 dB of margin


# FIS vs dense on two eval prompts, seed 0, measured on the shipped weights (2-core CPU, fp32): a quality
# regression of ~1 dB fails. Update with the model (docs/eval holds the full 24-prompt x 2-seed eval).
GOLDEN = {
    ("a red circle moving right quickly on a dark background", "FIS-Balanced"): 20.80,
    ("a red circle moving right quickly on a dark background", "FIS-first-step"): 28.68,
    ("a green square moving left quickly on a light background", "FIS-Balanced"): 17.83,
    ("a green square moving left quickly on a light background", "FIS-first-step"): 25.42,
}


_DENSE = {}


@pytest.mark.slow
@pytest.mark.parametrize("prompt, config", sorted(GOLDEN), ids=lambda v: v.split(" on ")[0].replace(" ", "-"))
def test_fidelity_does_not_regress(worker, prompt, config):
    from engine.evaluation.fidelity import CONFIGS

    row = {r.name: r for r in CONFIGS}[config]
    dense = _DENSE.get(prompt)
    if dense is None:
        dense = _DENSE[prompt] = _video(worker, prompt)
    got = psnr(_video(worker, prompt, row.fis(worker.info.family)), dense)
    assert got >= GOLDEN[prompt, config] - 1.0, f"{config}: {got:.2f} dB, measured {GOLDEN[prompt, config]:.2f} dB"


def test_patch_vae_is_an_exact_inverse_with_a_full_basis_and_close_with_the_shipped_one():
    full = PatchVAE(z_dim=192)  # identity basis over all 3x4x4x4 patch values: encode/decode must be exact
    x = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    z = full.encode(x).latent_dist.mode()
    assert z.shape == (1, 192, 3, 4, 4)
    assert torch.allclose(full.decode(z).sample, x, atol=1e-6)
    from engine.runtime.loader import EMBEDDED

    vae = PatchVAE.from_pretrained(EMBEDDED / "vae")
    clip = shapes.render(
        shapes.Spec("purple", "square", "right", "slowly", "textured"), 49, 64, np.random.default_rng(7), spread=0.3
    )
    x = torch.from_numpy(clip).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
    assert 10 * torch.log10(4 / ((rec - x) ** 2).mean()) > 30  # dB


@pytest.mark.slow
def test_training_script_runs_and_its_output_loads(tmp_path):
    out = tmp_path / "m"
    r = run_cli("train_shapes.py", "--out", out, "--smoke", "--workers", "1", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "training.json").read_text())
    assert report["config"]["done"]["dit_steps"] == 3 and report["pca_variance_kept"] > 0.5
    from engine.runtime.loader import load_pipeline

    pipe = load_pipeline(str(out), torch.device("cpu"), torch.float32)
    assert type(pipe.vae).__name__ == "PatchVAE"


def test_v2_training_runs_in_two_stages_teacher_then_student(tmp_path):
    """The v2 testbed's GPU run is two commands (each under a device command's limit): a guided teacher, then its
    unguided 4-step student distilled from the saved folder; both load, and the student says how it was made."""
    args = ["--preset", "v2", "--smoke", "--workers", "1", "--device", "cpu"]
    r = run_cli("train_shapes.py", "--stage", "teacher", "--out", tmp_path / "t", "--set", "spread=0.5", *args)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("train_shapes.py", "--stage", "student", "--teacher", tmp_path / "t", "--out", tmp_path / "s", *args)
    assert r.returncode == 0, r.stderr[-2000:]
    teacher, student = (json.loads((tmp_path / d / "training.json").read_text()) for d in ("t", "s"))
    assert teacher["config"]["done"] == {"dit_steps": 3} and teacher["config"]["layers"] == 2  # smoke size
    assert (teacher["config"]["camera"], teacher["config"]["texture"], teacher["config"]["spread"]) == (
        0.25,
        "smooth",
        0.5,
    )
    assert student["config"]["done"] == {"distill_steps": 3} and student["teacher"] == teacher
    defaults = [json.loads((tmp_path / d / "engine_defaults.json").read_text())["guidance"] for d in ("t", "s")]
    assert defaults == [3.0, 1.0]  # the teacher is sampled with CFG, the distilled student without
    from engine.runtime.loader import load_pipeline

    pipe = load_pipeline(str(tmp_path / "s"), torch.device("cpu"), torch.float32)
    assert pipe.transformer.config.num_layers == 2
    r = run_cli("train_shapes.py", "--stage", "student", "--out", tmp_path / "x", *args)
    assert r.returncode == 2 and "--stage student needs --teacher" in r.stderr


def test_model_folder_defaults_fill_the_request(worker):
    """engine_defaults.json next to the weights: size, frames and guidance the model was made for."""
    from engine.runtime.loader import DEFAULTS_FILE, EMBEDDED
    from engine.runtime.request import GenerationRequest

    own = json.loads((EMBEDDED / DEFAULTS_FILE).read_text())
    req = worker.validate(GenerationRequest(prompt="a red circle moving right quickly on a dark background"))
    assert (req.height, req.width, req.num_frames, req.guidance) == (
        own["height"],
        own["width"],
        own["num_frames"],
        own["guidance"],
    )
    assert worker.validate(GenerationRequest(prompt="a", guidance=1.0)).guidance == 1.0  # the user's value wins
