"""The package as a user installs it: a wheel built from the checkout, installed into a folder outside it, used from
another working directory through the `fis` console command (presets and the embedded model are package data)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest
from helpers import ROOT


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(site folder, the wheel) of `pip wheel` + `pip install --target`, no dependencies (the venv has them)."""
    base = tmp_path_factory.mktemp("package")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    wheel_dir, site = base / "wheel", base / "site"
    r = subprocess.run(
        [*pip, "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(wheel_dir)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    (wheel,) = wheel_dir.glob("fis_engine-*.whl")
    r = subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(site), str(wheel)], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr
    return site, wheel


def _env(site):
    return {**os.environ, "PYTHONPATH": str(site), "PYTHONUNBUFFERED": "1"}


def test_the_wheel_carries_presets_config_and_weights(installed):
    _, wheel = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "engine/configs/fis/default.balanced.toml",
        "engine/configs/fis/wan-14b.fast.toml",
        "engine/configs/serve.toml",
        "engine/weights/shapes-wan/model_index.json",
        "launch/cli.py",
    ):
        assert needed in names, needed


def test_fis_generate_from_another_folder(installed, tmp_path):
    site, _ = installed
    where = subprocess.run(
        [sys.executable, "-c", "import engine; print(engine.__file__)"],
        cwd=tmp_path,
        env=_env(site),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr  # the installed copy, not ours
    out = tmp_path / "v.mp4"
    r = subprocess.run(
        [
            str(site / "bin" / "fis"),
            "generate",
            "--prompt",
            "a red circle moving right",
            "--fis",
            "balanced",
            "--output",
            str(out),
        ],
        cwd=tmp_path,
        env=_env(site),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    m = json.loads(out.with_suffix(".metrics.json").read_text())
    assert m["request"]["fis"]["name"] == "balanced" and m["request"]["fis"]["stride"] == 3
    assert m["worker"]["model"] == "embedded:shapes-wan" and out.stat().st_size > 0
    bad = subprocess.run(
        [str(site / "bin" / "fis"), "nonsense"],
        cwd=tmp_path,
        env=_env(site),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "unknown command 'nonsense'" in bad.stderr
