"""The page at / in a real browser: Debian's headless Chromium driven by selenium (installed by `make install`),
against the real app over real HTTP (helpers.LocalServer, the embedded model). Submit a prompt, see the progress bar
move, see the video element play the result, see the server's message for a bad input. The page may fetch nothing
from anywhere else: its Content-Security-Policy says so and Chromium enforces it."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from helpers import LocalServer

from engine.serving.config import DEFAULT_CONFIG, load_config

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# where the screenshot goes: FIS_PAGE_SCREENSHOT=docs/serving-page.png refreshes the README's; else the test's tmp
SCREENSHOT = os.environ.get("FIS_PAGE_SCREENSHOT")
HAVE_BROWSER = CHROMIUM.exists() and DRIVER.exists()
pytestmark = [
    pytest.mark.slow,  # starts a browser
    # CI installs it (make install): there its absence is a failure, not a skip
    pytest.mark.skipif(
        not HAVE_BROWSER and not os.environ.get("CI"), reason="chromium + chromium-driver: make install"
    ),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = LocalServer(load_config(DEFAULT_CONFIG, [f"serve.output_dir={tmp_path_factory.mktemp('page')}"]))
    yield s
    s.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--autoplay-policy=no-user-gesture-required",
        "--window-size=1000,1300",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _until(predicate, timeout=60, every=0.05, what="the page"):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def test_page_submit_progress_play_and_errors(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/")
    assert "embedded:shapes-wan" in _until(lambda: browser.find_element(By.ID, "model").text, what="the model line")
    by_id = lambda i: browser.find_element(By.ID, i)  # noqa: E731
    by_id("prompt").send_keys("a red circle moving right quickly on a dark background")
    by_id("num_inference_steps").send_keys("12")  # long enough to watch the bar move
    by_id("submit").click()

    seen = set()

    def finished():
        seen.add(int(by_id("bar").get_attribute("data-progress") or 0))
        return by_id("status").text.startswith(("completed", "failed"))

    _until(finished, what="the job to finish")
    assert by_id("status").text.startswith("completed"), by_id("status").text
    seen.add(int(by_id("bar").get_attribute("data-progress")))
    assert any(0 < p < 100 for p in seen) and 100 in seen, seen  # the bar moved while it ran

    def playing():
        return browser.execute_script(
            "const v = document.getElementById('player');"
            "return !v.hidden && v.readyState >= 2 && v.currentTime > 0 && !v.paused && v.videoWidth === 64;"
        )

    _until(playing, what="the video to play")

    by_id("prompt").clear()  # the model's own 4 steps: the video the screenshot shows
    by_id("prompt").send_keys("a red circle moving right quickly on a dark background")
    by_id("num_inference_steps").clear()
    by_id("submit").click()
    _until(lambda: by_id("status").text.startswith("completed") and playing(), what="the second video")
    _until(lambda: by_id("jobs").text.count("completed") == 2, what="the job list")
    row = by_id("jobs").find_element(By.CSS_SELECTOR, "tbody tr")
    assert "a red circle" in row.text and "balanced" in row.text and "×" in row.text  # status, FIS, its speedup
    time.sleep(0.5)  # a few frames into the clip
    assert browser.save_screenshot(SCREENSHOT or str(tmp_path / "page.png"))

    by_id("prompt").clear()
    by_id("prompt").send_keys("a blue square")
    by_id("length").send_keys("18")  # not 4k+1
    by_id("submit").click()
    message = _until(lambda: by_id("message").text, what="the error message")
    assert "num_frames must be of the form 4k+1" in message, message

    assert browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)") and all(
        u.startswith(server.url) or u.startswith("blob:")
        for u in browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    )
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "422" not in e["message"]]
    assert not errors, errors
