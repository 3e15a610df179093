"""The inductor backend (AOTInductor packages, weights outside them, built in a child process) and
the fast torch path it compiles.

On the CPU, AOTInductor compiles C++ kernels: minutes for the tiny fused step on a 2-core machine, so
each package is compiled once (module fixtures) at small static shapes. GPU tests skip here. Crashes
are made on purpose in the build child through $SDCN_TRT_INDUCTOR_FAULT."""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from sdcn_trt import BackendConfig, ControlNetPipeline, GenerationConfig, backend_available
from sdcn_trt.config import BACKENDS
from sdcn_trt.engines import create_runner
from sdcn_trt.engines.inductor.runner import InductorRunner, PackageBuildError, build_package
from sdcn_trt.engines.inductor.build import FAULT_ENV
from sdcn_trt.engines.inductor.plan import (InductorSettings, Target, dynamic_shapes, package_parts, rebuild_reasons,
                                             torch_release)
from sdcn_trt.engines.torch import FastPath, TorchRunner, attention_modules
from sdcn_trt.errors import BackendUnavailableError, DeviceMemoryError, InputError
from sdcn_trt.export.descriptors import ShapeRange, ShapeSpec, get_descriptor
from tests.conftest import pixel_diff, replay_without_host_sync

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
SMALL = InductorSettings(ShapeRange.static(ShapeSpec(1, 64, 64)))


def _outputs(runner, feed):
    return {k: v.detach().clone() for k, v in runner.infer(feed).items()}


# -- toolchain, planning: no compile ------------------------------------------------------------------
def test_inductor_is_a_backend_and_names_what_is_missing(monkeypatch, tiny):
    assert "inductor" in BACKENDS
    assert backend_available("inductor") == (True, "")  # g++ is on this machine and on CI
    if not torch.cuda.is_available():
        assert backend_available("inductor", "cuda") == (
            False, "device 'cuda' was asked for but torch sees no CUDA GPU here")
    monkeypatch.setenv("CXX", "no-such-c++")
    ok, why = backend_available("inductor", "cpu")
    assert not ok and "'no-such-c++' was not found on PATH" in why and "set CXX" in why
    with pytest.raises(BackendUnavailableError, match="backend 'inductor' is unavailable: .*no-such-c\\+\\+"):
        create_runner(get_descriptor("control_hint", tiny), BackendConfig(backend="inductor"))
    with pytest.raises(BackendUnavailableError, match="no-such-c"):
        ControlNetPipeline(tiny, BackendConfig(backend="inductor"))


def test_gpu_requirements_are_named(monkeypatch):
    import importlib.util

    from sdcn_trt.engines.inductor import plan as inductor_plan

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton" else real_find_spec(name, *a))
    ok, why = inductor_plan.inductor_status("cuda")
    assert not ok and why == "AOTInductor on a GPU needs Triton, which is not installed: pip install triton"
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    monkeypatch.setattr(inductor_plan, "cuda_headers_found", lambda: (False, "/opt/nowhere/include"))
    ok, why = inductor_plan.inductor_status("cuda")
    assert not ok and "cuda_runtime_api.h was not found (looked in: /opt/nowhere/include)" in why


def test_networks_left_out_of_compiled_networks_get_torch_runners(tiny, monkeypatch):
    """Runner creation decides (the pipeline never asks): a built backend's networks outside
    compiled_networks run on torch, same device and precision; nothing is built for them."""
    from sdcn_trt import engines
    from sdcn_trt.engines.tensorrt.runner import TensorRTRunner
    from sdcn_trt.engines.torch import resolve_dtype
    from sdcn_trt.export.descriptors import PIPELINE_NETWORKS

    config = BackendConfig(backend="inductor", precision="fp16", check_finite=True, compiled_networks=("fused_step",))
    runners = {n: create_runner(get_descriptor(n, tiny), config) for n in PIPELINE_NETWORKS}
    assert type(runners["fused_step"]) is InductorRunner
    for name in ("text_encoder", "control_hint", "vae_decoder"):
        runner = runners[name]
        assert type(runner) is TorchRunner and runner.device == torch.device("cpu") and runner.check_finite
        assert runner.dtype == resolve_dtype(runner.descriptor.precision_for("fp16"))
    assert runners["vae_decoder"].dtype == torch.float16 and runners["text_encoder"].dtype == torch.float32
    monkeypatch.setattr(engines, "require_backend", lambda config: None)  # TensorRT is not installed here,
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # nor a GPU: runners are made, never run
    trt = BackendConfig(backend="tensorrt", device="cuda", precision="fp16", compiled_networks=("fused_step",))
    assert type(create_runner(get_descriptor("fused_step", tiny), trt)) is TensorRTRunner
    vae = create_runner(get_descriptor("vae_decoder", tiny), trt)
    assert type(vae) is TorchRunner and vae.device == torch.device("cuda") and vae.dtype == torch.float16


def test_rebuild_reasons_say_what_changed(tiny):
    desc = get_descriptor("control_hint", tiny)
    cpu = Target("2.14.1", "cpu", "Some CPU", "avx2")
    old = package_parts(desc, "a0", "fp32", SMALL, FastPath(), cpu)
    assert rebuild_reasons(old, None) == ["no cached package"]
    assert rebuild_reasons(old, old) == ["no cached package for these settings"]
    bigger = InductorSettings(ShapeRange.static(ShapeSpec(1, 64, 128)))
    new = package_parts(desc, "a1", "fp32", bigger, FastPath(), Target("2.15.0", "cuda", "NVIDIA H100", "sm_90"))
    assert rebuild_reasons(new, old) == [
        "the architecture changed (network configs or diffusers/transformers versions)",
        "the shapes changed: control (1, 3, 64, 64) -> (1, 3, 64, 128)",
        "compiled by torch 2.14.1, running torch 2.15.0",
        "compiled for cpu Some CPU (avx2), running on cuda NVIDIA H100 (sm_90)",
    ]


def test_dynamic_shapes_come_from_the_profile(tiny):
    fused = get_descriptor("fused_step", tiny)
    assert dynamic_shapes(fused, SMALL.shape_range) is None  # static: every axis fixed
    dynamic = InductorSettings(ShapeRange(ShapeSpec(1, 64, 64), ShapeSpec(1, 64, 96), ShapeSpec(3, 128, 256)))
    specs = dict(zip(fused.input_names, dynamic_shapes(fused, dynamic.shape_range), strict=True))
    latents = specs["latents"]
    assert sorted(latents) == [0, 2, 3] and (latents[0].min, latents[0].max) == (1, 3)
    assert (latents[2].min, latents[2].max, latents[3].min, latents[3].max) == (8, 16, 8, 32)
    assert (specs["text_embeddings"][0].min, specs["text_embeddings"][0].max) == (2, 6)  # 2B
    assert specs["timestep"] is None and specs["control_scales"] is None
    assert dynamic.trace_spec() == ShapeSpec(2, 64, 96)  # export pins a batch traced at 1
    assert SMALL.trace_spec() == ShapeSpec(1, 64, 64)
    with pytest.raises(InputError, match="the CFG multiplier cannot be dynamic"):
        InductorSettings(ShapeRange(ShapeSpec(cfg=1), ShapeSpec(), ShapeSpec()))
    with pytest.raises(InputError, match="shape range height: need min <= opt <= max, got 64, 32, 64"):
        InductorSettings(ShapeRange(ShapeSpec(1, 64, 64), ShapeSpec(1, 32, 64), ShapeSpec(1, 64, 64)))


def test_a_crashing_build_child_is_named_and_leaves_the_cache_clean(tiny, tmp_path, monkeypatch):
    """The compiler's process dies of SIGSEGV: this process lives, the error names the network, its
    shapes and the signal and keeps the child's faulthandler stack; nothing is cached."""
    desc = get_descriptor("control_hint", tiny)
    monkeypatch.setenv(FAULT_ENV, "SIGSEGV@compile")
    with pytest.raises(PackageBuildError) as caught:
        build_package(desc, "cpu", "fp32", SMALL, tmp_path)
    message = str(caught.value)
    assert message.startswith("AOTInductor compiling and loading 'control_hint' (fp32, cpu, control (1, 3, 64, 64)) "
                              "failed in its child process: killed by SIGSEGV (segmentation fault) at "
                              "engines/inductor/build.py:")
    assert "in _fault (load strategy 'default'); this process is unaffected and nothing was cached." in message
    stack = message.split("\n", 1)[1]
    assert stack.startswith("Fatal Python error: Segmentation fault\nCurrent thread")
    assert "in child_main" in stack and "Extension modules" not in stack
    assert list((tmp_path / "inductor").iterdir()) == []


@pytest.mark.slow  # two build children: about 80 s on the 2-core machine
def test_build_errors_in_the_child_name_the_network_and_keep_the_cache_clean(tiny, tmp_path, monkeypatch):
    desc = get_descriptor("control_hint", tiny)
    monkeypatch.setenv(FAULT_ENV, "RuntimeError@compile")
    with pytest.raises(PackageBuildError, match=r"^AOTInductor could not compile 'control_hint' \(fp32, cpu, "
                       r"control \(1, 3, 64, 64\)\): RuntimeError: RuntimeError injected at compile"):
        build_package(desc, "cpu", "fp32", SMALL, tmp_path)
    assert list((tmp_path / "inductor").iterdir()) == []
    monkeypatch.setenv(FAULT_ENV, "OutOfMemoryError@compile")
    with pytest.raises(DeviceMemoryError, match=r"^out of GPU memory while compiling and loading 'control_hint' "
                       r"\(fp32, cpu, control \(1, 3, 64, 64\)\) with AOTInductor \(load strategy 'default'\): "
                       r"OutOfMemoryError: OutOfMemoryError injected at compile"):
        build_package(desc, "cpu", "fp32", SMALL, tmp_path)
    assert list((tmp_path / "inductor").iterdir()) == []


def test_max_autotune_without_room_falls_back_to_the_default_compile(tiny, tmp_path, monkeypatch, caplog):
    """Told so, with a warning: before compiling when the GPU's free memory is short, and when
    autotuning runs out of memory anyway (the compile itself is stubbed: this is the decision)."""
    import torch._inductor

    from sdcn_trt.engines.inductor.build import compile_package

    desc = get_descriptor("control_hint", tiny)
    module = desc.build_module()
    args = (desc.sample_inputs(ShapeSpec(1, 64, 64))["control"],)
    autotune = InductorSettings(SMALL.shape_range, max_autotune=True)
    calls = []

    def compile_(program, package_path, inductor_configs):
        calls.append(inductor_configs["max_autotune"])
        if inductor_configs["max_autotune"]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_)
    with caplog.at_level("WARNING", logger="sdcn_trt.engines.inductor.build"):
        note = compile_package(desc, module, args, autotune, torch.device("cpu"), tmp_path / "model.pt2")
    assert calls == [True, False]
    assert note == ("max_autotune ran out of GPU memory (CUDA out of memory. Tried to allocate 8.00 GiB); "
                    "compiled with the default settings instead")
    assert f"control_hint: {note}" in caplog.text

    calls.clear()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**20, 80 * 2**30))
    note = compile_package(desc, module, args, autotune, torch.device("cuda"), tmp_path / "model.pt2")
    assert calls == [False] and note.startswith("max_autotune skipped: the GPU has 0.0 GiB free and max_autotune "
                                                "wants about 1.0 GiB (3x the 0.0 GiB of weights + 1 GiB)")
    def always_out_of_memory(program, package_path, inductor_configs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", always_out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):  # without max_autotune an out-of-memory is the error it is
        compile_package(desc, module, args, InductorSettings(SMALL.shape_range), torch.device("cpu"), tmp_path / "m")


@pytest.mark.slow
def test_a_load_child_killed_after_a_good_compile_leaves_nothing_cached(tiny, tmp_path, monkeypatch):
    """The 'fresh-process' strategy compiles in one child and load-checks in another; the second dies."""
    desc = get_descriptor("control_hint", tiny)
    monkeypatch.setenv(FAULT_ENV, "SIGKILL@load")
    settings = InductorSettings(SMALL.shape_range, load="fresh-process")
    with pytest.raises(PackageBuildError, match=r"^AOTInductor loading 'control_hint' \(fp32, cpu, control "
                       r"\(1, 3, 64, 64\)\) failed in its child process: killed by SIGKILL \(out of memory "
                       r"\(the kernel's OOM killer\) or killed from outside\) \(load strategy 'fresh-process'\); "
                       r"this process is unaffected and nothing was cached"):
        build_package(desc, "cpu", "fp32", settings, tmp_path)
    assert list((tmp_path / "inductor").iterdir()) == []


# -- the fast torch path ------------------------------------------------------------------------------
def test_fast_path_is_on_only_for_cuda_fp16():
    assert FastPath.default_for(torch.device("cpu"), torch.float32) == FastPath()
    assert FastPath.default_for(torch.device("cpu"), torch.float16) == FastPath()
    assert FastPath.default_for(torch.device("cuda"), torch.float16) == FastPath(
        sdpa=True, fuse_qkv=True, channels_last=True, gn_silu=True)
    assert FastPath.default_for(torch.device("cuda"), torch.float32) == FastPath()


@pytest.mark.parametrize("name", ["fused_step", "vae_decoder"])
def test_fused_qkv_and_channels_last_match_on_the_cpu(tiny, name):
    from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0

    desc = get_descriptor(name, tiny)
    feed = desc.sample_inputs(ShapeSpec(1, 64, 64))
    plain = TorchRunner(desc)
    fast = TorchRunner(desc, fast=FastPath(sdpa=True, fuse_qkv=True, channels_last=True))
    expected, actual = _outputs(plain, feed), _outputs(fast, feed)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-4 * expected[key].abs().max().item())
    fused = attention_modules(fast.module)
    assert fused and all(isinstance(a.processor, FusedAttnProcessor2_0) for a in fused)
    assert all(hasattr(a, "to_qkv") or hasattr(a, "to_kv") for a in fused)
    shared = attention_modules(plain.module)  # the shared fp32 components are untouched
    assert all(isinstance(a.processor, AttnProcessor2_0) and not hasattr(a, "to_qkv") for a in shared)
    sdpa_only = TorchRunner(desc, fast=FastPath(sdpa=True))
    assert torch.equal(_outputs(sdpa_only, feed)[desc.output_names[0]], expected[desc.output_names[0]])


# -- compiled on the CPU ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fused_runner(tiny, isolated_cache):
    """The tiny fused step compiled for the contest shape (the end-to-end test reuses the package)."""
    runner = InductorRunner(get_descriptor("fused_step", tiny), BackendConfig(backend="inductor"))
    runner.activate()
    return runner


def test_fused_step_matches_eager_torch(tiny, fused_runner):
    assert not fused_runner.package.cached and fused_runner.package.reasons == ["no cached package"]
    phases = fused_runner.package.phases  # where the build's time went: torch.export, AOTInductor, the load
    assert {"setup_s", "export_s", "aoti_s", "load_s", "lower_s", "codegen_s", "cpp_s"} == set(phases)
    assert all(v > 0 for v in phases.values())
    assert phases["export_s"] + phases["aoti_s"] <= fused_runner.package.seconds  # the compile; set-up before it
    assert phases["lower_s"] + phases["codegen_s"] + phases["cpp_s"] <= phases["aoti_s"]  # inductor's timers, inside
    desc = fused_runner.descriptor
    feed = desc.sample_inputs(ShapeSpec(), seed=3)
    feed["control_scales"] = torch.tensor([[[0.5] * desc.dims.num_scales, [1.0] * desc.dims.num_scales]])
    expected = _outputs(TorchRunner(desc), feed)["noise_pred"]
    actual = _outputs(fused_runner, feed)["noise_pred"]
    assert actual.shape == expected.shape == (2, 4, 32, 48) and actual.dtype == torch.float32
    assert (actual - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert fused_runner.package.check["noise_pred"]["max_abs"] <= 1e-4 * expected.abs().max()
    with pytest.raises(InputError, match=r"fused_step: input 'latents' has shape \(1, 4, 8, 8\); "
                                         r"the profile allows \(1, 4, 32, 48\) .. \(1, 4, 32, 48\)"):
        fused_runner.infer(desc.sample_inputs(ShapeSpec(1, 64, 64)))


def test_second_runner_reuses_the_package_without_compiling(tiny, fused_runner, monkeypatch):
    from sdcn_trt.engines.inductor import runner as inductor

    def no_compile(*args, **kwargs):
        raise AssertionError("a cached package was compiled again")

    monkeypatch.setattr(inductor, "build_in_child", no_compile)
    again = InductorRunner(get_descriptor("fused_step", tiny), BackendConfig(backend="inductor"))
    again.activate()
    assert again.package.cached and again.package.path == fused_runner.package.path
    feed = again.descriptor.sample_inputs(ShapeSpec())
    assert torch.equal(_outputs(again, feed)["noise_pred"], _outputs(fused_runner, feed)["noise_pred"])


def test_compiled_networks_fused_step_builds_that_package_only(tiny, photo, fused_runner, isolated_cache,
                                                              monkeypatch):
    """compiled_networks=("fused_step",): one build call, for the fused step, whose package is the one
    the all-networks backend uses (same key, same folder: the field is not part of the key); CLIP, hint
    and VAE run on torch; the images match eager torch as the all-compiled pipeline's do."""
    from sdcn_trt.engines.inductor import runner as inductor

    built: list[str] = []
    real_build = inductor.build_package
    monkeypatch.setattr(inductor, "build_package", lambda d, *a, **k: built.append(d.name) or real_build(d, *a, **k))
    folders = sorted((isolated_cache / "inductor").iterdir())
    config = GenerationConfig(image_resolution=256, ddim_steps=4, eta=0.5, guess_mode=True)
    reference = ControlNetPipeline(tiny).run(photo, config).images[0]
    pipe = ControlNetPipeline(tiny, BackendConfig(backend="inductor", cuda_graph="loop",
                                                  compiled_networks=("fused_step",)))
    image = pipe.run(photo, config).images[0]
    assert built == ["fused_step"] and sorted((isolated_cache / "inductor").iterdir()) == folders
    package = pipe.runners["fused_step"].package
    assert package.cached and (package.key, package.path) == (fused_runner.package.key, fused_runner.package.path)
    assert {n: type(r).__name__ for n, r in pipe.runners.items()} == {
        "text_encoder": "TorchRunner", "control_hint": "TorchRunner", "fused_step": "InductorRunner",
        "vae_decoder": "TorchRunner"}
    diff = pixel_diff(image, reference)
    assert image.shape == (256, 384, 3) and diff.max() <= 1 and diff.mean() < 0.01


@pytest.fixture(scope="module")
def hint_build(tiny, tmp_path_factory):
    """control_hint at 64x64 built through `sdcn-trt build --backend inductor`: (cache folder, output)."""
    from sdcn_trt.cli import main

    cache = tmp_path_factory.mktemp("inductor_cli")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["build", "--backend", "inductor", "--device", "cpu", "--precision", "fp32", "--preset", "tiny",
                   "--networks", "control_hint", "--height", "64", "--width", "64", "--cache-dir", str(cache)])
    assert rc == 0
    return cache, out.getvalue()


def test_cli_build_prints_time_size_and_parity(hint_build):
    cache, printed = hint_build
    line = printed.splitlines()[0]
    assert line.startswith(" control_hint: " + str(cache / "inductor" / "control_hint-fp32-"))
    assert "model.pt2 (compiled in " in line and " s (no cached package)); " in line and " MiB; " in line
    assert "max |diff| vs eager torch " in line
    meta = json.loads(next((cache / "inductor").glob("control_hint-*/meta.json")).read_text())
    assert meta["parts"]["shapes"] == {"control": [[1, 3, 64, 64]] * 3}  # min, traced, max
    assert meta["parts"]["options"]["wrapper_opt"] == "O0"  # the default: the wrapper compiled at -O0
    assert f"{meta['size_bytes'] / 2**20:.1f} MiB" in line and meta["check"]["hint"]["max_abs"] < 1e-5


def test_other_weights_load_the_same_package_and_equal_eager_torch(hint_build, tiny):
    """Weights live outside the package: a package compiled (in the child, on seeded weights of the
    architecture) serves the tiny preset's seed-0 and seed-1 weights alike, each equal to eager torch
    on its own weights, with no recompile. The seed-1 weights are mapped from the weights cache: views
    into one file, given to the package without a copy of their own (plan.own_storage)."""
    from sdcn_trt.models.presets import load_preset

    cache, _ = hint_build
    load_preset("tiny", seed=1)  # drawn (or already cached): the next load maps them
    first, second = tiny, load_preset("tiny", seed=1)
    mapped = second.controlnet.controlnet_cond_embedding.conv_in.weight  # (what the hint package takes)
    assert mapped.untyped_storage().nbytes() > mapped.numel() * mapped.element_size()  # a view into the file
    assert not torch.equal(first.controlnet.controlnet_cond_embedding.conv_in.weight, mapped)
    results = {}
    for seed, components in ((0, first), (1, second)):
        desc = get_descriptor("control_hint", components)
        runner = InductorRunner(desc, BackendConfig(backend="inductor", cache_dir=str(cache)), SMALL)
        feed = desc.sample_inputs(ShapeSpec(1, 64, 64), seed=7)
        results[seed] = runner.infer(feed)["hint"]
        expected = TorchRunner(desc).infer(feed)["hint"]
        assert runner.package.cached and runner.package.reasons == []  # compiled once, by the CLI fixture
        assert (results[seed] - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert (results[0] - results[1]).abs().max() > 0.1 * results[0].abs().max()  # the weights did reach it
    assert runner.package.size_bytes < 2**24  # kernels only: no weights inside


def test_the_runner_keeps_inductors_own_caches_in_the_sdcn_cache(hint_build, tiny, monkeypatch, caplog):
    """AOTInductor's loader probes the CPU by compiling test programs in inductor's cache folder: the runner
    points that folder into the sdcn_trt cache (no Mega-Cache loaded: that is torch.compile's), so a new
    process with a new temp folder does not compile them again. A cache it cannot use costs a warning."""
    import logging

    from sdcn_trt.engines import compile_cache as cc
    from sdcn_trt.engines.inductor import runner as runner_module

    cache, _ = hint_build
    monkeypatch.setenv(cc.INDUCTOR_ENV, "recorded, so that the test ends with the value it started with")
    monkeypatch.delenv(cc.INDUCTOR_ENV)
    monkeypatch.setattr(cc, "load_artifacts", lambda folder: pytest.fail("loaded torch.compile's artifacts"))
    desc = get_descriptor("control_hint", tiny)
    runner = InductorRunner(desc, BackendConfig(backend="inductor", cache_dir=str(cache)), SMALL)
    runner.activate()
    folder = Path(os.environ[cc.INDUCTOR_ENV])
    assert folder.name == "inductor" and folder.parent.parent == cache / "torch_compile" and runner.package.cached

    def read_only(device, root=None, artifacts=True):
        raise PermissionError(13, "Permission denied", str(cache / "torch_compile"))

    monkeypatch.setattr(runner_module, "use_compile_cache", read_only)
    again = InductorRunner(desc, BackendConfig(backend="inductor", cache_dir=str(cache)), SMALL)
    with caplog.at_level(logging.WARNING, logger="sdcn_trt.engines.inductor.runner"):
        again.activate()
    assert again.is_active and again.package.cached
    assert "compile cache: cannot use" in caplog.text and "Permission denied" in caplog.text


def test_a_deactivated_runner_lets_go_of_the_weights_it_gave_its_package(hint_build, tiny, monkeypatch):
    """Every tensor handed to a package is released when the runner is deactivated, activation after
    activation (AOTInductor's user_managed constants would keep each one alive for good: torch 2.11 and
    2.14 never release them, so a LoRA set or a reopened pipeline would leak a copy of the weights)."""
    import gc
    import weakref

    from sdcn_trt.engines.inductor import build

    handed: list[weakref.ref] = []
    real = build.constant_batches

    def recorded(*args, **kwargs):
        for batch in real(*args, **kwargs):
            handed.extend(weakref.ref(t) for t in batch.values())
            yield batch

    monkeypatch.setattr(build, "constant_batches", recorded)
    cache, _ = hint_build
    desc = get_descriptor("control_hint", tiny)
    runner = InductorRunner(desc, BackendConfig(backend="inductor", cache_dir=str(cache)), SMALL)
    feed = desc.sample_inputs(ShapeSpec(1, 64, 64), seed=7)
    for _ in range(2):
        runner.activate()
        assert runner.package.cached and runner.infer(feed)["hint"].shape[0] == 1
        runner.deactivate()
        gc.collect()
    assert len(handed) > 2 and not [ref for ref in handed if ref() is not None]


def test_the_unpack_strategy_unpacks_where_it_is_told_or_says_it_could_not(hint_build, tiny, tmp_path, caplog):
    """torch 2.14's loader unpacks into $TMPDIR/aotinductor_XXXXXX (what 'unpack-in-cache' points at the
    cache); torch 2.11's (the device image's) unpacks into /tmp/XXXXXX whatever TMPDIR says (seen on the
    CPU with torch 2.11.0), and the load then says so instead of pretending it unpacked in the cache."""
    import gc

    from sdcn_trt.engines.inductor.build import load_compiled, unpack_ignored
    from sdcn_trt.engines.inductor.plan import load_strategy

    cache, _ = hint_build
    package = build_package(get_descriptor("control_hint", tiny), "cpu", "fp32", SMALL, cache)
    before, folder, notes = os.environ.get("TMPDIR"), tmp_path / "unpack", []
    compiled = load_compiled(package.path, torch.device("cpu"), load_strategy("unpack-in-cache"), folder, notes)
    unpacked = [p.name for p in folder.iterdir()]
    if torch_release() >= (2, 14) or unpacked:
        assert len(unpacked) == 1 and unpacked[0].startswith("aotinductor_") and notes == []
    else:
        assert notes == [unpack_ignored(folder)] and unpack_ignored(folder) in caplog.text
    assert os.environ.get("TMPDIR") == before
    del compiled
    gc.collect()


def test_a_loader_that_ignores_tmpdir_is_named(tmp_path, monkeypatch, caplog):
    """The torch 2.11 behaviour, on any torch: a loader that unpacks nowhere near the folder it was given
    leaves a note (the build child's notes reach the package's meta.json and the probe's report)."""
    import torch._inductor

    from sdcn_trt.engines.inductor.build import load_compiled
    from sdcn_trt.engines.inductor.plan import load_strategy

    seen = []
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda path, **kw: seen.append(os.environ["TMPDIR"]) or "model")
    notes: list[str] = []
    folder = tmp_path / "unpack"
    assert load_compiled(tmp_path / "m.pt2", torch.device("cpu"), load_strategy("unpack-in-cache"), folder, notes) == "model"
    assert seen == [str(folder)] and len(notes) == 1
    assert f"ignores TMPDIR: the package was not unpacked in {folder}" in notes[0] and notes[0] in caplog.text
    notes.clear()  # a loader that does unpack there: no note
    monkeypatch.setattr(torch._inductor, "aoti_load_package",
                        lambda path, **kw: (Path(os.environ["TMPDIR"]) / "aotinductor_x").mkdir() or "model")
    load_compiled(tmp_path / "m.pt2", torch.device("cpu"), load_strategy("unpack-in-cache"), folder, notes)
    assert notes == []


def test_a_corrupt_package_is_compiled_again(hint_build, tiny, monkeypatch, caplog):
    """The rebuild itself runs in the next test (a package that does not load); here its reason."""
    from sdcn_trt.engines.inductor import runner as inductor

    cache, _ = hint_build
    desc = get_descriptor("control_hint", tiny)
    package = build_package(desc, "cpu", "fp32", SMALL, cache)
    original = package.path.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF
    package.path.write_bytes(bytes(data))

    def stop(*args):
        raise PackageBuildError("stopped before compiling")

    monkeypatch.setattr(inductor, "build_in_child", stop)
    try:
        with caplog.at_level("INFO", logger="sdcn_trt.engines.inductor"), pytest.raises(PackageBuildError):
            build_package(desc, "cpu", "fp32", SMALL, cache)
    finally:
        package.path.write_bytes(original)
    assert "compiling control_hint with AOTInductor in a child process (fp32, cpu, control (1, 3, 64, 64)): " \
           "the cached package is corrupt (hash mismatch)" in caplog.text
    assert sorted(p.name.split("-")[0] for p in (cache / "inductor").iterdir()) == ["control_hint"]  # no leftovers
    assert build_package(desc, "cpu", "fp32", SMALL, cache).cached


def test_a_package_that_does_not_load_is_rebuilt_and_out_of_memory_is_named(hint_build, tiny, monkeypatch):
    from sdcn_trt.engines.inductor import runner as inductor

    cache, _ = hint_build
    desc = get_descriptor("control_hint", tiny)
    config = BackendConfig(backend="inductor", cache_dir=str(cache))
    real_load = inductor.load_package

    def out_of_memory(*args):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(inductor, "load_package", out_of_memory)
    with pytest.raises(DeviceMemoryError, match=r"out of GPU memory while loading the 'control_hint' package "
                                                r"\(control \(1, 3, 64, 64\)\): CUDA error: out of memory"):
        InductorRunner(desc, config, SMALL).activate()

    loaded = []

    def unreadable_once(path, *args):  # the cached package does not load; the rebuilt one does
        loaded.append(path)
        if len(loaded) == 1:
            raise RuntimeError("PytorchStreamReader failed reading zip archive")
        return real_load(path, *args)

    monkeypatch.setattr(inductor, "load_package", unreadable_once)
    runner = InductorRunner(desc, config, SMALL)
    runner.activate()
    assert len(loaded) == 2 and runner.package.path == loaded[0] == loaded[1]
    assert not runner.package.cached and runner.package.reasons == [
        "the cached package does not load: PytorchStreamReader failed reading zip archive"]
    feed = desc.sample_inputs(ShapeSpec(1, 64, 64))
    assert (runner.infer(feed)["hint"] - TorchRunner(desc).infer(feed)["hint"]).abs().max() < 1e-5


@pytest.mark.slow
def test_changed_shapes_rebuild_and_dynamic_ranges_run(hint_build, tiny):
    cache, _ = hint_build
    desc = get_descriptor("control_hint", tiny)
    dynamic = InductorSettings(ShapeRange(ShapeSpec(1, 64, 64), ShapeSpec(1, 64, 64), ShapeSpec(3, 128, 128)))
    runner = InductorRunner(desc, BackendConfig(backend="inductor", cache_dir=str(cache)), dynamic)
    runner.activate()
    assert runner.package.reasons[-1] == "the shapes changed: control (1, 3, 64, 64) -> (1, 3, 64, 64)..(3, 3, 128, 128)"
    reference = TorchRunner(desc)
    for spec in (ShapeSpec(1, 64, 64), ShapeSpec(3, 128, 64), ShapeSpec(2, 64, 128)):
        feed = desc.sample_inputs(spec)
        assert (runner.infer(feed)["hint"] - reference.infer(feed)["hint"]).abs().max() < 1e-5


@pytest.mark.slow
def test_inductor_pipeline_matches_torch_end_to_end(tiny, photo, fused_runner, monkeypatch):
    """All four networks compiled for the contest shape, the whole loop on static buffers: uint8 images
    within 1 level of eager torch; a second pipeline compiles nothing; with compiled_networks=
    ("fused_step",) the image is the all-compiled one's within 1 level."""
    config = GenerationConfig(image_resolution=256, ddim_steps=4, eta=0.5, guess_mode=True)
    reference = ControlNetPipeline(tiny).run(photo, config).images[0]
    pipe = ControlNetPipeline(tiny, BackendConfig(backend="inductor", cuda_graph="loop"))
    image = pipe.run(photo, config).images[0]
    diff = pixel_diff(image, reference)
    assert image.shape == (256, 384, 3) and diff.max() <= 1 and diff.mean() < 0.01
    assert pipe.runners["fused_step"].package.cached  # compiled by the fixture

    from sdcn_trt.engines.inductor import runner as inductor

    monkeypatch.setattr(inductor, "build_in_child", lambda *a, **k: pytest.fail("recompiled"))
    again = ControlNetPipeline(tiny, BackendConfig(backend="inductor"))
    assert np.array_equal(again.run(photo, config).images[0], image)
    assert all(r.package.cached for r in again.runners.values())
    # only the fused step compiled (its package reused), the rest on torch: the all-compiled image, within 1 level
    step_only = ControlNetPipeline(tiny, BackendConfig(backend="inductor", cuda_graph="loop",
                                                       compiled_networks=("fused_step",)))
    partial = step_only.run(photo, config).images[0]
    diff = pixel_diff(partial, image)
    assert diff.max() <= 1 and diff.mean() < 0.01
    assert [n for n, r in step_only.runners.items() if isinstance(r, InductorRunner)] == ["fused_step"]


# -- on a GPU -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpu_inductor_pipe(tiny):
    return ControlNetPipeline(tiny, BackendConfig(backend="inductor", device="cuda", precision="fp16",
                                                  cuda_graph="loop"))


@pytest.mark.gpu
@pytest.mark.slow  # compiles packages for minutes: gpu_check.sh's tests-slow step
@cuda
def test_inductor_fp16_loop_graph_matches_torch_fp16(tiny, photo, gpu_inductor_pipe):
    config = GenerationConfig(image_resolution=256, ddim_steps=6, eta=0.3)
    torch_fp16 = ControlNetPipeline(tiny, BackendConfig(device="cuda", precision="fp16")).run(photo, config).images[0]
    first = gpu_inductor_pipe.run(photo, config).images[0]
    second = gpu_inductor_pipe.run(photo, config).images[0]  # a replay
    assert np.array_equal(first, second)
    diff = pixel_diff(first, torch_fp16)
    print(f"inductor fp16 + loop graph vs torch fp16 eager (tiny, CUDA): max {diff.max()}, mean {diff.mean():.4f}")
    assert diff.mean() <= 2.0


@pytest.mark.gpu
@pytest.mark.slow  # compiles packages for minutes: gpu_check.sh's tests-slow step
@cuda
def test_inductor_replay_never_synchronises_with_the_host(photo, gpu_inductor_pipe):
    config = GenerationConfig(image_resolution=256, ddim_steps=4, eta=0.5)
    gpu_inductor_pipe.run(photo, config)  # compile (or reuse) and capture
    loop = next(loop for key, loop in gpu_inductor_pipe._loops.items() if key.timesteps == (751, 501, 251, 1))
    replay_without_host_sync(loop)


@pytest.mark.gpu
@pytest.mark.slow  # compiles packages for minutes: gpu_check.sh's tests-slow step
@cuda
def test_one_cuda_package_serves_other_weights_of_its_architecture(tiny, tmp_path):
    """The weights-outside design on CUDA fp16: tiny seed 0 and seed 1 through one fused-step package,
    each close to eager torch fp16 on its own weights."""
    from sdcn_trt.models.presets import load_preset

    config = BackendConfig(backend="inductor", device="cuda", precision="fp16", cache_dir=str(tmp_path))
    paths = []
    for components in (tiny, load_preset("tiny", seed=1)):
        desc = get_descriptor("fused_step", components)
        runner = InductorRunner(desc, config)
        feed = desc.sample_inputs(ShapeSpec(), "cuda", seed=3)
        actual = runner.infer(feed)["noise_pred"]
        expected = TorchRunner(desc, "cuda", "fp16").infer(feed)["noise_pred"]
        assert (actual - expected).abs().max() <= 2e-2 * expected.abs().max()
        paths.append(runner.package.path)
    assert paths[0] == paths[1] and len(list((tmp_path / "inductor").iterdir())) == 1
