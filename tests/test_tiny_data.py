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
    # the mask covers what was drawn on top of the background: the last object's pixels, not the background's
    top = np.abs(scene.image.astype(int) - COLOURS[scene.objects[-1][1]]).max(axis=2) <= 20
    assert scene.mask.shape == scene.image.shape[:2] and scene.mask[top].mean() > 0.95
    back = np.abs(scene.image.astype(int) - COLOURS[scene.background_colours[0]]).max(axis=2) <= 20
    assert scene.mask[back].mean() < 0.05


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


def _train_tiny():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "train_tiny.py"
    spec = importlib.util.spec_from_file_location("train_tiny", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_tiny"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_training_batches_mix_whole_scenes_and_photo_crops():
    import torch

    train = _train_tiny()
    args = train.parse_args([])
    pictures = [train.LatentPicture(torch.full((4, 16, 16), 1.0), torch.zeros(4, 16, 16),
                                    torch.full((1, 128, 128), 255, dtype=torch.uint8), "a red circle on a white background", True),
                train.LatentPicture(torch.full((4, 32, 48), -1.0), torch.zeros(4, 32, 48),
                                    torch.zeros((1, 256, 384), dtype=torch.uint8), "a cat", False)]
    texts = {p: torch.full((77, 8), float(k)) for k, p in enumerate(
        ["", train.N_PROMPT, *[c for p in pictures for c in (p.caption, f"{p.caption}, {train.A_PROMPT}")]])}
    z0, control, text, keep = train.diffusion_batch(pictures, texts, np.random.default_rng(0), 16, 64, args)
    assert z0.shape == (64, 4, 16, 16) and control.shape == (64, 3, 128, 128) and text.shape == (64, 77, 8)
    scene = z0[:, 0, 0, 0] == 1.0  # the scene's latents are all 1, the photo's all -1
    assert 20 < int(scene.sum()) < 44  # p_scene = 0.5
    assert torch.all(control[scene] == 1.0) and torch.all(control[~scene] == 0.0)
    assert set(keep.tolist()) <= {0.0, 1.0}
    # 256-pixel crops: the 128-pixel scene does not fit, so the batch is all photo crops
    z0, control, _, _ = train.diffusion_batch(pictures, texts, np.random.default_rng(0), 32, 8, args)
    assert z0.shape == (8, 4, 32, 32) and torch.all(z0 == -1.0)


@pytest.mark.slow
def test_smoke_run_stops_at_its_wall_clock_budget_and_writes_everything(tmp_path):
    """--smoke with a budget of a few milliseconds: the clock is read before each step, so each phase
    stops after at most one step, and the preset, the ldm file, the sample sheets and the log are still
    written (about 3 minutes on 2 shared cores)."""
    import json
    import tempfile
    from pathlib import Path

    from sdcn_trt.models.presets import TRAINED_PRESETS, load_trained_preset

    train = _train_tiny()
    preset = str(TRAINED_PRESETS["tiny-trained"])
    assert train.main(["--smoke", "--vae-from", preset, "--init-from", preset, "--max-minutes", "0.0001"]) == 0
    smoke = Path(tempfile.gettempdir()) / "tiny_trained_smoke"
    record = json.loads((smoke / "preset" / "config.json").read_text())["training"]
    steps = (record["steps"]["unet_controlnet_128px"], record["steps"]["unet_controlnet_256px"])
    assert steps[0] <= 1 and steps[1] <= 1, steps  # of 6 and 4 planned
    assert record["max_minutes"] == 0.0001 and record["init_from"].startswith(preset)
    assert "camera" in record["held_out_photos"] and "camera" not in record["photos"]
    log = (smoke / "train-tiny.md").read_text()
    assert f"{steps[0]} steps x 8 crops of 128 px, then {steps[1]} x 4 of 256 px (of 6 + 4 planned; wall-clock budget" in log
    assert (smoke / "ldm" / "samples_final.png").is_file() and (smoke / "ldm" / "tiny_trained.safetensors").is_file()
    load_trained_preset(smoke / "preset")  # the file and its sha256 in config.json agree


@pytest.mark.slow
def test_held_out_table_measures_each_model_once(tmp_path, monkeypatch):
    import json

    import benchmarks.held_out as held_out
    from sdcn_trt.models.presets import TRAINED_PRESETS

    out = tmp_path / "held-out.md"
    argv = ["--model", f"shipped={TRAINED_PRESETS['tiny-trained']}", "--scenes", "2", "--steps", "1", "--out", str(out)]
    assert held_out.main(argv) == 0
    entry = json.loads(out.with_suffix(".json").read_text())[0]
    assert entry["label"] == "shipped" and entry["settings"] == {"scenes": 2, "size": 256, "steps": 1, "colour_seeds": 5}
    assert len(entry["result"]["scenes"]["matched"]) == 2 and len(entry["result"]["colour"]["red_vs_blue_redness"]) == 5
    colour = entry["result"]["colour"]
    assert colour["measured_on"] == "objects" and len(colour["whole_image_red_vs_blue_redness"]) == 5
    assert colour["passed"] == sum(r > b for r, b in colour["red_vs_blue_redness"])
    assert entry["vae"]["scenes"]["mean_abs_error"] > 0
    assert "| shipped | `" in out.read_text() and "goals met" in out.read_text()

    def no_second_measurement(*_args, **_kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(held_out, "evaluate", no_second_measurement)
    assert held_out.main(argv) == 0  # same label, weights and settings: taken from the .json
    with pytest.raises(AssertionError, match="measured again"):
        held_out.main([*argv[:-4], "--steps", "2", "--out", str(out)])
    # another model's row is added; the rows of models not given this time stay
    monkeypatch.setattr(held_out, "evaluate", lambda pipe, settings: entry["result"])
    assert held_out.main(["--model", f"again={TRAINED_PRESETS['tiny-trained']}", *argv[2:]]) == 0
    assert [e["label"] for e in json.loads(out.with_suffix(".json").read_text())] == ["shipped", "again"]
