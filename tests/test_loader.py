"""Loading: `random:` models honour --dtype; folders saved before the layout moved (model_index.json naming
engine.patch_vae) still load."""

from __future__ import annotations

import json
import shutil

import pytest
import torch


def test_random_models_take_the_dtype_asked_for(monkeypatch):
    """--dtype was ignored for --model random:* (the builder always took the auto dtype)."""
    from engine.models import random
    from engine.runtime.loader import load_pipeline

    monkeypatch.setitem(random.MODELS, "tiny-a14b", random.MODELS["wan2.2-a14b"].tiny())
    for dtype in (torch.bfloat16, torch.float32):
        pipe = load_pipeline("random:tiny-a14b", torch.device("cpu"), dtype)
        t = pipe.transformer
        assert t.patch_embedding.weight.dtype == dtype and pipe.transformer_2.proj_out.weight.dtype == dtype
        assert pipe.text_encoder.dtype == dtype
        assert t.scale_shift_table.dtype == torch.float32  # kept in fp32, as from_pretrained keeps it
        assert pipe.vae.dtype == torch.float32  # Wan's VAE runs in fp32


def test_a_folder_saved_before_the_move_still_loads(tmp_path):
    from engine.runtime.loader import EMBEDDED, load_pipeline

    old = tmp_path / "shapes-wan"
    shutil.copytree(EMBEDDED, old)
    index = json.loads((old / "model_index.json").read_text())
    assert index["vae"] == ["engine.models.patch_vae", "PatchVAE"]  # what the shipped model names now
    index["vae"] = ["engine.patch_vae", "PatchVAE"]  # what folders saved before the move name
    (old / "model_index.json").write_text(json.dumps(index))
    pipe = load_pipeline(str(old), torch.device("cpu"), torch.float32)
    assert type(pipe.vae).__name__ == "PatchVAE"
    new = load_pipeline(str(EMBEDDED), torch.device("cpu"), torch.float32)
    assert torch.equal(pipe.vae.basis, new.vae.basis)


def test_unsupported_pipelines_are_named():
    from engine.errors import UserError
    from engine.runtime.loader import check_supported

    class Pipe:
        transformer = torch.nn.Linear(1, 1)

    with pytest.raises(UserError, match=r"Pipe \(Linear\) is not supported; supported models: "):
        check_supported(Pipe())
