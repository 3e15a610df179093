"""ONNX export of every network: parity with torch, the cache, and the failure paths."""

import numpy as np
import pytest
import torch

from sdcn_trt import InputError
from sdcn_trt.export import ExportSettings, ShapeRange, ShapeSpec, export_networks, get_descriptor
from sdcn_trt.export.descriptors import DESCRIPTORS
from sdcn_trt.export.onnx_export import compare_outputs, export_onnx, run_onnx

SMALL = ShapeSpec(1, 64, 128)


@pytest.mark.parametrize("name", list(DESCRIPTORS))
def test_fp32_export_matches_torch(tiny, tmp_path, name):
    result = export_onnx(get_descriptor(name, tiny), tmp_path, ExportSettings(sample=SMALL))
    assert result.path.is_file() and not result.cached
    for output, check in result.check.items():
        assert check["max_abs"] <= 1e-4 or (name == "vae_decoder" and check["max_rel"] <= 1e-5), (output, check)
        assert check["nonfinite"] == 0


@pytest.mark.parametrize("name", ["fused_step", "vae_decoder", "text_encoder"])
def test_fp16_export_within_bound(tiny, tmp_path, name):
    result = export_onnx(get_descriptor(name, tiny), tmp_path, ExportSettings(precision="fp16", sample=SMALL))
    for output, check in result.check.items():
        assert check["max_rel"] <= 5e-3 and check["nonfinite"] == 0, (output, check)  # fp16: ~2^-10 relative
    if name == "text_encoder":  # CLIP stays fp32 (the causal mask overflows fp16)
        assert "fp32" in result.path.parent.name


def test_dynamic_shapes_run_other_sizes(tiny, tmp_path):
    desc = get_descriptor("fused_step", tiny)
    result = export_onnx(desc, tmp_path, ExportSettings(sample=SMALL))
    other = ShapeSpec(2, 128, 64)
    feed = desc.sample_inputs(other, seed=3)
    module = desc.build_module()
    with torch.no_grad():
        expected = module(*feed.values()).numpy()
    got = run_onnx(result.path, feed)["noise_pred"]
    assert got.shape == desc.shapes(other)["noise_pred"]
    assert np.abs(got - expected).max() <= 1e-4


def test_second_export_is_cached_and_corruption_rebuilds(tiny, tmp_path):
    desc = get_descriptor("vae_decoder", tiny)
    first = export_onnx(desc, tmp_path, ExportSettings(sample=SMALL))
    stamp = first.path.stat().st_mtime_ns
    second = export_onnx(desc, tmp_path, ExportSettings(sample=SMALL))
    assert second.cached and second.path == first.path and first.path.stat().st_mtime_ns == stamp
    first.path.write_bytes(first.path.read_bytes()[:1000])  # truncated: corrupt
    third = export_onnx(desc, tmp_path, ExportSettings(sample=SMALL))
    assert not third.cached and third.check["images"]["max_rel"] <= 1e-5
    (first.path.parent / "meta.json").write_text("{not json")
    assert not export_onnx(desc, tmp_path, ExportSettings(sample=SMALL)).cached


def test_settings_and_weights_are_in_the_key(tiny, tmp_path):
    from sdcn_trt.export.onnx_export import export_key
    from sdcn_trt.models.presets import load_preset

    desc = get_descriptor("text_encoder", tiny)
    base = export_key(desc, ExportSettings())
    assert export_key(desc, ExportSettings(opset=18)) != base
    other_weights = load_preset("tiny", seed=1)
    assert export_key(get_descriptor("text_encoder", other_weights), ExportSettings()) != base


def test_failure_mid_export_leaves_nothing(tiny, tmp_path, monkeypatch):
    import onnx

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_onnx(get_descriptor("vae_decoder", tiny), tmp_path, ExportSettings(sample=SMALL))
    assert list((tmp_path / "onnx").iterdir()) == []


def test_export_networks_copies_and_rejects_unknown_names(tiny, tmp_path):
    with pytest.raises(InputError, match="unknown network 'clip'; valid networks: text_encoder, control_hint, controlnet, unet, fused_step"):
        export_networks(tiny, ["vae_decoder", "clip"], cache_dir=tmp_path)
    assert not (tmp_path / "onnx").exists()  # nothing exported before the bad name was found
    out = export_networks(tiny, ["vae_decoder"], ExportSettings(sample=SMALL), tmp_path, tmp_path / "out")
    assert out["vae_decoder"].path == tmp_path / "out" / "vae_decoder.onnx" and out["vae_decoder"].path.is_file()


def test_descriptors_derive_everything_from_config(tiny):
    fused = get_descriptor("fused_step", tiny)
    shapes = fused.shapes(ShapeSpec(2, 256, 384))
    assert shapes["latents"] == (2, 4, 32, 48)
    assert shapes["text_embeddings"] == (4, 77, 128)
    assert shapes["control_scales"] == (1, 2, 5)  # (ControlNets, CFG halves, residuals)
    assert shapes["hint"] == (2, 32, 32, 48)  # the embedded control image, made once per image
    assert get_descriptor("control_hint", tiny).shapes(ShapeSpec(2, 256, 384))["control"] == (2, 3, 256, 384)
    control = get_descriptor("controlnet", tiny)
    layout = control.dims.residual_layout
    assert len(layout) == 5 and layout[-1] == (64, 2)
    with torch.no_grad():
        feed = control.sample_inputs(ShapeSpec(1, 64, 64))
        outs = control.build_module()(*feed.values())
    assert [tuple(o.shape) for o in outs] == [control.shapes(ShapeSpec(1, 64, 64))[f"residual_{i}"] for i in range(5)]
    profile = fused.profile(ShapeRange(ShapeSpec(1, 64, 64), ShapeSpec(1, 256, 384), ShapeSpec(4, 512, 512)))
    assert profile["latents"] == ((1, 4, 8, 8), (1, 4, 32, 48), (4, 4, 64, 64))
    with pytest.raises(InputError, match="not a multiple of the VAE's 8"):
        fused.shapes(ShapeSpec(1, 100, 64))
    with pytest.raises(InputError, match="ShapeSpec.batch must be >= 1"):
        ShapeSpec(0)


def test_feed_outside_profile_names_the_range(tiny):
    fused = get_descriptor("fused_step", tiny)
    rng = ShapeRange(ShapeSpec(1, 64, 64), ShapeSpec(1, 64, 64), ShapeSpec(2, 128, 128))
    feed = fused.sample_inputs(ShapeSpec(1, 256, 64))
    with pytest.raises(InputError, match=r"input 'latents' has shape \(1, 4, 32, 8\); the profile allows \(1, 4, 8, 8\) .. \(2, 4, 16, 16\)"):
        fused.check_feed(feed, rng)
    del feed["timestep"]
    with pytest.raises(InputError, match="do not match the network's inputs"):
        fused.check_feed(feed, rng)


def test_compare_outputs_reports_nonfinite():
    report = compare_outputs({"x": np.ones(3, np.float32)}, {"x": np.array([1, np.nan, 2], np.float32)})
    assert report["x"]["nonfinite"] == 1


def test_large_model_data_is_streamed_into_one_file(tiny, tmp_path):
    """Models over 2 GB come out of the exporter with one file per tensor; they are merged into
    <network>.onnx.data without loading the weights (checked here on a small model saved that way)."""
    import onnx

    from sdcn_trt.export.onnx_export import _consolidate_external_data

    desc = get_descriptor("vae_decoder", tiny)
    exported = export_onnx(desc, tmp_path / "cache", ExportSettings(sample=SMALL))
    model = onnx.load(str(exported.path))
    split = tmp_path / "split"
    split.mkdir()
    onnx.save_model(model, str(split / "raw.onnx"), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=0)
    assert len(list(split.iterdir())) > 10
    proto = onnx.load(str(split / "raw.onnx"), load_external_data=False)
    files = _consolidate_external_data(proto, split, split / "vae_decoder.onnx")
    assert files == ["vae_decoder.onnx", "vae_decoder.onnx.data"]
    merged = tmp_path / "merged"
    merged.mkdir()
    for name in files:
        (merged / name).write_bytes((split / name).read_bytes())  # the pair stands alone
    feed = desc.sample_inputs(SMALL, seed=4)
    np.testing.assert_array_equal(run_onnx(merged / "vae_decoder.onnx", feed)["images"], run_onnx(exported.path, feed)["images"])
