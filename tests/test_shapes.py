"""The procedural data of the embedded model and the frame analysis that scores prompt adherence."""

import numpy as np
import pytest

from engine.testbed.shapes_data import DIRECTIONS, Spec, adherence, centroid_track, parse_prompt, render, sample_spec


def test_prompts_round_trip_through_the_grammar():
    rng = np.random.default_rng(0)
    for _ in range(50):
        spec = sample_spec(rng)
        assert parse_prompt(spec.prompt()) == spec
    assert parse_prompt("a cat on a sofa") is None
    assert parse_prompt("a red blue circle moving right quickly on a dark background") is None  # two colours


@pytest.mark.parametrize("direction", list(DIRECTIONS))
@pytest.mark.parametrize("background", ["dark", "light", "textured"])
def test_rendered_videos_obey_their_prompt(direction, background):
    rng = np.random.default_rng(1)
    spec = Spec("red", "circle", direction, "quickly", background)
    video = render(spec, frames=17, size=64, rng=rng)
    assert video.shape == (17, 64, 64, 3) and video.dtype == np.uint8
    result = adherence(video, spec)
    assert result["colour"] and result["direction"], result
    dx, dy = DIRECTIONS[direction]
    assert np.sign(result["displacement"][0]) == np.sign(dx) or dx == 0
    assert np.sign(result["displacement"][1]) == np.sign(dy) or dy == 0


def test_adherence_catches_wrong_direction_colour_and_static_videos():
    rng = np.random.default_rng(2)
    right = Spec("blue", "square", "right", "quickly", "dark")
    video = render(right, 17, 64, rng)
    assert not adherence(video, Spec("blue", "square", "left", "quickly", "dark"))["direction"]
    assert not adherence(video, Spec("green", "square", "right", "quickly", "dark"))["colour"]
    still = np.repeat(video[:1], 17, axis=0)  # the shape does not move
    assert not adherence(still, right)["direction"]


def test_the_shape_stays_inside_the_frame():
    rng = np.random.default_rng(3)
    for _ in range(20):
        spec = sample_spec(rng)
        track = centroid_track(render(spec, 17, 64, rng), spec.colour)
        assert not np.isnan(track).any(), spec


def test_defaults_draw_exactly_the_embedded_models_data():
    """training.json repeats the shipped model only if the default data are the ones it was trained on (hashes of
    clips rendered by the code that made it)."""
    import hashlib

    rng = np.random.default_rng([0, 7])  # engine/testbed/train.py draws clip i of seed s from default_rng([s, i])
    spec = sample_spec(rng)
    video = render(spec, 49, 64, rng, 0.3)
    assert hashlib.sha256(video.tobytes()).hexdigest()[:16] == "c85ef6da80dfad21"
    video = render(Spec("purple", "square", "left", "slowly", "textured"), 17, 64, np.random.default_rng(11), 0.3)
    assert hashlib.sha256(video.tobytes()).hexdigest()[:16] == "f899f3660e81ec0e"


@pytest.mark.parametrize("texture", ["blocks", "smooth"])
@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_camera_pans_the_texture_and_the_prompt_still_holds(texture, direction):
    """v2 data: the textured background moves under a panning camera; the shape still moves as the prompt says."""
    spec = Spec("red", "circle", direction, "slowly", "textured")
    video = render(spec, 17, 64, np.random.default_rng(4), 0.3, camera=0.25, texture=texture)
    result = adherence(video, spec)
    assert result["colour"] and result["direction"], result
    corner = video[:, :8, :8].astype(np.float32)  # far from the shape's path: background only
    assert np.abs(corner[-1] - corner[0]).mean() > 3  # the view moved
    assert np.abs(corner[1] - corner[0]).mean() < np.abs(corner[-1] - corner[0]).mean()  # smoothly
    static = render(spec, 17, 64, np.random.default_rng(4), 0.3, texture=texture)
    assert np.array_equal(static[0, :8, :8], static[-1, :8, :8])


def test_textured_share():
    rng = np.random.default_rng(5)
    backgrounds = [sample_spec(rng, textured=0.5).background for _ in range(400)]
    assert 0.4 < backgrounds.count("textured") / 400 < 0.6
    assert {"dark", "light"} <= set(backgrounds)
