"""Weight-free fidelity of a video against a reference (FIS vs dense): PSNR, SSIM (scikit-image), a
temporal-flicker score and the speckle ratio. Videos are [F, H, W, 3] uint8, as engine.runtime.io.to_uint8 makes
them."""

from __future__ import annotations

import numpy as np


def psnr(video: np.ndarray, ref: np.ndarray) -> float:
    """Over the whole clip (one MSE), in dB; inf for identical videos."""
    _check(video, ref)
    if np.array_equal(video, ref):
        return float("inf")
    try:
        from skimage.metrics import peak_signal_noise_ratio
    except ImportError:  # GPU images without scikit-image: the same formula
        mse = np.mean((video.astype(np.float64) - ref.astype(np.float64)) ** 2)
        return float(10 * np.log10(255.0**2 / mse))
    return float(peak_signal_noise_ratio(ref, video, data_range=255))


def ssim(video: np.ndarray, ref: np.ndarray) -> float:
    """Mean over frames of the colour SSIM of each frame."""
    from skimage.metrics import structural_similarity

    _check(video, ref)
    win = min(7, (min(ref.shape[1:3]) - 1) // 2 * 2 + 1)  # SSIM's default 7, or the largest odd size that fits
    return float(
        np.mean(
            [structural_similarity(r, v, channel_axis=-1, data_range=255, win_size=win) for r, v in zip(ref, video)]
        )
    )


def flicker(video: np.ndarray) -> float:
    """Temporal flicker: mean absolute change of the frame-to-frame difference (a second temporal
    derivative, in grey levels). Smooth motion scores low; frames that jump back and forth score high."""
    v = video.astype(np.float32)
    if len(v) < 3:
        return 0.0
    return float(np.abs(v[2:] - 2 * v[1:-1] + v[:-2]).mean())


def high_frequency_energy(video: np.ndarray) -> float:
    """Mean squared difference between each frame and its 3x3 box blur (edge pixels repeated), over pixels and
    channels, in grey levels squared: the energy a 3x3 low-pass removes. Fine noise and speckle carry much of it,
    smooth shading none."""
    v = video.astype(np.float32)  # [F, H, W, 3]
    p = np.pad(v, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = v.shape[1:3]
    low = sum(p[:, i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9.0
    return float(np.mean((v - low) ** 2))


def interior(video: np.ndarray, vae_t: int = 4) -> np.ndarray:
    """The frames decoded from the interior latent frames (Wan-style VAE: latent frame 0 is pixel frame 0, the last
    latent frame the last vae_t pixel frames): the frames FIS may skip, since the first and last latent frame are
    always anchors."""
    return video[1 : len(video) - vae_t]


def speckle_ratio(video: np.ndarray, ref: np.ndarray, vae_t: int = 4) -> float:
    """High-frequency energy of the interior frames of `video` over that of the same frames of `ref`: 1 = as much
    fine detail as the reference; a skipped frame that keeps noise its own update should have removed scores > 1
    (the embedded model's FIS-Balanced: about 9x on prompts outside the eval set, issue 16)."""
    _check(video, ref)
    return high_frequency_energy(interior(video, vae_t)) / max(high_frequency_energy(interior(ref, vae_t)), 1e-12)


def _check(video: np.ndarray, ref: np.ndarray) -> None:
    if video.shape != ref.shape:
        raise ValueError(f"videos differ in shape: {video.shape} vs {ref.shape}")
