"""Parallel VAE decode (parallel/vae.py) in 2 and 4 spawned gloo processes, the Worker using it, and the bf16 decode.

The multi-process scenarios live in tests/scenarios.py (`vae_decode`, `worker_decode`); one spawned world per size
serves the whole run (conftest.py). Each compares the decode over the ranks with the one-process decode of the same
latents, for tiny VAEs of every kind the engine shards: Wan 2.1, Wan 2.2 (48 channels, patchify) and HunyuanVideo 1.5.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import run_cli, tiny_vaes
from scenarios import VAE_LATENTS

TOL = 1e-5  # float32: the halo exchange and the band reductions only reorder sums
KINDS = ("wan2.1", "wan2.2", "hunyuan1.5")
# measured on this CPU (tiny random VAEs, tests below): 53.2-57.7 dB; the real Wan VAE on an H200 is in
# docs/benchmarks.md (launch/bench_e2e.py)
BF16_PSNR_DB = 45.0


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_parallel_decode_equals_one_process(spawned, world, kind):
    r = spawned(world, "vae_decode")
    assert r[f"{kind}_sharded"] == 1.0 and r[f"{kind}_restored"] == 1.0, r
    for _, h, w in VAE_LATENTS:
        tag = f"{kind}_{h}x{w}"
        assert r[f"ranks_{tag}"] == world, (tag, r)  # every rank decoded
        assert r[f"diff_{tag}"] <= TOL, (tag, r[f"diff_{tag}"])
        assert 0 < r[f"share_{tag}"] <= r[f"bound_{tag}"] + 1e-9, (tag, r)  # no rank but the leader holds more


@pytest.mark.parametrize("world", [2, 4])
def test_rows_that_do_not_split_fall_back_to_the_leader(spawned, world):
    """2 latent rows: Wan 2.2's bands are whole 2-row units (its patchify), one unit cannot go to 2 or 4 ranks;
    the leader decodes alone with the whole decoder, exactly."""
    r = spawned(world, "vae_decode")
    assert r["ranks_wan2.2_2x4"] == 1.0 and r["diff_wan2.2_2x4"] <= TOL and r["share_wan2.2_2x4"] == 0.0
    assert r["patch_vae_sharded"] == 0.0 and r["patch_vae_reason"] == 1.0  # the embedded model's VAE: no adapter


def test_worker_decodes_over_the_replica(spawned):
    r = spawned(2, "worker_decode")
    assert r["ranks_auto"] == 2.0 and r["ranks_off"] == 1.0, r
    assert r["frames_auto"] == 1.0 and r["nonleader_frames_auto"] == 0.0 and r["nonleader_frames_off"] == 0.0
    assert r["video_diff"] <= TOL, r


# ---- one process -------------------------------------------------------------------------------------------
def _psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR of decoded videos in [-1, 1] (peak-to-peak 2)."""
    mse = (x.float() - ref.float()).pow(2).mean().item()
    return 10 * np.log10(4.0 / mse)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_decode_psnr_against_fp32(kind):
    vae, channels = tiny_vaes()[kind]
    z = torch.randn(1, channels, *VAE_LATENTS[0], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = vae.decode(z).sample
        vae.to(torch.bfloat16)
        got = vae.decode(z.bfloat16()).sample
    assert got.dtype == torch.bfloat16
    psnr = _psnr(got, ref)
    print(f"{kind}: bf16 vs fp32 decode {psnr:.1f} dB")
    assert psnr >= BF16_PSNR_DB


def test_one_process_decodes_alone():
    from parallel import Degrees, init_parallel
    from parallel.vae import parallelize_vae

    vae, _ = tiny_vaes()["wan2.1"]
    dec = parallelize_vae(vae, init_parallel(Degrees()))
    assert dec.ranks == 1 and dec.sharded is None and dec.reason == "one rank per replica"
    with dec.decoding(8) as ranks:
        assert ranks == 1 and vae.decoder is dec.whole
    assert parallelize_vae(vae, init_parallel(Degrees()), enabled=False).reason.startswith("off")


def test_generate_with_a_bf16_vae(tiny_path, tmp_path):
    out = tmp_path / "v.mp4"
    args = ["--model", tiny_path("t2v"), "--prompt", "a red circle moving right", "--height", "32", "--width", "32"]
    r = run_cli("generate.py", *args, "--frames", "9", "--steps", "1", "--vae-dtype", "bf16", "--output", out)
    assert r.returncode == 0, r.stderr
    m = json.loads(out.with_suffix(".metrics.json").read_text())
    assert m["decode"] == {"ranks": 1, "adapter": None, "reason": "one rank per replica", "dtype": "bf16"}
    bad = run_cli("generate.py", *args, "--vae-dtype", "fp8", "--output", tmp_path / "w.mp4")
    assert bad.returncode == 2 and "invalid choice: 'fp8'" in bad.stderr and not (tmp_path / "w.mp4").exists()
