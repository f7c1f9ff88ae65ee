"""Fidelity metrics of the eval harness, on videos with known answers."""

import numpy as np
import pytest

from engine.evaluation.video_metrics import flicker, high_frequency_energy, interior, psnr, speckle_ratio, ssim
from engine.testbed.shapes_data import Spec, render


@pytest.fixture(scope="module")
def video():
    return render(Spec("red", "circle", "right", "slowly", "textured"), 17, 32, np.random.default_rng(0))


def test_identical_videos(video):
    assert psnr(video, video) == float("inf") and ssim(video, video) == pytest.approx(1.0)


def test_noise_lowers_psnr_and_ssim_monotonically(video):
    rng = np.random.default_rng(1)
    scores = []
    for sigma in (2, 8, 32):
        noisy = np.clip(video + rng.normal(0, sigma, video.shape), 0, 255).astype(np.uint8)
        scores.append((psnr(noisy, video), ssim(noisy, video)))
    assert scores[0][0] > scores[1][0] > scores[2][0]
    assert scores[0][1] > scores[1][1] > scores[2][1]
    assert 25 < scores[1][0] < 35  # sigma 8 on 0-255: about 30 dB


def test_flicker_sees_back_and_forth_frames_not_smooth_motion(video):
    jumpy = video.copy()
    jumpy[1::2] = video[0]  # every other frame snaps back to the start
    assert flicker(jumpy) > 3 * flicker(video)
    assert flicker(np.repeat(video[:1], 17, 0)) == 0.0


def test_speckle_ratio_sees_fine_noise_not_blur_or_brightness(video):
    rng = np.random.default_rng(2)
    assert speckle_ratio(video, video) == pytest.approx(1.0)
    assert high_frequency_energy(np.full((3, 8, 8, 3), 90, np.uint8)) == 0.0  # flat frames: nothing to remove
    noisy = np.clip(video + rng.normal(0, 12, video.shape), 0, 255).astype(np.uint8)
    louder = np.clip(video + rng.normal(0, 24, video.shape), 0, 255).astype(np.uint8)
    assert 1.5 < speckle_ratio(noisy, video) < speckle_ratio(louder, video)
    blurred = video.copy()
    blurred[1:-1, 1:-1] = (
        video[1:-1, :-2].astype(int) + video[1:-1, 2:] + video[1:-1, 1:-1]
    ) // 3  # a vertical 3-tap blur
    assert speckle_ratio(blurred, video) < 1.0
    assert speckle_ratio(np.clip(video.astype(int) + 20, 0, 255).astype(np.uint8), video) == pytest.approx(1, abs=0.1)
    # only interior frames count: the always-computed first and last latent frames are left out
    edges = video.copy()
    edges[0] = noisy[0]
    edges[-4:] = noisy[-4:]
    assert speckle_ratio(edges, video) == pytest.approx(1.0)
    assert len(interior(video)) == 17 - 1 - 4


def test_shape_mismatch_is_an_error(video):
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(video[:5], video)
