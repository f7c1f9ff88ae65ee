"""The HTTP API as OpenAI's clients see it: the official `openai` client (3.x) and plain HTTP against the real app
over real sockets (uvicorn on a thread, helpers.LocalServer: a VideoService with an in-process worker, no Ray), on
the embedded text-to-video model and the tiny HunyuanVideo 1.5 image-to-video pipeline. What is about Ray (worker
groups, replicas, nodes) is in test_serve.py."""

from __future__ import annotations

import base64
import io
import json
import time
import warnings

import numpy as np
import openai
import pytest
import requests
from helpers import LocalServer

from engine.runtime.io import read_mp4
from engine.serving.config import DEFAULT_CONFIG, load_config

warnings.filterwarnings("ignore", message="The Sora API", category=DeprecationWarning)
QUICK = {"num_frames": 17, "num_inference_steps": 2, "guidance_scale": 1.0}  # the embedded model, 64x64


def _config(tmp, *overrides):
    return load_config(
        DEFAULT_CONFIG, [f"serve.output_dir={tmp}", "serve.poll_after_ms=100", "serve.queue_size=8", *overrides]
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = LocalServer(_config(tmp_path_factory.mktemp("api")))
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="not-checked", max_retries=0)


def _png(h=32, w=48, seed=0) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype("uint8")).save(buf, "PNG")
    return buf.getvalue()


def test_openai_client_create_and_poll_download_delete(client, server, tmp_path):
    v = client.videos.create_and_poll(prompt="a red circle moving right", size="64x64", extra_body=QUICK)
    assert (v.object, v.status, v.progress, v.error) == ("video", "completed", 100, None)
    assert v.model == "embedded:shapes-wan" and v.size == "64x64" and v.seconds == "1.06"  # 17 frames at 16 fps
    assert isinstance(v.created_at, int) and isinstance(v.completed_at, int) and v.prompt.startswith("a red")
    extras = v.model_extra  # the engine's own, beside OpenAI's fields
    assert extras["steps"] == {"done": 2, "total": 2} and extras["fis"]["preset"] == "balanced"
    assert extras["fis"]["source"] == "server default" and extras["fis"]["speedup_estimate"] > 1
    assert client.videos.retrieve(v.id).status == "completed"
    path = tmp_path / "v.mp4"
    client.videos.download_content(v.id).write_to_file(path)
    assert read_mp4(path).shape == (17, 64, 64, 3)
    gone = client.videos.delete(v.id)
    assert (gone.id, gone.object, gone.deleted) == (v.id, "video.deleted", True)
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(v.id)


def test_seconds_pagination_and_poll_header(client, server):
    """`seconds` becomes frames at the model's fps (4k+1); the list pages with after/limit/order as the client's
    auto-pagination expects; a pending video tells the poller when to come back."""
    ids = [client.videos.create(prompt=f"a blue square number {i}", seconds="1", size="32x32").id for i in range(3)]
    r = requests.get(f"{server.url}/v1/videos/{ids[-1]}", timeout=10)
    assert r.json()["status"] in ("queued", "in_progress") and r.headers["openai-poll-after-ms"] == "100"
    done = [client.videos.poll(i) for i in ids]
    assert [(v.status, v.seconds, v.model_extra["request"]["num_frames"]) for v in done] == [
        ("completed", "1.06", 17)
    ] * 3
    first = client.videos.list(limit=2)
    assert [v.id for v in first.data] == ids[::-1][:2] and first.has_more
    newest_first = [v.id for v in client.videos.list(limit=2)]  # iterating follows `after` page by page
    assert newest_first[:3] == ids[::-1]
    oldest_first = [v.id for v in client.videos.list(limit=2, order="asc")]
    assert oldest_first == newest_first[::-1]
    page = requests.get(f"{server.url}/v1/videos", params={"after": ids[1], "limit": 1}, timeout=10).json()
    assert [v["id"] for v in page["data"]] == [ids[0]] and page["last_id"] == ids[0]


def test_sync_answers_with_the_video(server):
    r = requests.post(
        f"{server.url}/v1/videos/sync", json={"prompt": "a green tree", "size": "32x32", **QUICK}, timeout=60
    )
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4", r.text[:200]
    vid = r.headers["x-video-id"]
    assert r.content == server.store.video_bytes(vid) and float(r.headers["x-inference-time-s"]) > 0


def test_the_default_preset_never_fails_a_request(server):
    """9 frames are 3 latent frames: the server's default (balanced, stride 3) cannot apply, so the request runs
    dense and says so; the same preset asked for by the request is refused."""
    r = requests.post(f"{server.url}/v1/videos", json={"prompt": "a cat", "size": "32x32", "num_frames": 9}, timeout=10)
    assert r.status_code == 202, r.text
    v = r.json()
    assert v["fis"]["preset"] == "off" and v["fis"]["source"] == "server default"
    assert "default FIS preset 'balanced' cannot apply" in v["fis"]["notes"][0]
    vid = v["id"]
    end = time.time() + 60
    while (v := requests.get(f"{server.url}/v1/videos/{vid}", timeout=10).json())["status"] != "completed":
        assert v["status"] != "failed" and time.time() < end, v
        time.sleep(0.1)
    metrics = json.loads(server.store.metrics_path(vid).read_text())
    assert "fis" not in metrics and "runs dense" in metrics["notes"][0]
    asked = {"prompt": "a cat", "size": "32x32", "num_frames": 9, "fis": "balanced"}
    r = requests.post(f"{server.url}/v1/videos", json=asked, timeout=10)
    assert r.status_code == 422 and r.json()["error"]["param"] == "fis"


def test_storing_costs_a_fraction_of_generating(client):
    """The embedded model's default video: the leader encodes the mp4 beside its frames and the store only writes
    bytes, so storing is cheap next to generating."""
    v = client.videos.create_and_poll(prompt="a yellow triangle moving up")  # 64x64, 49 frames, guidance 3
    t = v.model_extra["timings"]
    assert v.status == "completed" and v.model_extra["request"]["num_frames"] == 49
    assert t["write_s"] <= 0.2 * t["run_s"], t


def _form(fields, files=()):
    """multipart/form-data: text fields as parts without a file name, as the openai client sends them."""
    items = fields.items() if isinstance(fields, dict) else fields
    return {"files": [(k, (None, v)) for k, v in items] + list(files)}


BAD = [  # (id, request kwargs for POST /v1/videos, status, param, words in the message)
    ("model-unknown", {"json": {"prompt": "x", "model": "sora-2"}}, 404, "model", "not served here"),
    ("seconds-word", {"json": {"prompt": "x", "seconds": "four"}}, 422, "seconds", "positive number"),
    ("seconds-negative", {"json": {"prompt": "x", "seconds": -4}}, 422, "seconds", "positive number"),
    ("seconds-too-long", {"json": {"prompt": "x", "seconds": "12"}}, 422, "seconds", "up to 129 frames"),
    ("seconds-and-frames", {"json": {"prompt": "x", "seconds": "4", "num_frames": 17}}, 422, "seconds", "not both"),
    ("size-unsupported", {"json": {"prompt": "x", "size": "1792x1024"}}, 422, "size", "between 1 and 1280"),
    ("size-not-multiple", {"json": {"prompt": "x", "size": "40x32"}}, 422, "size", "multiple of 16"),
    (
        "t2v-input-reference",
        {"json": {"prompt": "x", "input_reference": {"image_url": "data:image/png;base64,AAAA"}}},
        422,
        "input_reference",
        "text-to-video",
    ),
    (
        "input-reference-url",
        {"json": {"prompt": "x", "input_reference": {"image_url": "http://example.com/a.png"}}},
        422,
        "input_reference.image_url",
        "no URL is fetched",
    ),
    (
        "input-reference-file-id",
        {"json": {"prompt": "x", "input_reference": {"file_id": "file_1"}}},
        422,
        "input_reference.file_id",
        "not supported",
    ),
    ("form-no-prompt", _form({"size": "64x64", "seconds": "4"}), 422, "prompt", "required"),
    ("form-frames-text", _form({"prompt": "x", "num_frames": "seventeen"}), 422, "num_frames", "integer"),
    ("form-field-twice", _form([("prompt", "x"), ("prompt", "y")]), 422, "prompt", "given twice"),
    ("form-unknown-field", _form({"prompt": "x", "colour": "red"}), 422, "colour", "unknown field"),
    ("form-file-as-size", _form({"prompt": "x"}, [("size", ("s.txt", b"64x64"))]), 422, "size", "not a file"),
]


@pytest.mark.parametrize("kw, status, param, words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_gets_openais_envelope(server, kw, status, param, words):
    before = server.store.counts()
    r = requests.post(f"{server.url}/v1/videos", timeout=10, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err
    assert err["type"] == "invalid_request_error" and err["code"] and len(err["message"]) < 300
    assert server.store.counts() == before  # nothing stored


def test_client_error_types(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.videos.create(prompt="x", model="sora-2")
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.videos.create(prompt="x", seconds="12")
    assert e.value.param == "seconds"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.videos.create(prompt="x", size="1792x1024")
    assert e.value.param == "size"
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve("video_" + "0" * 32)


def test_an_upload_over_the_limit_is_refused_before_it_is_read(server):
    """Content-Length past body + image allowance: 413 at once (the server reads none of it)."""
    big = b"\0" * (9 * 2**20)  # limits.max_image_kib = 8192, serve.max_body_kib = 64
    r = requests.post(
        f"{server.url}/v1/videos",
        data={"prompt": "x"},
        files={"input_reference": ("a.png", big, "image/png")},
        timeout=30,
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text[:300]


# ---- image-to-video: the tiny HunyuanVideo 1.5 I2V pipeline ------------------------------------------------------


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    from engine.testbed.tiny_hunyuan import ensure_tiny_hunyuan

    s = LocalServer(
        _config(tmp_path_factory.mktemp("i2v"), f"model.model={ensure_tiny_hunyuan('i2v')}", "serve.fis=off")
    )
    yield s
    s.close()


def test_i2v_with_input_reference(i2v):
    client = openai.OpenAI(base_url=i2v.url + "/v1", api_key="x", max_retries=0)
    small = {"num_frames": 9, "num_inference_steps": 1}
    v = client.videos.create_and_poll(
        prompt="a cat", size="48x32", input_reference=("ref.png", _png(), "image/png"), extra_body=small
    )
    assert v.status == "completed", v.error
    assert v.model_extra["request"]["image"].startswith("image/png, ")  # a digest, never the data
    assert read_mp4(i2v.store.video_path(v.id)).shape == (9, 32, 48, 3)
    url = "data:image/png;base64," + base64.b64encode(_png(seed=1)).decode()
    r = requests.post(
        f"{i2v.url}/v1/videos",
        json={"prompt": "a dog", "size": "48x32", "input_reference": {"image_url": url}, **small},
        timeout=10,
    )
    assert r.status_code == 202, r.text
    for files, words in [
        ([("input_reference", ("notes.png", b"not an image at all", "image/png"))], "not a PNG, JPEG or WebP"),
        ([("input_reference", ("cut.png", _png()[:120], "image/png"))], "cannot be decoded"),
        ([], "image is required"),
    ]:
        r = requests.post(f"{i2v.url}/v1/videos", timeout=10, **_form({"prompt": "a cat", "size": "48x32"}, files))
        assert r.status_code == 422 and words in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] in ("input_reference", "image")
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.videos.create(prompt="a cat", size="48x32", input_reference=("a.txt", b"plain text", "text/plain"))
    assert e.value.param == "input_reference"


def test_the_page_is_served_self_contained(server):
    """/ and its two files come from the app itself, under a policy that lets the browser fetch nothing from
    anywhere else (tests/test_page.py drives it in Chromium)."""
    import re

    for path, kind in (("/", "text/html"), ("/page.js", "text/javascript"), ("/page.css", "text/css")):
        r = requests.get(server.url + path, timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", r.text.replace(server.url, "")), path
