"""New weights without re-export: a cached export of the same graph runs a LoRA-merged model or another
ControlNet with its initializers swapped, equal to a fresh export's output, and no export runs."""
from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch

from sdcn_trt.engines import BackendConfig
from sdcn_trt.engines.onnxruntime import OnnxRuntimeRunner
from sdcn_trt.engines.tensorrt.refit import RefitError, check_prototypes, fill_missing, refit_plan
from sdcn_trt.export.descriptors import ShapeSpec, get_descriptor
from sdcn_trt.export.onnx_export import ExportSettings, export_onnx, run_onnx
from sdcn_trt.export.weight_map import InitializerSource, WeightMap, graph_key, plan_swap
from sdcn_trt.export.weights import ort_model, prepare_onnx, read_weight_map
from sdcn_trt.models.lora import apply_loras, unmerge_lora
from sdcn_trt.models.presets import build_from_configs, load_preset, save_diffusers

from .lora_files import TEXT_MODULES, UNET_MODULES, kohya_state, random_factors, write

pytest.importorskip("onnxruntime")
SPEC = ShapeSpec(1, 64, 64)


@pytest.fixture(scope="module")
def base_cache(tmp_path_factory):
    """Exports of the tiny preset's own weights (seed 0): what a user has cached before changing weights."""
    cache = tmp_path_factory.mktemp("swap_cache")
    base = load_preset("tiny", seed=0)
    for name in ("text_encoder", "unet", "control_hint", "controlnet"):
        export_onnx(get_descriptor(name, base), cache, ExportSettings(), check=False)
    return cache


@pytest.fixture
def export_count(monkeypatch):
    """How many times torch.onnx.export runs."""
    calls = []
    real = torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    return calls


def _run_swapped(components, names, cache):
    """{network: (runner outputs, runner)} through the onnxruntime backend on `cache`."""
    out = {}
    for name in names:
        descriptor = get_descriptor(name, components)
        runner = OnnxRuntimeRunner(descriptor, BackendConfig("onnxruntime", cache_dir=str(cache)))
        feed = descriptor.sample_inputs(SPEC)
        out[name] = ({k: v.numpy() for k, v in runner.infer(feed).items()}, runner)
        runner.deactivate()
    return out


def _assert_equals_fresh_export(components, swapped, tmp_path):
    for name, (outputs, _) in swapped.items():
        descriptor = get_descriptor(name, components)
        fresh = export_onnx(descriptor, tmp_path / "fresh", ExportSettings(), check=False)
        expected = run_onnx(fresh.path, descriptor.sample_inputs(SPEC))
        for key, value in expected.items():
            np.testing.assert_array_equal(outputs[key], value, err_msg=f"{name}/{key}")


def test_lora_runs_the_cached_export_with_swapped_initializers(base_cache, export_count, tmp_path):
    components = load_preset("tiny", seed=0)
    path = write(kohya_state(random_factors(components.unet, UNET_MODULES, 4, seed=1),
                             random_factors(components.text_encoder, TEXT_MODULES, 4, seed=2), alpha=2.0),
                 tmp_path / "style.safetensors")
    record = apply_loras(components, [(path, 0.8)])
    swapped = _run_swapped(components, ("text_encoder", "unet"), base_cache)
    assert export_count == []  # no export ran
    for name, (_, runner) in swapped.items():
        assert list(base_cache.glob(f"onnx/{name}-*")) == [runner.export.path.parent]  # the base export, no other
    prepared = prepare_onnx(get_descriptor("unet", components), base_cache)
    sources = read_weight_map(prepared.export.path).initializers
    assert {p for name in prepared.initializers for p in sources[name].params} == {
        f"unet.{m}.weight" for m in UNET_MODULES}  # exactly the LoRA's modules
    assert "no export" in prepared.note
    with torch.inference_mode():  # and the swapped graph computes the merged model
        descriptor = get_descriptor("unet", components)
        reference = descriptor.build_module()(*descriptor.sample_inputs(SPEC).values())
    torch.testing.assert_close(torch.from_numpy(swapped["unet"][0]["noise_pred"]), reference, rtol=1e-4, atol=1e-4)
    _assert_equals_fresh_export(components, swapped, tmp_path)
    assert len(export_count) == 2  # the fresh exports compared against
    unmerge_lora(components, record)  # the original weights: the cached export itself, nothing swapped
    assert prepare_onnx(get_descriptor("unet", components), base_cache).initializers == {}


def test_another_controlnet_of_the_same_architecture(base_cache, export_count, tmp_path):
    components = load_preset("tiny", seed=0)
    components.controlnet = load_preset("tiny", seed=1).controlnet
    swapped = _run_swapped(components, ("control_hint", "controlnet"), base_cache)
    assert export_count == []
    assert len(prepare_onnx(get_descriptor("control_hint", components), base_cache).initializers) == 16
    _assert_equals_fresh_export(components, swapped, tmp_path)


def test_pinned_parameters_force_an_export_with_the_reason(base_cache, export_count, caplog):
    """Fresh LayerNorm weights are all ones: no initializer says where they are, so changing them
    cannot be swapped in; the network is exported again and the log says why."""
    components = load_preset("tiny", seed=0)
    with torch.no_grad():
        components.text_encoder.final_layer_norm.weight.uniform_(0.5, 1.5)
    with caplog.at_level(logging.INFO, logger="sdcn_trt.export.weights"):
        prepared = prepare_onnx(get_descriptor("text_encoder", components), base_cache)
    assert len(export_count) == 1 and prepared.initializers == {} and not prepared.export.cached
    assert ("re-exporting; no cached export of this graph can take the new weights" in caplog.text
            and "1 changed parameters are not stored as initializers of the export" in caplog.text
            and "text_encoder.final_layer_norm.weight" in caplog.text)
    assert "text_encoder.final_layer_norm.weight" in read_weight_map(prepared.export.path).params


def test_fp16_swap_equals_fresh_fp16_export(tmp_path, export_count):
    settings = ExportSettings(precision="fp16")
    base = load_preset("tiny", seed=0)
    export_onnx(get_descriptor("control_hint", base), tmp_path / "a", settings, check=False)
    base.controlnet = load_preset("tiny", seed=1).controlnet
    descriptor = get_descriptor("control_hint", base)
    prepared = prepare_onnx(descriptor, tmp_path / "a", settings)
    assert len(export_count) == 1 and {v.dtype for v in prepared.initializers.values()} == {np.dtype("float16")}
    import onnxruntime as ort

    options = ort.SessionOptions()
    model, kept = ort_model(prepared.export.path, prepared.initializers, options)
    feed = descriptor.sample_inputs(SPEC)
    got = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"]).run(
        None, {"control": feed["control"].numpy().astype(np.float16)})[0]
    fresh = export_onnx(descriptor, tmp_path / "b", settings, check=False)
    np.testing.assert_array_equal(got.astype(np.float32), run_onnx(fresh.path, feed)["hint"])


def test_external_data_initializers_are_injected(base_cache, tmp_path, monkeypatch):
    """Large exports keep weights in an external file: swapped ones are injected before onnxruntime
    optimises (add_external_initializers), the others still read from the file beside the graph."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    components = load_preset("tiny", seed=0)
    components.controlnet = load_preset("tiny", seed=1).controlnet
    descriptor = get_descriptor("control_hint", components)
    prepared = prepare_onnx(descriptor, base_cache)
    values = {k: prepared.initializers[k] for k in sorted(prepared.initializers)[:2]}  # some, not all
    assert len(values) == 2
    target = tmp_path / "ext" / "control_hint.onnx"
    target.parent.mkdir()
    onnx.save_model(onnx.load(str(prepared.export.path)), str(target), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="control_hint.onnx.data", size_threshold=0)
    monkeypatch.chdir(tmp_path)  # the external file is found through the session's folder setting, not the cwd
    options = ort.SessionOptions()
    model, kept = ort_model(target, values, options)
    assert sorted(kept) == sorted(values)  # every initializer is external here
    feed = {"control": descriptor.sample_inputs(SPEC)["control"].numpy()}
    got = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    reference = onnx.load(str(prepared.export.path))
    for tensor in reference.graph.initializer:
        if tensor.name in values:
            tensor.CopyFrom(numpy_helper.from_array(values[tensor.name], tensor.name))
    expected = ort.InferenceSession(reference.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_array_equal(got, expected)
    shutil.rmtree(target.parent)


def test_weight_map_of_the_tiny_unet_export(base_cache):
    """What the exporter and onnxslim do to the weights, as the map records it."""
    components = load_preset("tiny", seed=0)
    prepared = prepare_onnx(get_descriptor("unet", components), base_cache)
    weight_map = read_weight_map(prepared.export.path)
    by_param = {p: s for s in weight_map.initializers.values() for p in s.params}
    assert by_param["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"].transform == "transpose"
    assert by_param["unet.conv_in.weight"].transform == "identity"
    assert by_param["unet.down_blocks.1.resnets.0.time_emb_proj.weight"].transform in ("identity", "transpose")
    # fresh GroupNorm weights (ones) and biases (zeros) say nothing about where they went: pinned
    assert "unet.conv_norm_out.weight" in weight_map.pinned and "unet.conv_in.weight" not in weight_map.pinned
    assert set(weight_map.params) == set(get_descriptor("unet", components).build_module().state_dict())


def _toy_map():
    return WeightMap({"w_t": InitializerSource(["a.w"], "transpose", "float32", [3, 2]),
                      "shared": InitializerSource(["a.b", "c.b"], "reshape", "float32", [2, 1, 1])},
                     {"a.w": "", "a.b": "", "c.b": "", "n.w": ""})


def test_plan_swap_rules():
    from sdcn_trt.export.weight_map import tensor_digest

    state = {"a.w": torch.arange(6.0).reshape(2, 3), "a.b": torch.ones(2), "c.b": torch.ones(2), "n.w": torch.ones(4)}
    weight_map = _toy_map()
    weight_map.params = {k: tensor_digest(v) for k, v in state.items()}
    assert plan_swap(weight_map, state).values == {} and plan_swap(weight_map, state).swappable
    everything = plan_swap(weight_map, state, everything=True).values
    np.testing.assert_array_equal(everything["w_t"], np.arange(6.0, dtype=np.float32).reshape(2, 3).T)
    assert everything["shared"].shape == (2, 1, 1)
    changed = dict(state, **{"a.w": state["a.w"] * 2})
    plan = plan_swap(weight_map, changed)
    assert plan.changed == ["a.w"] and list(plan.values) == ["w_t"] and plan.values["w_t"].flags.c_contiguous
    plan = plan_swap(weight_map, dict(state, **{"a.b": torch.full((2,), 3.0)}))
    assert plan.reason == "initializer shared stands for parameters ['a.b', 'c.b'], which were equal at export and now differ"
    plan = plan_swap(weight_map, dict(state, **{"n.w": torch.zeros(4)}))
    assert plan.reason.startswith("1 changed parameters are not stored as initializers of the export") and "n.w" in plan.reason
    plan = plan_swap(weight_map, {**state, "extra.w": torch.ones(1)})
    assert plan.reason == "the network's parameters differ from the export's (new: ['extra.w'], gone: [])"
    assert WeightMap.from_json(None) is None and WeightMap.from_json({"format": 0}) is None
    assert WeightMap.from_json(weight_map.to_json()).to_json() == weight_map.to_json()


def test_graph_key_ignores_weight_values_not_architecture(tiny, tmp_path):
    from sdcn_trt.models.presets import PRESETS
    from sdcn_trt.models.tokenizer import load_tokenizer

    settings = ExportSettings()
    key = graph_key(get_descriptor("text_encoder", tiny), settings)
    assert graph_key(get_descriptor("text_encoder", load_preset("tiny", seed=3)), settings) == key
    saved = load_preset("tiny", seed=3)  # save_pretrained fills in file metadata (architectures, dtype, versions)
    save_diffusers(saved, tmp_path / "sd", tmp_path / "cn")
    assert graph_key(get_descriptor("text_encoder", saved), settings) == key
    assert graph_key(get_descriptor("fused_step", saved), settings) == graph_key(get_descriptor("fused_step", tiny),
                                                                                settings)
    assert graph_key(get_descriptor("text_encoder", tiny), ExportSettings(opset=18)) != key
    configs = PRESETS["tiny"]()
    configs["text_encoder"]["num_attention_heads"] = 1  # the same parameter shapes, another graph
    other = build_from_configs(configs, 0, load_tokenizer(None), "variant")
    assert graph_key(get_descriptor("text_encoder", other), settings) != key


def test_refit_plan_uses_the_same_map(base_cache):
    """TensorRT refit: the initializer plan, checked against the engine's refittable weights (plain code)."""
    components = load_preset("tiny", seed=0)
    components.controlnet = load_preset("tiny", seed=1).controlnet
    descriptor = get_descriptor("control_hint", components)
    weight_map = read_weight_map(prepare_onnx(descriptor, base_cache).export.path)
    state = descriptor.build_module().state_dict()
    swap = plan_swap(weight_map, state)
    plan = refit_plan(weight_map, state, refittable=list(swap.values))
    assert plan.refittable and sorted(plan.weights) == sorted(swap.values)
    assert all(np.array_equal(plan.weights[k], swap.values[k]) for k in swap.values)
    first = sorted(swap.values)[0]
    partial = refit_plan(weight_map, state, refittable=[first])
    assert partial.reason.startswith("15 changed initializers are not refittable weights of the engine")
    assert "the engine has 1 refittable weights" in partial.reason
    assert refit_plan(None, state, []).reason == "the engine records no weight map (built before refit support)"
    bias = next(k for k in swap.values if k.endswith("conv_in.bias"))
    missing = fill_missing([bias], weight_map, state)
    np.testing.assert_array_equal(missing[bias], state[bias].numpy())
    with pytest.raises(RefitError, match=r"asks for weights the ONNX weight map cannot supply: \(unnamed\), x"):
        fill_missing(["", "x"], weight_map, state)
    with pytest.raises(RefitError, match=f"1 weights do not fit the engine: {bias}: float32 x 16, "
                                         f"engine expects float16 x 16"):
        check_prototypes({bias: swap.values[bias]}, {bias: ("float16", 16)})
    check_prototypes({bias: swap.values[bias]}, {bias: ("float32", 16)})


def test_pipeline_lora_on_onnxruntime_swaps_and_matches_torch(tiny_pipe, photo, tmp_path, monkeypatch):
    """ControlNetPipeline.set_lora on onnxruntime: no export runs, the images match the torch backend's
    with the same LoRA, and set_lora(None) returns to the cached exports' own weights."""
    from sdcn_trt import ControlNetPipeline, GenerationConfig
    from tests.conftest import pixel_diff

    config = GenerationConfig(image_resolution=64, ddim_steps=2)
    pipe = ControlNetPipeline(load_preset("tiny", seed=0), "onnxruntime")
    plain = pipe.run(photo, config).images[0]  # exports (or reuses) the four networks
    components = pipe.components
    path = write(kohya_state(random_factors(components.unet, UNET_MODULES, 4, seed=1),
                             random_factors(components.text_encoder, TEXT_MODULES, 4, seed=2), alpha=4.0),
                 tmp_path / "style.safetensors")
    calls = []
    real = torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    pipe.set_lora(path, 1.5)
    styled = pipe.run(photo, config).images[0]
    assert calls == [] and (styled != plain).any()
    reference = ControlNetPipeline(load_preset("tiny", seed=0), "torch", lora=[(path, 1.5)]).run(photo, config).images[0]
    diff = pixel_diff(styled, reference)
    assert diff.mean() <= 1.0 and diff.max() <= 2, (diff.mean(), diff.max())
    pipe.set_lora(None)
    assert (pipe.run(photo, config).images[0] == plain).all() and calls == []


def test_refit_flag_reaches_the_engine_key_and_the_build_config(tiny, tmp_path):
    """`sdcn-trt build --refit` -> BuildSettings(refit=True): its own engine key, BuilderFlag.REFIT on."""
    from sdcn_trt.cli import build_parser, build_settings
    from sdcn_trt.engines.tensorrt.plan import BuildSettings, Platform, build_mode, engine_key

    settings, _ = build_settings(build_parser().parse_args(["build", "--refit"]))
    assert settings == BuildSettings(precision="fp16", refit=True)
    mode, h100 = build_mode("fp16", True), Platform("10.13.0", "NVIDIA H100 80GB HBM3", (9, 0))
    profile = get_descriptor("fused_step", tiny).profile(settings.shape_range)
    assert engine_key("g", h100, settings, mode, profile) != engine_key("g", h100, BuildSettings(), mode, profile)
    pytest.importorskip("polygraphy")
    from sdcn_trt.engines.tensorrt.runner import polygraphy_loaders

    _, config = polygraphy_loaders(tmp_path / "f.onnx", profile, settings, mode, tmp_path / "timing.cache")
    assert config.refittable is True
    _, plain = polygraphy_loaders(tmp_path / "f.onnx", profile, BuildSettings(), mode, tmp_path / "timing.cache")
    assert plain.refittable is False
