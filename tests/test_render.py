"""Batch rendering (launch/render.py): manifest checks and resume logic in-process; end to end, a 6-line manifest
with one bad line on a local Ray cluster (2 render groups), a re-run that skips the done lines, and torchrun
(2 processes = 2 groups) re-rendering deleted outputs identically."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli

from engine.runtime.io import read_mp4
from engine.runtime.worker import WorkerConfig
from engine.serving.batch import Batch, read_manifest

LINES = [
    {"prompt": "a red ball moving left", "size": "32x32", "num_frames": 17, "num_inference_steps": 2, "seed": 1},
    {
        "prompt": "a blue square moving up",
        "size": "32x32",
        "num_frames": 17,
        "num_inference_steps": 2,
        "fis": "balanced",
        "id": "blue-square",
    },
    {"prompt": "a cat", "size": "32x32", "num_frames": 18},  # not 4k+1: known only once the model is loaded
    {"prompt": "a dog running", "size": "32x32", "num_frames": 9, "num_inference_steps": 2},
    {"prompt": "a green tree", "height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 1, "seed": 7},
    {
        "prompt": "a car driving at night",
        "size": "32x32",
        "num_frames": 17,
        "num_inference_steps": 2,
        "fis": {"stride": 2},
    },
]
FRAMES = {n: line["num_frames"] for n, line in enumerate(LINES, 1) if n != 3}


def _write(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_bad_lines_are_reported_with_their_line_numbers(tmp_path):
    manifest = _write(
        tmp_path / "m.jsonl",
        [
            {"prompt": "a", "id": "same"},
            "not json",
            '["a list"]',
            "",
            {"prompt": "x", "id": "../../etc/passwd"},
            {"prompt": "x", "fis": "../../etc/passwd.toml"},
            {"prompt": "x", "height": -1},
            {"prompt": "x", "colour": "red"},
            {"prompt": "b", "id": "same"},
            {"prompt": "c"},
            {"prompt": "c"},
        ],
    )
    items, bad = read_manifest(manifest, "off", {"model": "m"})
    assert [(i.line, i.id) for i in items[:1]] == [(1, "same")] and [i.line for i in items] == [1, 10]
    assert len(items[1].id) == 16 and items[1].id == read_manifest(manifest, "off", {"model": "m"})[0][1].id
    assert items[1].id != read_manifest(manifest, "off", {"model": "other"})[0][1].id  # the model is in the key
    reasons = {b["line"]: b["reason"] for b in bad}
    assert sorted(reasons) == [2, 3, 5, 6, 7, 8, 9, 11]
    assert "not valid JSON" in reasons[2] and "JSON object" in reasons[3]
    assert reasons[5].startswith("id must be") and "unknown FIS preset" in reasons[6]
    assert "height must be between" in reasons[7] and "unknown field 'colour'" in reasons[8]
    assert reasons[9] == "duplicate id 'same' (also on line 1)" and "also on line 10" in reasons[11]


def test_resume_needs_a_complete_output_of_the_same_request(tmp_path):
    manifest = _write(tmp_path / "m.jsonl", [{"prompt": "a", "id": "a"}, {"prompt": "b", "id": "b"}])
    out = tmp_path / "out"
    first = Batch(manifest, out, "off", WorkerConfig(), progress=False)
    a, b = first.items
    (out / "a.mp4").write_bytes(b"x")
    (out / "a.metrics.json").write_text(json.dumps({"key": a.key}))
    (out / "b.mp4").write_bytes(b"x")
    (out / "b.metrics.json").write_text(json.dumps({"key": "an older request"}))
    again = Batch(manifest, out, "off", WorkerConfig(), progress=False)
    assert [i.id for i in again.skipped] == ["a"] and [i.id for i in again.pending] == ["b"]
    assert Batch(manifest, out, "balanced", WorkerConfig(), progress=False).skipped == []  # other default FIS


@pytest.mark.slow
def test_batch_on_ray_resume_and_torchrun(tiny_path, tmp_path, ray_cluster):
    model = tiny_path("t2v")
    manifest = _write(tmp_path / "m.jsonl", LINES)
    out = tmp_path / "out"
    r = run_cli("render.py", manifest, "--output-dir", out, "--model", model, "--ray", "--groups", "2")
    assert r.returncode == 0, r.stderr  # a failed line does not fail the batch
    assert f"{manifest}:3: num_frames must be of the form 4k+1" in r.stderr and "6/6" in r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert (s["backend"], s["groups"], s["total"], s["done"], s["skipped"], s["failed"]) == ("ray", 2, 6, 5, 0, 1)
    assert s["failures"][0]["line"] == 3 and "4k+1" in s["failures"][0]["reason"]
    assert s["total_time_s"] > 0 and s["videos_per_hour"] > 0
    ids = {json.loads(p.read_text())["line"]: p.name.removesuffix(".metrics.json") for p in out.glob("*.metrics.json")}
    assert sorted(ids) == sorted(FRAMES) and ids[2] == "blue-square"
    frames = {n: read_mp4(out / f"{ids[n]}.mp4") for n in ids}
    assert {n: f.shape for n, f in frames.items()} == {n: (k, 32, 32, 3) for n, k in FRAMES.items()}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left

    r = run_cli("render.py", manifest, "--output-dir", out, "--model", model, "--no-progress")  # one process
    s = json.loads((out / "summary.json").read_text())
    assert (r.returncode, s["backend"], s["done"], s["skipped"], s["failed"]) == (0, "local", 0, 5, 1), r.stderr
    assert sorted(s["skipped_ids"]) == sorted(ids.values())

    for n in (2, 4):  # deleted outputs come back from other groups, identical: same line and seed, same video
        (out / f"{ids[n]}.metrics.json").unlink()
    r = run_cli("render.py", manifest, "--output-dir", out, "--model", model, "--no-progress", nproc=2)
    s = json.loads((out / "summary.json").read_text())
    assert r.returncode == 0, r.stderr
    assert (s["backend"], s["groups"], s["done"], s["skipped"], s["failed"]) == ("torchrun", 2, 2, 3, 1)
    assert sorted(s["done_ids"]) == sorted([ids[2], ids[4]])
    for n in (2, 4):
        assert (read_mp4(out / f"{ids[n]}.mp4") == frames[n]).all()


def test_bad_degrees_are_refused_before_work(tmp_path, capsys):
    from launch.render import main

    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"prompt": "a cat"}\n')
    with pytest.raises(SystemExit) as e:
        main([str(manifest), "--output-dir", str(tmp_path / "out"), "--ulysses", "0"])
    assert e.value.code == 2
    assert "ulysses must be an integer >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_zero_groups_is_refused(tmp_path, capsys):
    """--groups 0 is an error, not "as many as fit" (which is --groups left out)."""
    from launch.render import main

    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"prompt": "a cat"}\n')
    with pytest.raises(SystemExit) as e:
        main([str(manifest), "--output-dir", str(tmp_path / "out"), "--groups", "0"])
    assert e.value.code == 2 and "--groups must be >= 1" in capsys.readouterr().err
