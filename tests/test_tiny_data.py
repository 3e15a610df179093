"""The tiny-trained preset's training data (benchmarks/tiny_data.py) and the held-out evaluation's
measures (benchmarks/held_out.py): deterministic per seed, held-out photos and scene seeds never in
training, captions that name the colours drawn, edge F1 and redness on known inputs."""
from __future__ import annotations

import numpy as np
import pytest

from benchmarks.held_out import edge_f1, redness
from benchmarks.tiny_data import (
    COLOURS, HELD_OUT_PHOTOS, HELD_OUT_SEED_START, TRAINING_PHOTOS, draw_scene, jitter_colours, load_photo,
    photo_pictures, scene_pictures, training_scene_seeds,
)
from sdcn_trt import InputError


def test_scenes_are_deterministic_per_seed_and_size():
    first, again = draw_scene(5, 128, 96), draw_scene(5, 128, 96)
    assert first.image.shape == (128, 96, 3) and first.image.dtype == np.uint8
    assert np.array_equal(first.image, again.image) and first.caption() == again.caption()
    assert not np.array_equal(first.image, draw_scene(6, 128, 96).image)
    pictures = scene_pictures(range(3), 64, 64)
    assert [p.name for p in pictures] == ["scene0", "scene1", "scene2"]
    assert all(np.array_equal(p.image, draw_scene(k, 64, 64).image) for k, p in enumerate(pictures))
    assert all(p.control.shape == (64, 64, 3) and set(np.unique(p.control)) <= {0, 255} for p in pictures)


def _has_colour(image: np.ndarray, word: str, tolerance: int = 20) -> bool:
    return bool((np.abs(image.astype(int) - COLOURS[word]).max(axis=2) <= tolerance).any())


@pytest.mark.parametrize("seed", range(0, 400, 7))
def test_captions_name_the_colours_drawn(seed):
    scene = draw_scene(seed, 128, 128)
    caption = scene.caption()
    for shape, colour in scene.objects:
        assert (f"{colour} text" if shape == "text" else f"{colour} {shape}") in caption
        assert colour not in scene.background_colours  # an object never vanishes into its background
    for colour in scene.background_colours:
        assert colour in caption.split(" on ")[-1]
    assert _has_colour(scene.image, scene.objects[-1][1])  # the last object drawn is on top: its colour is there
    assert _has_colour(scene.image, scene.background_colours[0])
    # colour words in the caption are exactly the colours drawn
    assert {w.strip(",") for w in caption.split() if w.strip(",") in COLOURS} == scene.colours
    recoloured = scene.caption("red")
    assert {w.strip(",") for w in recoloured.split(" on ")[0].split() if w.strip(",") in COLOURS} == {"red"}


def test_held_out_photos_and_seeds_are_never_training_data():
    assert set(HELD_OUT_PHOTOS).isdisjoint(TRAINING_PHOTOS)
    held_out = [load_photo(name) for name in HELD_OUT_PHOTOS]
    for name in TRAINING_PHOTOS:  # not under another name either (skimage's cat is chelsea)
        photo = load_photo(name)
        assert not any(photo.shape == h.shape and np.array_equal(photo, h) for h in held_out), name
    assert training_scene_seeds(10) == range(10)
    assert training_scene_seeds(5, offset=HELD_OUT_SEED_START - 5)[-1] == HELD_OUT_SEED_START - 1
    with pytest.raises(InputError, match=r"reach the held-out range \(seeds >= 1000000\); use fewer than 100"):
        training_scene_seeds(101, offset=HELD_OUT_SEED_START - 100)


def test_photo_variants_are_deterministic_and_jittered():
    photos = {"coffee": TRAINING_PHOTOS["coffee"], "horse": TRAINING_PHOTOS["horse"]}
    first, again = photo_pictures(photos, 3, seed=1), photo_pictures(photos, 3, seed=1)
    assert [p.name for p in first] == ["coffee"] * 3 + ["horse"] * 3
    assert all(np.array_equal(a.image, b.image) and np.array_equal(a.control, b.control) for a, b in zip(first, again))
    assert {p.caption for p in first} == {"a cup of coffee", "a horse"}
    assert all(min(p.image.shape[:2]) in (256, 320) and p.image.shape[2] == 3 for p in first)
    assert load_photo("horse").dtype == np.uint8 and load_photo("logo").shape[2] == 3
    rng = np.random.default_rng(0)
    image = load_photo("coffee")[:64, :64]
    assert not np.array_equal(jitter_colours(image, rng), image)


def test_edge_f1_and_redness_on_known_maps():
    square = np.zeros((64, 64), np.uint8)
    square[16, 16:48] = square[47, 16:48] = square[16:48, 16] = square[16:48, 47] = 255
    assert edge_f1(square, square) == 1.0
    assert edge_f1(np.roll(square, 2, axis=1), square) == 1.0  # within the 2-pixel tolerance
    assert edge_f1(np.roll(square, 2, axis=1), square, tolerance=1) < 0.6
    far = np.zeros_like(square)
    far[2, 2:10] = 255
    assert edge_f1(far, square) == 0.0 and edge_f1(np.zeros_like(square), square) == 0.0
    half = square.copy()
    half[:, 32:] = 0  # half of the edges found, all of them right: precision 1, recall ~0.5
    assert edge_f1(half, square) == pytest.approx(2 * 1 * 0.5 / 1.5, abs=0.03)
    red, blue = np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint8)
    red[..., 0], blue[..., 2] = 200, 150
    assert redness(red) == 200.0 and redness(blue) == -150.0
