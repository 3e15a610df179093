import pytest

from sdcn_trt import GenerationConfig, InputError


def test_defaults_are_the_contest_call():
    c = GenerationConfig()
    assert (c.prompt, c.num_samples, c.image_resolution, c.ddim_steps, c.scale, c.seed) == ("a bird", 1, 256, 20, 9.0, 2946901)
    assert c.positive_prompt == "a bird, best quality, extremely detailed"
    assert GenerationConfig(a_prompt="").positive_prompt == "a bird"


@pytest.mark.parametrize("field,value,message", [
    ("ddim_steps", 0, "ddim_steps must be >= 1"),
    ("ddim_steps", 2.5, "ddim_steps must be an integer"),
    ("num_samples", 0, "num_samples must be >= 1"),
    ("image_resolution", 32, "image_resolution must be >= 64"),
    ("scale", -1.0, "scale must be >= 0"),
    ("strength", -0.5, "strength must be >= 0"),
    ("eta", float("nan"), "eta must be a finite number"),
    ("low_threshold", -1, "low_threshold must be >= 0"),
    ("high_threshold", -5, "high_threshold must be >= 0"),
    ("seed", 2**32, "seed must be -1 (random) or in 0..4294967295"),
    ("seed", -2, "seed must be -1 (random)"),
    ("seed", "7", "seed must be an integer"),
    ("prompt", None, "prompt must be a string"),
    ("guess_mode", "yes", "guess_mode must be True or False"),
])
def test_bad_values_raise_one_clear_error(field, value, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        GenerationConfig(**{field: value})


def test_thresholds_order():
    with pytest.raises(InputError, match="must not exceed high_threshold"):
        GenerationConfig(low_threshold=200, high_threshold=100)


def test_control_scales_match_the_original_formula():
    unc, cond = GenerationConfig(strength=0.7).control_scales()
    assert unc == cond == [0.7] * 13
    unc, cond = GenerationConfig(strength=2.0, guess_mode=True).control_scales()
    assert unc == [0.0] * 13
    # strength * 0.825 ** (12 - i): 0.825 ** k written out exactly (decimal arithmetic, k = 12 .. 0)
    powers = [0.099413962063371238768100738525390625, 0.120501772198025743961334228515625,
              0.146062754179425144195556640625, 0.177045762641727447509765625, 0.214600924414215087890625,
              0.260122332623291015625, 0.315299797119140625, 0.382181572265625, 0.463250390625, 0.561515625,
              0.680625, 0.825, 1.0]
    assert cond == pytest.approx([2.0 * p for p in powers], rel=1e-12)
    assert cond[-1] == 2.0 and cond[0] == pytest.approx(0.19882792412674247753620147705078125, rel=1e-12)
    # a smaller model has fewer residuals: the original's zip() takes the first ones
    assert GenerationConfig(guess_mode=True).control_scales(5)[1] == pytest.approx(powers[:5], rel=1e-12)


def test_compiled_networks_name_what_a_built_backend_builds():
    from sdcn_trt import BackendConfig
    from sdcn_trt.config import NETWORKS

    assert BackendConfig(backend="inductor").compiled_networks is None  # the default: everything is built
    config = BackendConfig(backend="inductor", compiled_networks=["fused_step", "vae_decoder", "fused_step"])
    assert config.compiled_networks == ("fused_step", "vae_decoder")  # a tuple, duplicates dropped
    assert [n for n in NETWORKS if config.builds(n)] == ["fused_step", "vae_decoder"]
    assert all(BackendConfig(backend=b).builds(n) for b in ("inductor", "tensorrt") for n in NETWORKS)
    for backend in ("torch", "onnxruntime"):  # build nothing, with or without the field
        assert not any(BackendConfig(backend=backend, compiled_networks=("fused_step",)).builds(n) for n in NETWORKS)


@pytest.mark.parametrize("value,message", [
    (("fused_step", "unet2"), "unknown network 'unet2' in compiled_networks; valid names: text_encoder, "
                              "control_hint, controlnet, unet, fused_step, unet_deep, unet_shallow, vae_decoder, "
                              "vae_encoder"),
    (["clip", "vae"], "unknown networks 'clip', 'vae' in compiled_networks; valid names: text_encoder, "),
    ((), "compiled_networks is empty: name at least one network, or give None for all; valid names: text_encoder, "),
    ("fused_step", "compiled_networks must be a list of network names, got 'fused_step'; e.g. ('fused_step',) "
                   "(None: all); valid names: text_encoder, "),
])
def test_bad_compiled_networks_raise_one_error_naming_the_valid_names(value, message):
    from sdcn_trt import BackendConfig

    with pytest.raises(InputError) as raised:
        BackendConfig(backend="inductor", compiled_networks=value)
    assert str(raised.value).startswith(message)
