"""Single-file (ldm layout) loading: exact round trips, shape inference, and every error path."""
import argparse
import io
import operator
import os
import zipfile

import pytest
import torch
import yaml

from sdcn_trt import ControlNetPipeline, WeightsError
from sdcn_trt.models.single_file import (
    infer_original_config, load_controlnet_file, load_single_file, read_state_dict,
)
from sdcn_trt.models.ldm_layout import original_config_for, save_single_file, to_ldm_state_dict


def assert_same_weights(a, b):
    for name, module in a.modules().items():
        sa, sb = module.state_dict(), b.modules()[name].state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key}"


@pytest.fixture(scope="module")
def tiny_file(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    save_single_file(tiny, folder / "tiny.safetensors", folder / "tiny.yaml")
    return folder


@pytest.mark.parametrize("with_yaml", [True, False])
def test_single_file_round_trips_exactly(tiny, tiny_file, with_yaml):
    loaded = load_single_file(tiny_file / "tiny.safetensors", tiny_file / "tiny.yaml" if with_yaml else None)
    assert_same_weights(tiny, loaded)


def test_ldm_keys_look_like_control_sd15_canny(tiny):
    keys = to_ldm_state_dict(tiny).keys()
    for expected in ("model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.weight",
                     "control_model.input_hint_block.14.weight", "control_model.zero_convs.0.0.weight",
                     "control_model.middle_block_out.0.weight", "first_stage_model.decoder.up.0.block.0.conv1.weight",
                     "first_stage_model.encoder.mid.attn_1.q.weight",
                     "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"):
        assert expected in keys


def test_pth_loads_with_weights_only(tiny, tmp_path):
    save_single_file(tiny, tmp_path / "tiny.pth")
    state = torch.load(tmp_path / "tiny.pth", weights_only=True)
    torch.save({"state_dict": state, "global_step": 5}, tmp_path / "wrapped.ckpt")
    assert_same_weights(tiny, load_single_file(tmp_path / "wrapped.ckpt"))


def test_inferred_config_matches_the_written_yaml(tiny, tiny_file):
    written = yaml.safe_load((tiny_file / "tiny.yaml").read_text())["model"]["params"]
    inferred = infer_original_config(read_state_dict(tiny_file / "tiny.safetensors"))["model"]["params"]
    for part in ("unet_config", "control_stage_config"):
        for key in ("model_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "context_dim", "num_heads"):
            assert inferred[part]["params"][key] == written[part]["params"][key], (part, key)
    assert inferred["first_stage_config"]["params"]["ddconfig"]["ch_mult"] == [1, 1, 1, 1]
    assert original_config_for(tiny)["model"]["params"]["scale_factor"] == 0.18215


def test_diffusers_controlnet_config_bug_is_worked_around(tiny, tiny_file):
    """diffusers 0.42.1 forgets `checkpoint` in create_controlnet_diffusers_config_from_ldm."""
    from diffusers.loaders.single_file_utils import create_controlnet_diffusers_config_from_ldm

    config = yaml.safe_load((tiny_file / "tiny.yaml").read_text())
    state = read_state_dict(tiny_file / "tiny.safetensors")
    try:
        create_controlnet_diffusers_config_from_ldm(config, state, image_size=512)
    except TypeError as exc:
        assert "checkpoint" in str(exc)
    else:
        pytest.skip("this diffusers no longer has the bug; the workaround is harmless")
    assert_same_weights(tiny, load_single_file(tiny_file / "tiny.safetensors", tiny_file / "tiny.yaml"))


def test_controlnet_alone_from_one_file(tiny, tmp_path):
    from safetensors.torch import save_file

    from sdcn_trt.models.ldm_layout import controlnet_to_ldm

    save_file({k: v.contiguous() for k, v in controlnet_to_ldm(tiny.controlnet).items()}, str(tmp_path / "cn.safetensors"))
    loaded = load_controlnet_file(tmp_path / "cn.safetensors")
    for k, v in tiny.controlnet.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


def test_pipeline_from_single_file(tiny, tiny_file, photo, fast_config):
    pipe = ControlNetPipeline.from_single_file(tiny_file / "tiny.safetensors")
    reference = ControlNetPipeline(tiny).run(photo, fast_config).images[0]
    assert (pipe.run(photo, fast_config).images[0] == reference).all()


def test_missing_and_corrupt_files(tiny_file, tmp_path):
    with pytest.raises(WeightsError, match="checkpoint file not found"):
        read_state_dict(tmp_path / "none.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(WeightsError, match=r"not a PyTorch checkpoint or safetensors file: .*bad.safetensors "
                                           r"\(looks like: unrecognised binary data \(first bytes 00 67 61"):
        read_state_dict(tmp_path / "bad.safetensors")
    torch.save({"a": 1}, tmp_path / "notensors.pth")
    with pytest.raises(WeightsError, match="does not hold a state dict of tensors"):
        read_state_dict(tmp_path / "notensors.pth")
    with pytest.raises(WeightsError, match="original config not found"):
        load_single_file(tiny_file / "tiny.safetensors", original_config=tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(WeightsError, match="is not an ldm model config"):
        load_single_file(tiny_file / "tiny.safetensors", original_config=tmp_path / "list.yaml")


class _Payload:
    """Unpickling this would run `touch <marker>` through os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def unsafe_pth(tmp_path):
    """(a .pth whose pickle calls os.system, the file that call would create)."""
    marker = tmp_path / "payload_ran"
    path = tmp_path / "bad.pth"
    torch.save({"w": torch.zeros(2), "x": _Payload(marker)}, path)
    return path, marker


def _assert_refused_safely(message, path, marker):
    refused = f"{os.system.__module__}.system"  # posix.system on Linux
    assert message.startswith(f"refused checkpoint {path}: besides tensors it holds Python objects")
    assert f"the first refused global: {refused}" in message and "sdcn_trt loads weights only" in message
    assert "weights_only=False" not in message and "set to `False`" not in message  # torch's advice is not passed on
    assert f"from {os.system.__module__} import system" in message and str(path.with_suffix(".safetensors")) in message
    assert not marker.exists()


def test_pickles_with_code_are_refused(unsafe_pth, tmp_path):
    path, marker = unsafe_pth
    with pytest.raises(WeightsError) as info:
        read_state_dict(path)
    _assert_refused_safely(str(info.value), path, marker)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # torch's message is not chained

    class Evil:
        def __reduce__(self):
            return (operator.getitem, ("pwned", 0))  # not print: Ray, once imported, replaces builtins.print

    torch.save({"x": Evil()}, tmp_path / "evil.pth", pickle_protocol=4)  # STACK_GLOBAL instead of GLOBAL
    with pytest.raises(WeightsError, match=r"the first refused global: _operator\.getitem\)"):
        read_state_dict(tmp_path / "evil.pth")


@pytest.mark.parametrize("flags", [["--checkpoint", "{bad}"], ["--preset", "tiny", "--lora", "{bad}"]])
def test_cli_refuses_an_unsafe_checkpoint_and_runs_nothing(unsafe_pth, tmp_path, photo, capsys, flags):
    import cv2

    from sdcn_trt.cli import main

    path, marker = unsafe_pth
    image = tmp_path / "cat.png"
    cv2.imwrite(str(image), photo)
    argv = ["generate", str(image), "-o", str(tmp_path / "out"), "--ddim-steps", "1", "--image-resolution", "64"]
    rc = main(argv + [f.format(bad=path) for f in flags])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: refused checkpoint")
    _assert_refused_safely(err[len("error: "):], path, marker)
    assert not (tmp_path / "out").exists()


def test_the_conversion_the_refusal_gives_works_on_a_trusted_file(tmp_path, monkeypatch):
    """The two lines in the message turn a file holding a harmless non-tensor object into safetensors."""
    path = tmp_path / "trusted.pth"
    torch.save({"state_dict": {"w": torch.arange(4.0)}, "args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(WeightsError, match=r"the first refused global: argparse\.Namespace\)") as info:
        read_state_dict(path)
    recipe = [line.strip() for line in str(info.value).splitlines()[1:]]
    assert len(recipe) == 2
    exec("\n".join(recipe), {})  # noqa: S102 - the message's own advice, run on a file made here
    assert torch.equal(read_state_dict(path.with_suffix(".safetensors"))["w"], torch.arange(4.0))


def test_damaged_pickle_is_named_without_torchs_advice(tmp_path):
    """A refusal that is not a global (an opcode weights-only loading does not know) keeps torch's reason only."""
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buffer)
    source = zipfile.ZipFile(buffer)
    path = tmp_path / "damaged.pth"
    with zipfile.ZipFile(path, "w") as out:
        for name in source.namelist():
            out.writestr(name, b"\x80\x02\x82\x01." if name.endswith("data.pkl") else source.read(name))  # EXT1
    with pytest.raises(WeightsError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert message == (f"cannot read checkpoint {path} (a PyTorch zip checkpoint): weights-only unpickling refused "
                       "it: Unsupported operand 130")


def test_keys_that_do_not_match_are_named(tiny, tiny_file, tmp_path):
    from safetensors.torch import save_file

    state = read_state_dict(tiny_file / "tiny.safetensors")
    del state["model.diffusion_model.out.2.bias"]
    state["model.diffusion_model.extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(WeightsError, match=r"UNet weights .* 1 missing: conv_out.bias"):
        load_single_file(tmp_path / "broken.safetensors", tiny_file / "tiny.yaml")


def test_shapes_that_do_not_match_the_config_are_named(tiny_file, tmp_path):
    config = yaml.safe_load((tiny_file / "tiny.yaml").read_text())
    config["model"]["params"]["unet_config"]["params"]["context_dim"] = 64
    (tmp_path / "wrong.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(WeightsError, match=r"with other shapes: .*attn2.to_k.weight: checkpoint \(32, 128\) vs config \(32, 64\)"):
        load_single_file(tiny_file / "tiny.safetensors", tmp_path / "wrong.yaml")


def test_no_controlnet_in_file(tiny_file, tmp_path):
    from safetensors.torch import save_file

    state = {k: v for k, v in read_state_dict(tiny_file / "tiny.safetensors").items() if not k.startswith("control_model.")}
    save_file(state, str(tmp_path / "sd_only.safetensors"))
    with pytest.raises(WeightsError, match="has no ControlNet"):
        load_single_file(tmp_path / "sd_only.safetensors")


def test_not_an_ldm_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(WeightsError, match="not an ldm UNet/ControlNet"):
        load_single_file(tmp_path / "other.safetensors")
