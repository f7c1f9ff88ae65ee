"""HunyuanVideo 1.5 pipelines (tiny, random, built offline) through the engine: the Worker, FIS, guidance, the
step callback, reference images on every entry point (CLI, HTTP schema and body limit, manifests)."""

from __future__ import annotations

import base64
import io
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import chunked_body, run_cli

from engine.errors import Cancelled, UserError
from engine.runtime.request import GenerationRequest
from engine.runtime.worker import Worker, WorkerConfig
from fis import FISConfig

H, W, FRAMES = 32, 48, 25  # latent 2x3 tokens per frame (VAE x16, patch 1), 7 latent frames
SMALL = ["--height", str(H), "--width", str(W), "--frames", "17", "--steps", "2"]
SPARSE = FISConfig(stride=3, dense_head=1, dense_tail=1, dense_steps=1)


@pytest.fixture(scope="module")
def model():
    from engine.testbed.tiny_hunyuan import ensure_tiny_hunyuan

    return lambda variant: str(ensure_tiny_hunyuan(variant))


@pytest.fixture(scope="module")
def workers(model):
    return {v: Worker(WorkerConfig(model=model(v))) for v in ("t2v", "i2v")}


def _png(path, h, w, seed=0):
    from PIL import Image

    Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype("uint8")).save(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    text = d / "notes.png"
    text.write_text("not an image")
    whole = _png(d / "whole.png", 40, 80)
    cut = d / "cut.png"
    cut.write_bytes(whole.read_bytes()[:200])  # a valid header, truncated data
    return {
        "other": str(_png(d / "other.png", 40, 80)),
        "exact": str(_png(d / "exact.png", H, W, 1)),
        "text": str(text),
        "cut": str(cut),
        "dir": d,
    }


def _run(w, fis=None, guidance=1.0, steps=2, image=None, fit="crop", **kw):
    req = GenerationRequest(
        prompt="a red circle moving right",
        height=H,
        width=W,
        num_frames=FRAMES,
        steps=steps,
        guidance=guidance,
        seed=3,
        fis=fis,
        image=image,
        image_fit=fit,
    )
    return w.generate(req, decode=False, **kw)


class Tokens:
    """Video tokens entering each block's attention, per call; transformer forwards."""

    def __init__(self, w):
        self.calls, self.forwards, self.handles = [], 0, []  # calls: (block, tokens)
        t = w.transformers[0]
        for b, blk in enumerate(t.transformer_blocks):
            self.handles.append(
                blk.attn.register_forward_pre_hook(
                    lambda m, a, k, b=b: self.calls.append((b, k["hidden_states"].shape[1])), with_kwargs=True
                )
            )
        self.handles.append(t.register_forward_pre_hook(lambda m, a: self._forward()))

    def _forward(self):
        self.forwards += 1

    def close(self):
        for h in self.handles:
            h.remove()


def test_tiny_tokenizer_crops_at_the_prompt(workers):
    """The pipeline drops the first crop_start (108) tokens of its chat template: exactly the system turn."""
    pipe = workers["t2v"].pipe
    chat = [[{"role": "system", "content": pipe.system_message}, {"role": "user", "content": "a red cat"}]]
    ids = pipe.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ][0]
    assert pipe.tokenizer.decode(ids[pipe.prompt_template_encode_start_idx :]).startswith("a red cat<|im_end|>")


def test_model_info_family_and_flops(workers):
    from diffusers import HunyuanVideo15Transformer3DModel

    from engine.models import preset_family
    from fis.flops import HUNYUAN_VIDEO_15, DiTDims

    w = workers["t2v"]
    i = w.info
    assert (i.arch, i.patch, i.vae_s, i.vae_t, i.num_blocks, i.family) == (
        "hunyuanvideo1.5",
        (1, 1, 1),
        16,
        4,
        6,
        "default",
    )
    assert w.dims().joint and w.dims().num_layers == 6
    real = {
        k: p.default
        for k, p in __import__("inspect").signature(HunyuanVideo15Transformer3DModel.__init__).parameters.items()
        if k != "self"
    }
    assert preset_family(real) == "hunyuanvideo1.5-8b"  # the 8B config picks up its presets
    assert DiTDims.from_hunyuan15_config(real) == HUNYUAN_VIDEO_15
    assert preset_family({**real, "num_layers": 40, "num_attention_heads": 40}) == "default"  # not Wan 14B
    assert not workers["t2v"].info.needs_image and workers["i2v"].info.needs_image


@pytest.mark.parametrize("variant", ["t2v", "i2v"])
def test_stride_one_equals_dense_and_sparse_runs_fewer_tokens(workers, images, variant):
    w = workers[variant]
    image = images["other"] if variant == "i2v" else None
    dense = _run(w, image=image)
    assert torch.equal(_run(w, FISConfig(stride=1), image=image)["latents"], dense["latents"])
    tokens = Tokens(w)
    try:
        sparse = _run(w, SPARSE, image=image)
    finally:
        tokens.close()
    hw = (H // 16) * (W // 16)
    step0 = [n for _, n in tokens.calls[:6]]  # step 0 sparse: blocks 1-4, anchors of 7 frames rotate
    assert step0 == [7 * hw, 3 * hw, 4 * hw, 4 * hw, 3 * hw, 7 * hw]
    assert [n for _, n in tokens.calls[6:]] == [7 * hw] * 6  # the last step dense
    assert not torch.allclose(sparse["latents"], dense["latents"]) and torch.isfinite(sparse["latents"]).all()
    m = sparse["metrics"]
    assert m["flops_P"] < m["flops_dense_P"] and m["fis"]["sparse_steps"] == [0]
    assert m["worker"]["arch"] == "hunyuanvideo1.5"


def test_guidance_drives_the_guider(workers):
    w = workers["t2v"]
    tokens = Tokens(w)
    try:
        one = _run(w, guidance=1.0)
        n_one = tokens.forwards
        cfg = _run(w, guidance=5.0)
    finally:
        tokens.close()
    assert (n_one, tokens.forwards - n_one) == (2, 4)  # guidance 1: no uncond branch
    assert not torch.allclose(one["latents"], cfg["latents"])
    assert cfg["metrics"]["flops_dense_P"] == pytest.approx(2 * one["metrics"]["flops_dense_P"])
    assert w.pipe.guider.guidance_scale == 5.0


def test_step_callback_progress_and_cancel(workers):
    w = workers["t2v"]
    seen = []
    out = _run(w, on_step=lambda k, n: seen.append((k, n)))
    assert seen == [(1, 2), (2, 2)] and len(out["metrics"]["step_s"]) == 2
    with pytest.raises(Cancelled):
        _run(w, steps=5, on_step=lambda k, n: seen.append(k), cancel=lambda: seen[-1] >= 2)
    assert seen[-1] == 2 and "step" not in vars(w.pipe.scheduler)  # the step wrapper is gone
    assert w.fis.config is None  # FIS reset after a cancelled run


def test_i2v_image_fit(workers, images):
    w = workers["i2v"]
    crop = _run(w, image=images["other"])["latents"]
    stretch = _run(w, image=images["other"], fit="stretch")["latents"]
    assert crop.shape == (1, 4, 7, H // 16, W // 16) and not torch.equal(crop, stretch)
    assert _run(w, image=images["exact"], fit="strict")["latents"].shape == crop.shape
    with pytest.raises(UserError, match="is 80x40, not the video size 48x32"):
        _run(w, image=images["other"], fit="strict")
    frames = w.generate(
        GenerationRequest(prompt="a cat", height=H, width=W, num_frames=9, steps=1, image=images["other"])
    )["frames"]
    assert frames.shape == (9, H, W, 3)


def test_i2v_from_the_command_line(model, images, tmp_path):
    out = tmp_path / "i2v.mp4"
    r = run_cli(
        "generate.py",
        "--model",
        model("i2v"),
        "--image",
        images["other"],
        "--prompt",
        "a red cat",
        *SMALL,
        "--fis",
        "balanced",
        "--output",
        out,
    )
    assert r.returncode == 0, r.stderr
    from engine.runtime.io import read_mp4

    assert read_mp4(out).shape == (17, H, W, 3)
    m = json.loads(out.with_suffix(".metrics.json").read_text())
    assert m["request"]["image"] == images["other"] and m["request"]["image_fit"] == "crop"
    assert m["worker"]["pipeline"] == "HunyuanVideo15ImageToVideoPipeline" and m["flops_P"] < m["flops_dense_P"]


BAD = [  # (variant, extra args, words)
    ("i2v", ["--image", "MISSING"], "does not exist"),
    ("i2v", ["--image", "text"], "is not a PNG, JPEG or WebP image"),
    ("i2v", ["--image", "cut"], "cannot be decoded"),
    ("i2v", ["--image", "dir"], "is not a file"),
    ("t2v", ["--image", "other"], "image is not accepted: this is a text-to-video model"),
    ("i2v", [], "image is required: this is an image-to-video model"),
    ("i2v", ["--image", "other", "--image-fit", "zoom"], "invalid choice: 'zoom'"),
    ("i2v", ["--image", "other", "--image-fit", "strict"], "is 80x40, not the video size 48x32"),
]


@pytest.mark.parametrize("variant, args, words", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_image_is_one_clear_line(model, images, tmp_path, capsys, variant, args, words):
    from launch.generate import main

    named = {**images, "MISSING": str(tmp_path / "missing.png"), "dir": str(images["dir"])}
    args = [str(named.get(a, a)) for a in args]
    with pytest.raises(SystemExit) as e:
        main(["--model", model(variant), "--prompt", "a cat", *SMALL, "--output", str(tmp_path / "x.mp4"), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("generate: error:") and words in err[-1], err
    assert not list(tmp_path.iterdir())  # nothing written


# ---- HTTP: the schema, the body limit --------------------------------------------------------------------------


def _b64(path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


@pytest.fixture(scope="module")
def app(workers):
    """The real app on a stand-in service that validates like VideoService.submit (no Ray, no worker group)."""
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from engine.serving.api import create_app
    from engine.serving.config import ServeConfig, ServeSettings
    from engine.serving.schema import Limits, check_for, parse

    limits = Limits(max_image_kib=64)
    info = workers["i2v"].info

    def submit(body):
        req, _ = parse(body, limits)
        return {"id": "video_x", "request": check_for(req, info).to_dict()}

    config = ServeConfig(serve=ServeSettings(max_body_kib=4, allowed_hosts=["testserver"]), limits=limits)
    service = SimpleNamespace(config=config, submit=submit)
    return TestClient(create_app(service))


def test_api_image_field(app, images):
    body = {"prompt": "a cat", "size": f"{W}x{H}", "num_frames": 9}
    r = app.post("/v1/videos", json={**body, "image": _b64(images["other"])})
    assert r.status_code == 202, r.text
    image = r.json()["request"]["image"]
    assert image.startswith("data:image/png;base64,")
    from engine.runtime.images import load

    assert load(image).size == (80, 40)
    r = app.post(
        "/v1/videos", json={**body, "image": "data:image/png;base64," + _b64(images["exact"]), "image_fit": "strict"}
    )
    assert r.status_code == 202, r.text


def _bad_image_bodies(images):
    big = io.BytesIO()
    from PIL import Image

    Image.fromarray((np.random.default_rng(0).random((200, 200, 3)) * 255).astype("uint8")).save(big, "PNG")
    return [
        ({"image": "%%% not base64 %%%"}, 422, "image", "not valid base64"),
        ({"image": "/etc/passwd"}, 422, "image", "not valid base64"),  # never read as a path
        ({"image": base64.b64encode(b"GIF89a and more").decode()}, 422, "image", "not a PNG, JPEG or WebP"),
        ({"image": 7}, 422, "image", "must be a base64 string"),
        ({"image": _b64(images["other"]), "image_fit": "zoom"}, 422, "image_fit", "must be one of crop"),
        ({"image": _b64(images["other"]), "image_fit": "strict"}, 422, "image", "not the video size"),
        ({}, 422, "image", "image is required"),
        ({"image": base64.b64encode(big.getvalue()).decode()}, 413, None, "(an image included)"),
        ({"image": _b64(images["other"]), "negative_prompt": "x" * 5000}, 413, None, "not counting the image"),
    ]


def test_api_bad_image_names_the_field(app, images):
    body = {"prompt": "a cat", "size": f"{W}x{H}", "num_frames": 9}
    for extra, status, param, words in _bad_image_bodies(images):
        r = app.post("/v1/videos", json={**body, **extra})
        assert r.status_code == status, (extra.keys(), r.text)
        err = r.json()["error"]
        assert err["param"] == param and words in err["message"], err
        assert len(err["message"]) < 300


def test_api_body_limit_holds_without_an_image(app):
    """The image allowance is for the image: other fields still get 413 past serve.max_body_kib (4 KiB here),
    also while a body without Content-Length streams in."""

    for kw in ({"json": {"prompt": "x" * 100_000}}, {"content": chunked_body()}):
        r = app.post("/v1/videos", headers={"content-type": "application/json"}, **kw)
        assert r.status_code == 413 and "limit" in r.json()["error"]["message"], r.text


def test_decoded_image_limit(images):
    from engine.errors import FieldError
    from engine.serving.schema import Limits, parse

    with pytest.raises(FieldError, match="the limit is 1 KiB") as e:
        parse({"prompt": "a cat", "image": _b64(images["other"])}, Limits(max_image_kib=1))
    assert e.value.field == "image"


def test_api_view_and_metrics_show_a_digest_not_the_data(images):
    from engine.runtime.images import embed
    from engine.serving.schema import api_view

    req = GenerationRequest(
        prompt="a cat", height=H, width=W, num_frames=9, image=embed(Path(images["other"]).read_bytes())
    )
    for view in (api_view(req.to_dict())["image"], req.describe()["image"]):
        assert re.fullmatch(r"image/png, \d+ KiB, sha256 [0-9a-f]{16}", view), view


# ---- manifests ------------------------------------------------------------------------------------------------


def test_manifest_image_paths(model, images, tmp_path):
    import shutil

    from engine.serving.batch import read_manifest
    from launch.render import main

    (tmp_path / "refs").mkdir()
    shutil.copy(images["other"], tmp_path / "refs" / "a.png")
    shutil.copy(images["text"], tmp_path / "refs" / "notes.png")
    small = {"size": f"{W}x{H}", "num_frames": 9, "num_inference_steps": 1}
    lines = [
        {"id": "ok", "prompt": "a red cat", "image": "refs/a.png", **small},
        {"id": "missing", "prompt": "a cat", "image": "refs/none.png", **small},
        {"id": "text", "prompt": "a cat", "image": "refs/notes.png", **small},
        {"id": "no-image", "prompt": "a cat", **small},  # known bad only once the (I2V) model is loaded
        {"id": "strict", "prompt": "a cat", "image": "refs/a.png", "image_fit": "strict", **small},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    items, bad = read_manifest(manifest, "off", {"model": "m"})
    assert [i.id for i in items] == ["ok", "no-image", "strict"]
    assert {b["line"]: b["reason"] for b in bad} == {
        2: "image 'refs/none.png' does not exist",
        3: "image 'refs/notes.png' is not a PNG, JPEG or WebP image",
    }
    _png(tmp_path / "refs" / "a.png", 40, 80, seed=5)  # the content is part of the key
    assert read_manifest(manifest, "off", {"model": "m"})[0][0].key != items[0].key

    out = tmp_path / "out"
    assert main([str(manifest), "--output-dir", str(out), "--model", model("i2v")]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["done_ids"] == ["ok"]
    reasons = {f["line"]: f["reason"] for f in s["failures"]}
    assert sorted(reasons) == [2, 3, 4, 5] and "image is required" in reasons[4] and "not the video size" in reasons[5]
    assert json.loads((out / "ok.metrics.json").read_text())["request"]["image"].startswith("image/png, ")
    assert Counter(p.suffix for p in out.iterdir()) == Counter({".json": 2, ".mp4": 1})
