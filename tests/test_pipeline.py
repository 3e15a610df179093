"""The torch pipeline on the tiny preset: determinism, call styles, precision, and bad input."""
import logging

import numpy as np
import pytest
import torch

from sdcn_trt import BackendConfig, BackendUnavailableError, ControlNetPipeline, InputError, backend_available
from tests.conftest import pixel_diff


def test_two_steps_deterministic_per_seed_and_differ_across_seeds(tiny_pipe, photo, fast_config):
    a = tiny_pipe.run(photo, fast_config).images[0]
    b = tiny_pipe.run(photo, fast_config).images[0]
    c = tiny_pipe.run(photo, fast_config.replace(seed=1)).images[0]
    assert a.shape == (64, 128, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert pixel_diff(a, c).mean() > 5


def test_initial_noise_is_the_reference_global_draw(tiny_pipe, photo, fast_config, monkeypatch):
    seen = []
    real = torch.randn

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out.clone())
        return out

    monkeypatch.setattr(torch, "randn", spy)
    tiny_pipe.run(photo, fast_config.replace(seed=2946901))
    torch.manual_seed(2946901)
    assert torch.equal(seen[0], real(1, 4, 8, 16))  # torch.manual_seed(seed); torch.randn(B, 4, H/8, W/8)


def test_process_returns_inverted_map_then_images(tiny_pipe, photo):
    out = tiny_pipe.process(photo, "a cat", "best quality", "lowres", 2, 64, 2, False, 1.0, 9.0, 7, 0.0, 100, 200)
    assert len(out) == 3
    edges = out[0]
    assert edges.shape == (64, 128, 3) and set(np.unique(edges)) <= {0, 255} and (edges == 0).any()
    assert out[1].shape == out[2].shape == (64, 128, 3)
    assert not np.array_equal(out[1], out[2])  # two samples from one noise draw differ


def test_settings_change_the_image(tiny_pipe, photo, fast_config):
    base = tiny_pipe.run(photo, fast_config).images[0]
    for change in (dict(guess_mode=True), dict(eta=1.0), dict(strength=0.0), dict(scale=1.0), dict(prompt="a dog")):
        other = tiny_pipe.run(photo, fast_config.replace(**change)).images[0]
        assert pixel_diff(base, other).max() > 0, change


def test_eta_noise_is_deterministic(tiny_pipe, photo, fast_config):
    config = fast_config.replace(eta=0.5, ddim_steps=4)
    assert np.array_equal(tiny_pipe.run(photo, config).images[0], tiny_pipe.run(photo, config).images[0])


def test_hint_once_per_image_equals_the_controlnet_per_step(tiny):
    """ControlHintNet + FusedStepNet compute what ControlNetModel computes on the raw control image."""
    from sdcn_trt.export.descriptors import ShapeSpec, get_descriptor

    spec = ShapeSpec(1, 64, 64)
    control = get_descriptor("control_hint", tiny).sample_inputs(spec)["control"]
    feed = get_descriptor("fused_step", tiny).sample_inputs(spec)
    with torch.no_grad():
        feed["hint"] = get_descriptor("control_hint", tiny).build_module()(control)
        split = get_descriptor("fused_step", tiny).build_module()(*feed.values())
        x = torch.cat([feed["latents"]] * 2)
        t = feed["timestep"].expand(2)
        down, mid = tiny.controlnet(x, t, encoder_hidden_states=feed["text_embeddings"],
                                    controlnet_cond=torch.cat([control] * 2), return_dict=False)
        whole = tiny.unet(x, t, encoder_hidden_states=feed["text_embeddings"], down_block_additional_residuals=down,
                          mid_block_additional_residual=mid).sample
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
    assert isinstance(tiny.controlnet.controlnet_cond_embedding, torch.nn.Module)
    assert not isinstance(tiny.controlnet.controlnet_cond_embedding, torch.nn.Identity)  # the shared model is intact


def test_guess_mode_unconditional_half_gets_no_control(tiny):
    """Zero scales on the unconditional half equal a UNet call with no residuals at all."""
    from sdcn_trt.export.descriptors import ShapeSpec, get_descriptor

    desc = get_descriptor("fused_step", tiny)
    feed = desc.sample_inputs(ShapeSpec(1, 64, 64))
    feed["control_scales"] = torch.tensor([[[0.0] * desc.dims.num_scales, [1.0] * desc.dims.num_scales]])
    with torch.no_grad():
        eps = desc.build_module()(*feed.values())
        plain = tiny.unet(feed["latents"], feed["timestep"], encoder_hidden_states=feed["text_embeddings"][:1]).sample
    torch.testing.assert_close(eps[:1], plain, rtol=1e-5, atol=1e-5)


def test_call_matches_process(tiny_pipe, photo):
    out = tiny_pipe("a cat", photo, num_inference_steps=2, guidance_scale=7.0, seed=3, image_resolution=64,
                    a_prompt="best", negative_prompt="bad")
    ref = tiny_pipe.process(photo, "a cat", "best", "bad", 1, 64, 2, False, 1.0, 7.0, 3, 0.0, 100, 200)
    assert np.array_equal(out.images[0], ref[1])
    assert set(out.timings) == {"preprocess", "text", "denoise", "decode"}


def test_generator_seed_none_and_pil(tiny_pipe, photo):
    gen = torch.Generator().manual_seed(11)
    a = tiny_pipe("x", photo, num_inference_steps=1, image_resolution=64, generator=gen, output_type="pil")
    b = tiny_pipe("x", photo, num_inference_steps=1, image_resolution=64, seed=11)
    assert np.array_equal(np.asarray(a.images[0]), b.images[0])
    random_seeded = tiny_pipe("x", photo, num_inference_steps=1, image_resolution=64)
    assert 0 <= random_seeded.seed <= 65535


def test_control_image_is_used_as_is(tiny_pipe, fast_config):
    edges = np.zeros((64, 64, 3), np.uint8)
    edges[:, 20] = 255
    out = tiny_pipe.run(edges, fast_config, control_image=True)
    assert np.array_equal(out.control, edges) and out.images[0].shape == (64, 64, 3)


def test_fp16_agrees_with_fp32(tiny, photo, fast_config):
    """fp16 weights and activations on the same seed: within 3 uint8 levels on average (CPU fp16)."""
    fp32 = ControlNetPipeline(tiny).run(photo, fast_config).images[0]
    fp16 = ControlNetPipeline(tiny, precision="fp16").run(photo, fast_config).images[0]
    diff = pixel_diff(fp32, fp16)
    assert diff.mean() <= 3.0, diff.mean()
    assert next(tiny.unet.parameters()).dtype == torch.float32  # shared components stay fp32


def test_progress_callback(tiny_pipe, photo, fast_config):
    seen = []
    tiny_pipe.run(photo, fast_config.replace(ddim_steps=4), progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_long_prompt_warns(tiny_pipe, photo, fast_config, caplog):
    with caplog.at_level(logging.WARNING):
        tiny_pipe.run(photo, fast_config.replace(prompt="bird " * 90, a_prompt=""))
    assert "CLIP reads 77" in caplog.text


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_inference_steps=0), "ddim_steps must be >= 1"),
    (dict(guidance_scale=-1.0), "scale must be >= 0"),
    (dict(low_threshold=-1), "low_threshold must be >= 0"),
    (dict(seed=2**40), "seed must be -1"),
    (dict(output_type="latent"), "output_type must be 'np' or 'pil'"),
])
def test_bad_call_arguments(tiny_pipe, photo, kwargs, message):
    with pytest.raises(InputError, match=message):
        tiny_pipe("x", photo, image_resolution=64, **kwargs)


def test_bad_images(tiny_pipe, fast_config):
    with pytest.raises(InputError, match="zero size"):
        tiny_pipe.run(np.zeros((0, 10, 3), np.uint8), fast_config)
    with pytest.raises(InputError, match="dtype uint16"):
        tiny_pipe.run(np.zeros((10, 10, 3), np.uint16), fast_config)


@pytest.mark.skipif(backend_available("tensorrt")[0], reason="TensorRT and a GPU are here: nothing is missing")
def test_tensorrt_backend_unavailable_says_why(tiny):
    with pytest.raises(BackendUnavailableError, match="backend 'tensorrt' is unavailable: .*(TensorRT|GPU)"):
        ControlNetPipeline(tiny, "tensorrt")


def test_backend_choices(tiny):
    with pytest.raises(InputError, match="unknown backend 'jax'; choose one of torch, onnxruntime, tensorrt"):
        ControlNetPipeline(tiny, "jax")
    with pytest.raises(InputError, match="unknown backend options"):
        ControlNetPipeline(tiny, "torch", devcie="cpu")
    with pytest.raises(InputError, match="unknown precision 'bf16'"):
        ControlNetPipeline(tiny, BackendConfig(precision="bf16"))
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="no CUDA GPU"):
            ControlNetPipeline(tiny, "torch", device="cuda")
