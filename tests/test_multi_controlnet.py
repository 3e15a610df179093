"""Several ControlNets at once: parity with diffusers' MultiControlNetModel, run-time strengths, errors."""

import numpy as np
import pytest
import torch

from sdcn_trt import BackendConfig, ControlNetPipeline, GenerationConfig, InputError, WeightsError
from sdcn_trt.models.presets import load_preset


@pytest.fixture(scope="module")
def two_nets(tiny):
    """The tiny preset with a second ControlNet (another seed's weights)."""
    other = load_preset("tiny", seed=1).controlnet
    return tiny.with_more_controlnets((other,), source="tiny + tiny seed 1")


@pytest.fixture(scope="module")
def stripes():
    edges = np.zeros((64, 128, 3), np.uint8)
    edges[:, ::9] = 255
    return edges


def test_matches_diffusers_multicontrolnet(two_nets, photo, stripes):
    """diffusers' StableDiffusionControlNetPipeline with a MultiControlNetModel, DDIM configured as ldm,
    the same seeds, control maps and strengths: within 2 uint8 levels (its float32 DDIM table differs
    by ~2e-6 relative; it rounds where the reference truncates)."""
    from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
    from PIL import Image

    from sdcn_trt import preprocess

    config = GenerationConfig(prompt="a cat", a_prompt="", n_prompt="bad", image_resolution=64, ddim_steps=4,
                              scale=7.5, seed=5, controlnet_strengths=(0.8, 0.6))
    pipe = ControlNetPipeline(two_nets)
    ours = pipe.run(photo, config, control_images=[None, stripes])
    _, edges = preprocess.prepare(photo, 64, 100, 200)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    reference = StableDiffusionControlNetPipeline(
        vae=two_nets.vae, text_encoder=two_nets.text_encoder, tokenizer=two_nets.tokenizer, unet=two_nets.unet,
        controlnet=MultiControlNetModel(list(two_nets.controlnets)), scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    theirs = reference("a cat", [Image.fromarray(edges), Image.fromarray(stripes)], num_inference_steps=4,
                       guidance_scale=7.5, negative_prompt="bad", controlnet_conditioning_scale=[0.8, 0.6],
                       generator=torch.Generator().manual_seed(5), height=64, width=128, output_type="np").images[0]
    diff = np.abs(ours.images[0].astype(float) - theirs * 255)
    assert diff.max() <= 2.0, diff.max()
    single = ControlNetPipeline(two_nets).run(photo, config.replace(controlnet_strengths=(0.8, 0.0)),
                                              control_images=[None, stripes]).images[0]
    assert np.abs(single.astype(int) - ours.images[0]).max() > 2  # the second ControlNet mattered


def test_strength_zero_drops_a_controlnet_without_a_new_graph(tiny, two_nets, photo, stripes):
    """Strengths are an input: changing them (to 0 too) reuses the captured loop, and a zero strength
    gives exactly the one-ControlNet image."""
    config = GenerationConfig(image_resolution=64, ddim_steps=4)
    pipe = ControlNetPipeline(two_nets, BackendConfig(cuda_graph="loop"))
    both = pipe.run(photo, config.replace(controlnet_strengths=(1.0, 1.0)), control_images=[None, stripes])
    dropped = pipe.run(photo, config.replace(controlnet_strengths=(1.0, 0.0)), control_images=[None, stripes])
    assert len(pipe._loops) == 1
    alone = ControlNetPipeline(tiny).run(photo, config).images[0]
    assert np.array_equal(dropped.images[0], alone)
    assert not np.array_equal(both.images[0], alone)


def test_onnxruntime_runs_two_controlnets_like_torch(two_nets, photo, stripes):
    config = GenerationConfig(image_resolution=64, ddim_steps=4, schedule="control=2", controlnet_strengths=(1, 0.5))
    a = ControlNetPipeline(two_nets).run(photo, config, control_images=[None, stripes]).images[0]
    b = ControlNetPipeline(two_nets, "onnxruntime").run(photo, config, control_images=[None, stripes]).images[0]
    assert np.abs(a.astype(int) - b).max() <= 2


def test_counts_and_ranges_are_checked(two_nets, photo, stripes):
    pipe = ControlNetPipeline(two_nets)
    config = GenerationConfig(image_resolution=64, ddim_steps=1)
    with pytest.raises(InputError, match="this pipeline has 2 ControlNets: give control_images with 2 entries"):
        pipe.run(photo, config)
    with pytest.raises(InputError, match="3 control images for 2 ControlNets"):
        pipe.run(photo, config, control_images=[None, stripes, stripes])
    with pytest.raises(InputError, match="3 ControlNet strengths for 2 ControlNets"):
        pipe.run(photo, config.replace(controlnet_strengths=(1, 1, 1)), control_images=[None, stripes])
    with pytest.raises(InputError, match=r"controlnet_strengths\[1\] must be in 0..2.0, got 2.5"):
        config.replace(controlnet_strengths=(1, 2.5))
    with pytest.raises(InputError, match=r"controlnet_strengths\[0\] must be >= 0"):
        config.replace(controlnet_strengths=(-1, 1))
    with pytest.raises(InputError, match="strength must be in 0..2.0, got 3"):
        config.replace(strength=3)
    resized = pipe.run(photo, config, control_images=[None, stripes[:32, :64]])  # maps are resized to fit
    assert resized.images[0].shape == (64, 128, 3)


def test_controlnets_of_another_base_model_are_refused(tiny):
    from diffusers import ControlNetModel

    from sdcn_trt.models.presets import sd_configs

    cfg = sd_configs((32, 64), 1, (32, 32, 32, 32), 1, 128, 256, 2)["controlnet"]
    wide = ControlNetModel(**{**cfg, "cross_attention_dim": 1024})
    with pytest.raises(WeightsError, match="ControlNet 1 reads 1024-wide text .*the UNet reads 128-wide text"):
        tiny.with_more_controlnets((wide,), source="wide")
    narrow = ControlNetModel(**{**cfg, "block_out_channels": (32, 32)})
    with pytest.raises(WeightsError, match=r"ControlNet 1 has block widths \(32, 32\); the UNet has \(32, 64\)"):
        tiny.with_more_controlnets((narrow,), source="narrow")


def test_loading_and_cli(tiny, photo, stripes, tmp_path, capsys):
    import cv2

    from sdcn_trt.cli import main
    from sdcn_trt.models.presets import load_diffusers, save_diffusers

    second = load_preset("tiny", seed=1)
    save_diffusers(tiny, tmp_path / "sd", tmp_path / "cn_a")
    second.controlnet.save_pretrained(str(tmp_path / "cn_b"))
    loaded = load_diffusers(tmp_path / "sd", [tmp_path / "cn_a", tmp_path / "cn_b"])
    assert len(loaded.controlnets) == 2
    torch.testing.assert_close(loaded.controlnets[1].conv_in.weight, second.controlnet.conv_in.weight)
    cv2.imwrite(str(tmp_path / "cat.png"), photo)
    cv2.imwrite(str(tmp_path / "stripes.png"), stripes)
    rc = main(["generate", str(tmp_path / "cat.png"), "-o", str(tmp_path / "out"), "-q", "--sd-dir",
               str(tmp_path / "sd"), "--controlnet", str(tmp_path / "cn_a"), "--controlnet", str(tmp_path / "cn_b"),
               "--control-image", str(tmp_path / "stripes.png"), "--controlnet-strengths", "1", "0.5",
               "--image-resolution", "64", "--ddim-steps", "2"])
    assert rc == 0 and (tmp_path / "out" / "cat.png").is_file()
    rc = main(["generate", str(tmp_path / "cat.png"), "-o", str(tmp_path / "out2"), "-q", "--controlnet",
               str(tmp_path / "cn_b"), "--image-resolution", "64", "--ddim-steps", "1"])
    assert rc == 2 and "give control_images with 2 entries" in capsys.readouterr().err
