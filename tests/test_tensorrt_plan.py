"""GPU-free TensorRT logic: build modes for TRT 10/11, cache keys, rebuild decisions, Polygraphy loaders."""
import importlib
import importlib.util
import logging
import types

import pytest

from sdcn_trt import InputError
from sdcn_trt.engines.tensorrt.plan import (
    BuildMode, BuildSettings, Platform, build_mode, engine_key, rebuild_reasons,
)
from sdcn_trt.export.descriptors import ShapeRange, ShapeSpec, get_descriptor

H100 = Platform("10.13.0", "NVIDIA H100 80GB HBM3", (9, 0))


def test_build_mode_for_trt10_and_trt11():
    assert build_mode("fp16", has_fp16_flag=True) == BuildMode("fp32", strongly_typed=False, fp16_flag=True)
    assert build_mode("fp16", has_fp16_flag=False) == BuildMode("fp16", strongly_typed=True, fp16_flag=False)
    assert build_mode("fp32", has_fp16_flag=True) == BuildMode("fp32", strongly_typed=False, fp16_flag=False)
    assert build_mode("fp32", has_fp16_flag=False).strongly_typed


def test_settings_validation():
    with pytest.raises(InputError, match="optimization_level must be in 0..5"):
        BuildSettings(optimization_level=7)
    with pytest.raises(InputError, match="unknown precision .int8.; choose one of fp32, fp16"):
        BuildSettings(precision="int8")
    with pytest.raises(InputError, match="workspace_gib must be > 0"):
        BuildSettings(workspace_gib=0)
    assert BuildSettings(workspace_gib=0.5).workspace_bytes == 2**29


def test_engine_key_changes_with_everything_it_depends_on(tiny):
    desc = get_descriptor("fused_step", tiny)
    settings = BuildSettings()
    profile = desc.profile(settings.shape_range)
    mode = build_mode("fp16", True)
    base = engine_key("onnx-a", H100, settings, mode, profile)
    assert engine_key("onnx-a", H100, settings, mode, profile) == base
    assert engine_key("onnx-b", H100, settings, mode, profile) != base
    assert engine_key("onnx-a", Platform("10.13.0", "NVIDIA A10", (8, 6)), settings, mode, profile) != base
    assert engine_key("onnx-a", Platform("11.0.0", H100.gpu_name, (9, 0)), settings, mode, profile) != base
    assert engine_key("onnx-a", H100, BuildSettings(optimization_level=5), mode, profile) != base
    dynamic = desc.profile(ShapeRange.dynamic(ShapeSpec()))
    assert engine_key("onnx-a", H100, settings, mode, dynamic) != base


def test_rebuild_reasons():
    key = "k1"
    good = {"key": key, "platform": {"trt_version": "10.13.0", "gpu_name": H100.gpu_name, "compute_capability": [9, 0]}}
    assert rebuild_reasons(good, key, H100) == []
    assert rebuild_reasons(None, key, H100) == ["no cached engine"]
    other_trt = {**good, "platform": {**good["platform"], "trt_version": "10.7.0"}}
    assert rebuild_reasons(other_trt, key, H100) == ["built with TensorRT 10.7.0, running 10.13.0"]
    other_gpu = {**good, "platform": {**good["platform"], "gpu_name": "NVIDIA A10", "compute_capability": [8, 6]}}
    assert "built for NVIDIA A10 (sm [8, 6]), running on NVIDIA H100" in rebuild_reasons(other_gpu, key, H100)[0]
    assert rebuild_reasons({**good, "key": "k0"}, key, H100) == ["ONNX, profile or build settings changed"]


def test_static_and_dynamic_profiles(tiny):
    desc = get_descriptor("fused_step", tiny)
    static = desc.profile(BuildSettings().shape_range)
    assert static["latents"] == ((1, 4, 32, 48),) * 3  # the contest's 256 x 384
    assert static["control_scales"] == ((1, 2, 5),) * 3  # (ControlNets, CFG halves, residuals)
    dynamic = desc.profile(ShapeRange.dynamic(ShapeSpec(1, 256, 384), max_batch=4, min_side=256, max_side=768))
    assert dynamic["hint"] == ((1, 32, 32, 32), (1, 32, 32, 48), (4, 32, 96, 96))
    hint = get_descriptor("control_hint", tiny).profile(ShapeRange.dynamic(ShapeSpec(1, 256, 384)))
    assert hint["control"] == ((1, 3, 256, 256), (1, 3, 256, 384), (4, 3, 768, 768))
    assert dynamic["text_embeddings"][2] == (8, 77, 128)


def test_runner_settings_keep_clip_fp32(tiny):
    """Constructing a TensorRTRunner needs no GPU: its build settings are decided up front."""
    from sdcn_trt import BackendConfig
    from sdcn_trt.engines.tensorrt.runner import TensorRTRunner

    config = BackendConfig(backend="tensorrt", device="cuda", precision="fp16")
    clip = TensorRTRunner(get_descriptor("text_encoder", tiny), config)
    fused = TensorRTRunner(get_descriptor("fused_step", tiny), config)
    assert clip.settings.precision == "fp32" and fused.settings.precision == "fp16"
    assert fused.engine_folder("abcdef0123456789ff").name == "fused_step-fp16-abcdef0123456789"
    assert str(fused.device) == "cuda"


def test_polygraphy_loaders_for_trt10_and_trt11(tiny, tmp_path, caplog, capsys):
    """The loaders NVIDIA's diffusion demo builds with, made without TensorRT: nothing runs until called."""
    pytest.importorskip("polygraphy")
    from sdcn_trt.engines.tensorrt.runner import polygraphy_loaders

    settings = BuildSettings(optimization_level=5)
    profile = get_descriptor("fused_step", tiny).profile(settings.shape_range)
    onnx, cache = tmp_path / "fused_step.onnx", tmp_path / "timing.cache"
    with caplog.at_level(logging.INFO, logger="Polygraphy"):
        network, config = polygraphy_loaders(onnx, profile, settings, build_mode("fp16", has_fp16_flag=True), cache,
                                             {"WORKSPACE": 2**33})
    assert network.path == str(onnx) and network.strongly_typed is False  # TRT 10: FP16 flag on an fp32 ONNX
    assert config.fp16 is True and config.tf32 is False and config.builder_optimization_level == 5
    assert [{name: tuple(shapes) for name, shapes in p.items()} for p in config.profiles] == [profile]
    assert config.profiles[0]["latents"].opt == (1, 4, 32, 48)
    assert config.memory_pool_limits == {"WORKSPACE": 2**33}
    assert config.timing_cache_path is None  # no timing cache yet: start from an empty one, without a warning
    assert capsys.readouterr().out == ""  # Polygraphy prints to stdout unless routed to logging
    assert [r.name for r in caplog.records] == ["Polygraphy"] and "TF32 is disabled" in caplog.text
    cache.write_bytes(b"earlier timings")
    network, config = polygraphy_loaders(onnx, profile, settings, build_mode("fp16", has_fp16_flag=False), cache)
    assert network.strongly_typed is True and config.fp16 is False  # TRT 11: a strongly typed fp16 ONNX
    assert config.timing_cache_path == str(cache) and config.memory_pool_limits is None


def test_tensorrt_without_polygraphy_says_so(monkeypatch):
    from sdcn_trt.engines.tensorrt.support import tensorrt_status

    real_find_spec, real_import = importlib.util.find_spec, importlib.import_module
    present = {"tensorrt": types.SimpleNamespace(Builder=object)}  # TensorRT itself, as far as the check looks
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
        None if name == "polygraphy" else object() if name in present else real_find_spec(name, *a)))
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: present.get(name) or real_import(name, *a))
    assert tensorrt_status() == (False, "TensorRT is installed but Polygraphy, which builds the engines, is not: "
                                        "pip install polygraphy")
