import pytest
import torch

from sdcn_trt import ControlNetPipeline, InputError, WeightsError
from sdcn_trt.models.presets import load_diffusers, load_preset, save_diffusers


def test_preset_is_seeded_and_control_path_is_live(tiny):
    again = load_preset("tiny", seed=0)
    other = load_preset("tiny", seed=1)
    w = lambda c: c.unet.conv_in.weight  # noqa: E731
    assert torch.equal(w(tiny), w(again)) and not torch.equal(w(tiny), w(other))
    assert tiny.controlnet.controlnet_mid_block.weight.abs().sum() > 0  # zero convs re-drawn
    assert tiny.vae_scale_factor == 8


def test_unknown_preset():
    with pytest.raises(InputError, match="unknown preset .huge.; available presets: sd15-random, tiny, tiny-trained"):
        load_preset("huge")


def test_diffusers_folders_round_trip(tiny, tmp_path, photo, fast_config):
    save_diffusers(tiny, tmp_path / "sd", tmp_path / "cn")
    loaded = load_diffusers(tmp_path / "sd", tmp_path / "cn")
    for name, module in tiny.modules().items():
        for k, v in module.state_dict().items():
            assert torch.equal(v, loaded.modules()[name].state_dict()[k]), (name, k)
    a = ControlNetPipeline(tiny).run(photo, fast_config).images[0]
    b = ControlNetPipeline.from_pretrained(tmp_path / "sd", tmp_path / "cn").run(photo, fast_config).images[0]
    assert (a == b).all()


def test_missing_folders_and_weights(tiny, tmp_path):
    with pytest.raises(WeightsError, match="Stable Diffusion folder not found"):
        load_diffusers(tmp_path / "nope", tmp_path / "cn")
    save_diffusers(tiny, tmp_path / "sd", tmp_path / "cn")
    with pytest.raises(WeightsError, match="ControlNet not found"):
        load_diffusers(tmp_path / "sd", tmp_path / "missing_cn")
    (tmp_path / "sd" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightsError, match="UNet weights not found in"):
        load_diffusers(tmp_path / "sd", tmp_path / "cn")
    save_diffusers(tiny, tmp_path / "sd", tmp_path / "cn")
    (tmp_path / "sd" / "vae" / "config.json").unlink()
    with pytest.raises(WeightsError, match="VAE config not found"):
        load_diffusers(tmp_path / "sd", tmp_path / "cn")
