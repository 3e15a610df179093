"""The tiny-trained preset (a small model trained here, not SD1.5): it loads, its images follow the
control, prompt / guidance / guess mode matter, and damaged files are named with how to regenerate them."""
from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest
import torch

from sdcn_trt import ControlNetPipeline, GenerationConfig, InputError, WeightsError
from sdcn_trt.images import PHOTO_PROMPTS, sample_photos
from sdcn_trt.models.presets import CONFIG_FILE, TRAINED_PRESETS, WEIGHTS_FILE, load_preset, load_trained_preset, trained_configs
from benchmarks.held_out import TRAINING_CHECK_PHOTOS, Settings, colour_check, follow_scores
from benchmarks.tiny_data import HELD_OUT_PHOTOS, HELD_OUT_SEED_START, draw_scene, load_photo
from tests.conftest import pixel_diff

PRESET_DIR = TRAINED_PRESETS["tiny-trained"]


@pytest.fixture(scope="module")
def trained():
    return load_preset("tiny-trained")


@pytest.fixture(scope="module")
def trained_pipe(trained):
    return ControlNetPipeline(trained, "torch")


@pytest.fixture(scope="module")
def small_cat():
    return sample_photos(["chelsea"])["chelsea"]


def test_preset_loads_its_configs_and_the_tiny_clip(trained, tiny):
    record = json.loads((PRESET_DIR / CONFIG_FILE).read_text())
    assert record["configs"] == json.loads(json.dumps(trained_configs()))
    assert (PRESET_DIR / WEIGHTS_FILE).stat().st_size <= 25e6
    assert trained.source.startswith("preset:tiny-trained:sha256=")
    assert trained.vae_scale_factor == 8 and trained.scaling_factor == pytest.approx(0.18215)
    for module in trained.modules().values():
        assert all(p.dtype == torch.float32 and not p.is_meta for p in module.parameters())
        assert not any(b.is_meta for b in module.buffers())
    # the text encoder is the tiny preset's seeded random CLIP, stored in fp16
    mine = trained.text_encoder.state_dict()
    for key, value in tiny.text_encoder.state_dict().items():
        expected = value.half().float() if value.is_floating_point() else value
        assert torch.equal(mine[key], expected), key


def test_from_preset_and_the_cli(tmp_path, photo):
    from sdcn_trt.cli import main

    pipe = ControlNetPipeline.from_preset("tiny-trained")
    assert pipe.components.source.startswith("preset:tiny-trained")
    cv2.imwrite(str(tmp_path / "cat.png"), photo)
    rc = main(["generate", str(tmp_path / "cat.png"), "-o", str(tmp_path / "out"), "--preset", "tiny-trained",
               "--ddim-steps", "2", "--image-resolution", "64"])
    assert rc == 0 and (tmp_path / "out" / "cat.png").is_file()


def test_images_follow_the_control(trained_pipe):
    """Training photos: the canny map of each output matches its own control map far better than
    another photo's. Measured (edge F1 within 2 px, 10 DDIM steps, contest size): matched 0.572 / 0.464 /
    0.532, mean of the mismatched per output 0.347 / 0.307 / 0.193; means 0.523 vs 0.282."""
    config = GenerationConfig(ddim_steps=10)
    inputs = [(photo, PHOTO_PROMPTS[name]) for name, photo in sample_photos(list(TRAINING_CHECK_PHOTOS)).items()]
    matched, mismatched, _ = follow_scores(trained_pipe, inputs, config, "others")
    assert np.mean(matched) >= 0.45, (matched, mismatched)
    assert all(m > x + 0.1 for m, x in zip(matched, mismatched)), (matched, mismatched)
    assert np.mean(matched) > 1.6 * np.mean(mismatched), (matched, mismatched)


HELD_OUT_FAST = Settings(scenes=4, size=128, steps=8)


def test_images_follow_edges_never_seen(trained_pipe):
    """Held-out drawn scenes (seeds the training never used) and the two held-out photos, small and
    few steps. Measured on the shipped weights: scenes 0.449 vs 0.141 mismatched (3.2x), photos 0.316
    vs 0.211 (1.5x); at 256 px and 10 steps (issue #24's goals, >= 0.30 and >= 2x): scenes 0.503 vs 0.113,
    photos 0.367 vs 0.144 (benchmarks/results/held-out-tiny-trained.md). The model before: 0.245 / 0.148."""
    config = GenerationConfig(image_resolution=HELD_OUT_FAST.size, ddim_steps=HELD_OUT_FAST.steps)
    scenes = [draw_scene(HELD_OUT_SEED_START + k, HELD_OUT_FAST.size, HELD_OUT_FAST.size)
              for k in range(HELD_OUT_FAST.scenes)]
    matched, mismatched, _ = follow_scores(trained_pipe, [(s.image, s.caption()) for s in scenes], config, "others")
    assert np.mean(matched) >= 0.35 and np.mean(matched) >= 2.5 * np.mean(mismatched), (matched, mismatched)
    photos = [(load_photo(name), caption) for name, caption in HELD_OUT_PHOTOS.items()]
    matched, mismatched, _ = follow_scores(trained_pipe, photos, config, "rotated")
    assert np.mean(matched) >= 0.25 and np.mean(matched) >= 1.4 * np.mean(mismatched), (matched, mismatched)


def test_colour_words_in_the_prompt_colour_the_objects(trained_pipe):
    """One held-out scene's control, every object called red, then blue: the red prompt's objects are
    the redder (mean R - mean B over the scene's object pixels) on at least 4 of 5 seeds (issue #24's
    goal). Measured on the shipped weights at these small settings: 5 of 5 (the whole image: 1 of 5, the
    background goes the other way: benchmarks/held_out.py says why)."""
    pairs = colour_check(trained_pipe, HELD_OUT_FAST)
    assert sum(red > blue for red, blue in pairs["objects"]) >= 4, pairs


def test_prompt_guidance_and_guess_mode_change_the_image(trained_pipe, small_cat):
    config = GenerationConfig(prompt="a cat", image_resolution=128, ddim_steps=6)
    base = trained_pipe.run(small_cat, config).images[0]
    for change in (dict(scale=1.0), dict(guess_mode=True), dict(prompt="a cup of coffee")):
        other = trained_pipe.run(small_cat, config.replace(**change)).images[0]
        assert pixel_diff(base, other).mean() > 2.0, change


def test_full_schedule_is_deterministic_per_seed(trained_pipe, small_cat):
    config = GenerationConfig(prompt="a cat", image_resolution=128, ddim_steps=20, seed=7)
    first = trained_pipe.run(small_cat, config).images[0]
    assert np.array_equal(first, trained_pipe.run(small_cat, config).images[0])
    assert pixel_diff(first, trained_pipe.run(small_cat, config.replace(seed=8)).images[0]).mean() > 1.0


def test_single_file_round_trip(trained, tmp_path, small_cat):
    """The ldm single file + YAML of the trained model loads back with the single-file loader, exactly."""
    from sdcn_trt.models.single_file import load_single_file
    from sdcn_trt.models.ldm_layout import save_single_file

    save_single_file(trained, tmp_path / "m.safetensors", tmp_path / "m.yaml")
    config = GenerationConfig(prompt="a cat", image_resolution=64, ddim_steps=4)
    expected = ControlNetPipeline(trained).run(small_cat, config).images[0]
    for yaml_path in (tmp_path / "m.yaml", None):
        loaded = load_single_file(tmp_path / "m.safetensors", yaml_path)
        assert np.array_equal(ControlNetPipeline(loaded).run(small_cat, config).images[0], expected)


def test_fp16_load_and_the_content_key(trained):
    """precision="fp16": UNet, ControlNet and VAE in fp16, CLIP in fp32; the weights are keyed by the
    file's sha256 (exports are cached by it), the same key on every load."""
    half = load_preset("tiny-trained", precision="fp16")
    assert half.precision == "fp16" and half.unet.dtype == torch.float16 and half.vae.dtype == torch.float16
    assert next(half.controlnet.parameters()).dtype == torch.float16
    assert next(half.text_encoder.parameters()).dtype == torch.float32
    assert trained.weights_id() == load_preset("tiny-trained").weights_id()
    with pytest.raises(InputError, match="precision"):
        load_preset("tiny-trained", precision="int8")


def test_a_trained_preset_takes_no_seed():
    with pytest.raises(InputError, match="'tiny-trained' has trained weights, so it takes no seed"):
        load_preset("tiny-trained", seed=3)


@pytest.fixture
def preset_copy(tmp_path):
    folder = tmp_path / "preset"
    shutil.copytree(PRESET_DIR, folder)
    return folder


def test_damaged_weights_name_the_file_and_the_script(preset_copy):
    weights = preset_copy / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=rf"{WEIGHTS_FILE} are damaged: sha256 .*`python scripts/train_tiny.py`"):
        load_trained_preset(preset_copy)
    weights.unlink()
    with pytest.raises(WeightsError, match=rf"preset weights not found: .*{WEIGHTS_FILE}; regenerate it"):
        load_trained_preset(preset_copy)


def test_damaged_or_mismatched_config(preset_copy):
    config = preset_copy / CONFIG_FILE
    record = json.loads(config.read_text())
    truncated = preset_copy / "truncated.safetensors"
    truncated.write_bytes((preset_copy / WEIGHTS_FILE).read_bytes()[:1000])
    import hashlib

    config.write_text(json.dumps({**record, "weights": truncated.name,
                                  "sha256": hashlib.sha256(truncated.read_bytes()).hexdigest()}))
    with pytest.raises(WeightsError, match="cannot read preset weights .*truncated.safetensors"):
        load_trained_preset(preset_copy)
    record["configs"]["unet"]["block_out_channels"] = [32, 64, 64]
    config.write_text(json.dumps(record))
    with pytest.raises(WeightsError, match="unet weights in .* do not match config.json"):
        load_trained_preset(preset_copy)
    config.write_text("{not json")
    with pytest.raises(WeightsError, match="preset config .*config.json is damaged"):
        load_trained_preset(preset_copy)
    config.unlink()
    with pytest.raises(WeightsError, match="preset config not found: .*train_tiny.py"):
        load_trained_preset(preset_copy)
