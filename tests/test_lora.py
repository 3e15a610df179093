"""LoRA: both file layouts merged exactly as diffusers' load_lora_weights + fuse_lora, exact unmerge,
the pipeline and CLI entry points, and every refusal."""
from __future__ import annotations

import pytest
import torch

from sdcn_trt.errors import InputError, WeightsError
from sdcn_trt.models.ldm_layout import unet_ldm_names
from sdcn_trt.models.lora import (
    STRENGTH_LIMIT, apply_loras, check_strength, load_lora, merge_lora, parse_lora_arg, unmerge_lora,
)
from sdcn_trt.models.presets import load_preset

from .lora_files import TEXT_MODULES, UNET_MODULES, kohya_state, peft_state, random_factors, write


@pytest.fixture(scope="module")
def factors(tiny):
    """Random rank-4 factors for ten UNet modules (Linears, 1x1 and 3x3 convolutions) and three CLIP Linears."""
    return random_factors(tiny.unet, UNET_MODULES, 4, seed=1), random_factors(tiny.text_encoder, TEXT_MODULES, 4, seed=2)


def _states(components):
    return {net: {k: v.clone() for k, v in getattr(components, net).state_dict().items()}
            for net in ("unet", "text_encoder")}


def _diffusers_fused(path, strength):
    """The tiny preset with the file loaded and fused by diffusers itself."""
    pytest.importorskip("peft")
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    c = load_preset("tiny", seed=0)
    pipe = StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=strength)
    pipe.unload_lora_weights()  # leaves the fused weights in plain modules
    return _states(c)


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_merge_equals_diffusers_fuse_lora(layout, factors, tmp_path):
    unet, text = factors
    state = kohya_state(unet, text, alpha=2.0) if layout == "kohya" else peft_state(unet, text)
    path = write(state, tmp_path / f"{layout}.safetensors")
    ours = load_preset("tiny", seed=0)
    before = _states(ours)
    record = apply_loras(ours, [(path, 0.7)])
    merged, expected = _states(ours), _diffusers_fused(path, 0.7)
    for net in ("unet", "text_encoder"):
        changed = {k for k in before[net] if not torch.equal(before[net][k], merged[net][k])}
        assert changed == {k for k in before[net] if not torch.equal(before[net][k], expected[net][k])}
        assert len(changed) == len(unet if net == "unet" else text)
        for key in changed:
            torch.testing.assert_close(merged[net][key], expected[net][key], rtol=0, atol=1e-7)
    unmerge_lora(ours, record)
    assert all(torch.equal(before[n][k], v) for n, s in _states(ours).items() for k, v in s.items())
    assert ours.source == "preset:tiny:seed=0"


def test_kohya_ldm_names_merge_like_diffusers_names(factors, tmp_path):
    """kohya files that name the UNet the ldm way (input_blocks/middle_block/output_blocks) land on the
    same modules: ldm_layout's tables, not diffusers' SDXL heuristics."""
    unet, text = factors
    names = unet_ldm_names(load_preset("tiny").unet)
    ldm = {name: names[name + ".weight"][: -len(".weight")] for name in unet}
    assert ldm["up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2"] == \
        "output_blocks.3.1.transformer_blocks.0.ff.net.2"
    assert ldm["down_blocks.1.resnets.0.conv1"] == "input_blocks.3.0.in_layers.2"
    assert ldm["up_blocks.0.resnets.1.time_emb_proj"] == "output_blocks.1.0.emb_layers.1"
    by_diffusers = write(kohya_state(unet, text, 3.0), tmp_path / "a.safetensors")
    by_ldm = write(kohya_state(unet, text, 3.0, unet_names=ldm), tmp_path / "b.safetensors")
    a, b = load_preset("tiny"), load_preset("tiny")
    apply_loras(a, [(by_diffusers, -0.5)])
    apply_loras(b, [(by_ldm, -0.5)])
    merged_b = _states(b)
    assert all(torch.equal(v, merged_b[n][k]) for n, s in _states(a).items() for k, v in s.items())


def test_adapter_metadata_alphas_like_diffusers(factors, tmp_path):
    """diffusers-saved files keep lora_alpha / alpha_pattern / use_rslora in the safetensors header."""
    import json

    from safetensors.torch import save_file

    unet, text = factors
    meta = {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"to_k": 2.0}, "unet.target_modules": list(unet),
            "text_encoder.r": 4, "text_encoder.lora_alpha": 4, "text_encoder.use_rslora": True,
            "text_encoder.target_modules": list(text)}
    path = tmp_path / "meta.safetensors"
    save_file({k: v.contiguous() for k, v in peft_state(unet, text).items()}, str(path),
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    c = load_preset("tiny")
    before = _states(c)
    apply_loras(c, [(path, 0.6)])
    merged, expected = _states(c), _diffusers_fused(path, 0.6)
    assert all(torch.equal(v, expected[n][k]) for n, s in merged.items() for k, v in s.items())
    for name, scale in (("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 8 / 4),
                        ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", 2 / 4)):
        down, up = unet[name]
        torch.testing.assert_close(merged["unet"][name + ".weight"],
                                   before["unet"][name + ".weight"] + (up @ down) * (scale * 0.6), rtol=0, atol=1e-6)
    down, up = text[TEXT_MODULES[0]]  # rsLoRA: alpha / sqrt(rank)
    torch.testing.assert_close(merged["text_encoder"][TEXT_MODULES[0] + ".weight"],
                               before["text_encoder"][TEXT_MODULES[0] + ".weight"] + (up @ down) * (4 / 2 * 0.6),
                               rtol=0, atol=1e-6)
    dora = tmp_path / "dora.safetensors"
    save_file({k: v.contiguous() for k, v in peft_state(unet, {}).items()}, str(dora),
              metadata={"lora_adapter_metadata": json.dumps({"unet.use_dora": True})})
    with pytest.raises(WeightsError, match="DoRA adapters \\(unet\\) are not supported"):
        load_lora(dora, c)


def test_old_diffusers_attention_processor_names(factors, tmp_path):
    """`attn1.processor.to_q_lora.down.weight`, CLIP's `self_attn.to_q_lora` and `mlp.fc1.lora_linear_layer`:
    the same modules as the PEFT names."""
    unet, text = factors
    old = {}
    for name, (down, up) in unet.items():
        head, _, last = name.rpartition(".")
        if "attn" in head.split(".")[-1] and last in ("to_q", "to_k"):
            base = f"unet.{head}.processor.{last}_lora"
        elif name.endswith("attn1.to_out.0"):
            base = f"unet.{name[:-len('attn1.to_out.0')]}attn1.processor.to_out_lora"
        else:
            base = f"unet.{name}.lora"
        old[base + ".down.weight"], old[base + ".up.weight"] = down, up
    for name, (down, up) in text.items():
        head, _, last = name.rpartition(".")
        base = {"q_proj": f"{head}.to_q_lora", "out_proj": f"{head}.to_out_lora"}.get(last, f"{name}.lora_linear_layer")
        old[f"text_encoder.text_model.{base}.down.weight"] = down
        old[f"text_encoder.text_model.{base}.up.weight"] = up
    a, b = load_preset("tiny"), load_preset("tiny")
    apply_loras(a, [(write(old, tmp_path / "old.safetensors"), 0.9)])
    apply_loras(b, [(write(peft_state(unet, text), tmp_path / "new.safetensors"), 0.9)])
    merged_b = _states(b)
    assert all(torch.equal(v, merged_b[n][k]) for n, s in _states(a).items() for k, v in s.items())


def test_several_loras_one_undo_and_source(factors, tmp_path):
    unet, text = factors
    first = write(peft_state(unet, {}), tmp_path / "first.safetensors")
    second = write(kohya_state(unet, text, None), tmp_path / "second.safetensors")
    c = load_preset("tiny")
    before = _states(c)
    record = apply_loras(c, [(first, 1.0), (second, 0.25)])
    weight = c.unet.get_submodule(UNET_MODULES[0]).weight
    down, up = unet[UNET_MODULES[0]]
    expected = before["unet"][UNET_MODULES[0] + ".weight"] + (up @ down) * 1.0 + (up @ down) * 0.25
    torch.testing.assert_close(weight, expected, rtol=0, atol=1e-6)
    assert c.source.count("+lora:") == 2 and c.source.endswith("@0.25")
    assert record.applied == [("first.safetensors", 1.0), ("second.safetensors", 0.25)]
    unmerge_lora(c, record)
    assert all(torch.equal(before[n][k], v) for n, s in _states(c).items() for k, v in s.items())


def test_lora_matching_nothing_lists_keys_and_model(tiny, factors, tmp_path):
    unet, _ = factors
    state = kohya_state(unet, {}, 1.0)
    state["lora_unet_down_blocks_0_attentions_0_transformer_blocks_9_attn1_to_q.lora_down.weight"] = torch.zeros(4, 32)
    state["lora_unet_down_blocks_0_attentions_0_transformer_blocks_9_attn1_to_q.lora_up.weight"] = torch.zeros(32, 4)
    state["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 128)  # SDXL's second CLIP
    state["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(256, 4)
    state["model.diffusion_model.something"] = torch.zeros(3)
    path = write(state, tmp_path / "sdxl.safetensors")
    before = _states(tiny)
    with pytest.raises(WeightsError) as err:
        apply_loras(tiny, [(path, 1.0)])
    message = str(err.value)
    assert "3 of 13 entries match no Linear/Conv2d module of the UNet and text encoder of preset:tiny:seed=0" in message
    for key in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_9_attn1_to_q",
                "lora_te2_text_model_encoder_layers_0_mlp_fc1", "model.diffusion_model.something"):
        assert key in message
    assert all(torch.equal(before[n][k], v) for n, s in _states(tiny).items() for k, v in s.items())
    empty = write({"alpha": torch.tensor(1.0)}, tmp_path / "empty.safetensors")
    with pytest.raises(WeightsError, match="1 of 1 entries match no"):
        load_lora(empty, tiny)


def test_lora_shapes_that_do_not_fit_are_refused(tiny, factors, tmp_path):
    unet, _ = factors
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # Linear (32, 32)
    bad = {name: (torch.zeros(4, 64), torch.zeros(32, 4))}
    with pytest.raises(WeightsError) as err:
        load_lora(write(peft_state(bad, {}), tmp_path / "wide.safetensors"), tiny)
    assert (f"unet.{name}: down (4, 64) / up (32, 4) do not fit the weight (32, 32) (expected down (r, 32) and "
            f"up (32, r))") in str(err.value) and "preset:tiny:seed=0" in str(err.value)
    rank = {name: (torch.zeros(4, 32), torch.zeros(32, 8))}
    with pytest.raises(WeightsError, match="down rank 4 != up rank 8"):
        load_lora(write(peft_state(rank, {}), tmp_path / "rank.safetensors"), tiny)
    conv = {"down_blocks.1.resnets.0.conv1": (torch.zeros(4, 32, 1, 1), torch.zeros(64, 4, 1, 1))}  # a 3x3 conv
    with pytest.raises(WeightsError, match=r"expected down \(r, 32, 3, 3\) and up \(64, r, 1, 1\)"):
        load_lora(write(kohya_state(conv, {}, 1.0), tmp_path / "conv.safetensors"), tiny)
    half = {k: v for k, v in peft_state(unet, {}).items() if "lora_B" not in k or name not in k}
    with pytest.raises(WeightsError, match=f"factors without their pair: unet.{name} \\(has down; needs down and up\\)"):
        load_lora(write(half, tmp_path / "half.safetensors"), tiny)
    with pytest.raises(WeightsError, match="checkpoint file not found"):
        load_lora(tmp_path / "absent.safetensors", tiny)


@pytest.mark.parametrize("strength", [4.5, -5.0, float("nan"), float("inf"), True, "1"])
def test_strength_out_of_range_is_refused(strength):
    with pytest.raises(InputError, match="LoRA strength"):
        check_strength(strength)


def test_parse_lora_arg():
    assert parse_lora_arg("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_lora_arg("dir/style.safetensors:0.6") == ("dir/style.safetensors", 0.6)
    assert parse_lora_arg("C:/loras/x.safetensors:-1") == ("C:/loras/x.safetensors", -1.0)
    assert parse_lora_arg("odd:name.safetensors") == ("odd:name.safetensors", 1.0)
    with pytest.raises(InputError, match=f"out of range: expected -{STRENGTH_LIMIT:g} .. {STRENGTH_LIMIT:g}"):
        parse_lora_arg("x.safetensors:9")
    with pytest.raises(InputError, match="'1.2.3' is not a number; expected PATH\\[:STRENGTH\\]"):
        parse_lora_arg("x.safetensors:1.2.3")


def test_merge_refuses_a_bad_strength_before_touching_weights(tiny, factors, tmp_path):
    lora = load_lora(write(peft_state(factors[0], {}), tmp_path / "a.safetensors"), tiny)
    before = _states(tiny)
    with pytest.raises(InputError):
        merge_lora(tiny, lora, 10.0)
    assert all(torch.equal(before[n][k], v) for n, s in _states(tiny).items() for k, v in s.items())


def test_pipeline_set_lora_and_cli(factors, tmp_path, photo, fast_config):
    """set_lora changes the images, set_lora(None) brings back the exact ones; --lora does the same."""
    from sdcn_trt import ControlNetPipeline
    from sdcn_trt.cli import main

    path = write(kohya_state(*factors, alpha=4.0), tmp_path / "style.safetensors")
    pipe = ControlNetPipeline.from_preset("tiny")
    plain = pipe.run(photo, fast_config).images[0]
    pipe.set_lora(path, 1.5)
    styled = pipe.run(photo, fast_config).images[0]
    assert pipe.loras == [(path, 1.5)] and (styled != plain).any()
    with pytest.raises(InputError):
        pipe.set_lora([(path, 0.5), (path, 7.0)])
    assert pipe.loras == [(path, 1.5)]  # a refused change keeps what was merged
    with pytest.raises(WeightsError):
        pipe.set_lora(tmp_path / "absent.safetensors")
    assert pipe.loras == [(path, 1.5)] and (pipe.run(photo, fast_config).images[0] == styled).all()
    pipe.set_lora(None)
    assert (pipe.run(photo, fast_config).images[0] == plain).all() and pipe.components.source == "preset:tiny:seed=0"
    again = ControlNetPipeline.from_preset("tiny", lora=[(path, 1.5)])
    assert (again.run(photo, fast_config).images[0] == styled).all()

    import cv2

    cv2.imwrite(str(tmp_path / "in.png"), photo[:, :, ::-1])
    args = ["generate", str(tmp_path / "in.png"), "--image-resolution", "64", "--ddim-steps", "2", "--quiet"]
    assert main(args + ["-o", str(tmp_path / "out"), "--lora", f"{path}:1.5"]) == 0
    written = cv2.imread(str(tmp_path / "out" / "in.png"))[:, :, ::-1]
    assert (written == styled).all()
    assert main(args + ["-o", str(tmp_path / "bad"), "--lora", f"{path}:8"]) == 2
