"""The torch backend through torch.compile (BackendConfig.compile): settings and their errors, which
networks compile, compiled outputs against eager on the CPU, a compiler that fails, the CLI flag; the
CUDA path (compiled kernels inside the whole-loop graph) is a GPU test."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from sdcn_trt import BackendConfig, ControlNetPipeline, GenerationConfig, InputError
from sdcn_trt.cli import main
from sdcn_trt.engines import create_runner
from sdcn_trt.engines.torch import TorchRunner, compile_status
from sdcn_trt.errors import BackendUnavailableError
from sdcn_trt.export.descriptors import ShapeSpec, get_descriptor
from tests.conftest import replay_without_host_sync


@pytest.mark.parametrize("options, message", [
    (dict(compile="reduce-overhead"), "compile='reduce-overhead' captures CUDA graphs of its own, which cannot sit "
                                      "inside the loop's; use compile='max-autotune-no-cudagraphs' (or 'default')"),
    (dict(compile="max-autotune"), "compile='max-autotune' captures CUDA graphs of its own"),
    (dict(compile="fast"), "unknown compile mode 'fast'; choose one of off, default, max-autotune-no-cudagraphs"),
    (dict(backend="inductor", compile="default"), "compile='default' is the torch backend's torch.compile; backend "
                                                  "'inductor' builds AOTInductor packages of its own"),
    (dict(backend="onnxruntime", compile="default"), "backend 'onnxruntime' compiles nothing with it: use "
                                                     "backend='torch' or compile='off'"),
])
def test_compile_settings_are_checked(options, message):
    with pytest.raises(InputError) as exc:
        BackendConfig(**options)
    assert message in str(exc.value)


def test_compile_chooses_the_networks_and_create_runner_follows(tiny):
    config = BackendConfig(compile="default", compiled_networks=("fused_step",))
    assert config.compiles("fused_step") and not config.compiles("vae_decoder")
    assert BackendConfig(compile="default").compiles("vae_decoder")
    assert not BackendConfig(compiled_networks=("fused_step",)).compiles("fused_step")  # compile off: eager
    assert not BackendConfig(backend="inductor").compiles("fused_step")  # inductor builds, it does not torch.compile
    runners = {n: create_runner(get_descriptor(n, tiny), config) for n in ("fused_step", "vae_decoder")}
    assert all(type(r) is TorchRunner for r in runners.values())
    assert (runners["fused_step"].compile, runners["vae_decoder"].compile) == ("default", "off")
    with pytest.raises(InputError, match="unknown compile mode 'fast'"):
        TorchRunner(get_descriptor("vae_decoder", tiny), compile="fast")


def test_compiled_network_matches_eager_on_the_cpu(tiny):
    desc = get_descriptor("text_encoder", tiny)
    feed = desc.sample_inputs(ShapeSpec(1, 64, 64))
    eager = TorchRunner(desc).infer(feed)["text_embeddings"].clone()
    compiled = TorchRunner(desc, compile="default")
    out = compiled.infer(feed)["text_embeddings"]
    assert isinstance(compiled.module, torch._dynamo.eval_frame.OptimizedModule)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


def test_missing_compiler_is_named_before_any_weights_run(tiny, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    assert compile_status("cpu") == (False, "torch.compile on the CPU needs a C++ compiler and '/nonexistent/g++' "
                                            "was not found on PATH: install g++ (apt-get install g++) or set CXX to one")
    with pytest.raises(BackendUnavailableError, match=re.escape("compile='default' is unavailable: torch.compile on "
                                                                "the CPU needs a C++ compiler")):
        create_runner(get_descriptor("vae_decoder", tiny), BackendConfig(compile="default"))
    create_runner(get_descriptor("vae_decoder", tiny), BackendConfig())  # eager needs none


def test_gpu_toolchain_for_torch_compile_is_checked(monkeypatch):
    """On CUDA torch.compile needs Triton and a C compiler for Triton's launcher (gcc, clang or $CC)."""
    import importlib.util
    import shutil

    from sdcn_trt.engines import torch as torch_engine

    found = {"triton": True, "gcc": "/usr/bin/gcc", "clang": None, "cc-x": None}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if found.get(name) else None)
    monkeypatch.setattr(shutil, "which", lambda name: found.get(name))
    monkeypatch.delenv("CC", raising=False)
    assert torch_engine.compile_status("cuda") == (True, "")
    found["gcc"] = None
    assert torch_engine.compile_status("cuda") == (False, "torch.compile on a GPU needs a C compiler for Triton's "
                                                          "launcher and neither gcc nor clang is on PATH: install "
                                                          "gcc (apt-get install gcc) or set CC to one")
    monkeypatch.setenv("CC", "cc-x")
    assert "and 'cc-x' was not found on PATH" in torch_engine.compile_status("cuda")[1]
    found["triton"] = None
    assert torch_engine.compile_status("cuda") == (False, "torch.compile on a GPU needs Triton, which is not "
                                                          "installed: pip install triton")


def test_a_failing_compiler_is_one_error_naming_network_mode_and_inputs(tmp_path):
    """A compiler that exists but fails (here /bin/false as CXX), in a fresh process (inductor remembers
    the compiler it found): CompileError naming the network, the mode, the inputs and the cause."""
    code = ("from sdcn_trt.models.presets import load_preset\n"
            "from sdcn_trt.export.descriptors import ShapeSpec, get_descriptor\n"
            "from sdcn_trt.engines.torch import TorchRunner\n"
            "from sdcn_trt.errors import CompileError\n"
            "d = get_descriptor('text_encoder', load_preset('tiny'))\n"
            "try:\n"
            "    TorchRunner(d, compile='default').infer(d.sample_inputs(ShapeSpec(1, 64, 64)))\n"
            "except CompileError as exc:\n"
            "    print('CompileError:', exc)\n")
    env = {**os.environ, "CXX": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("CompileError: torch.compile (mode 'default') failed on network 'text_encoder' "
                                  "for inputs input_ids (2, 77): InductorError: InvalidCxxCompiler"), proc.stdout
    assert proc.stdout.rstrip().endswith("compile='off' runs it without torch.compile")


def test_cli_compile_flag_maps_onto_the_backend(photo_file, tmp_path, capsys):
    rc = main(["generate", str(photo_file), "--preset", "tiny", "--backend", "onnxruntime", "--compile", "default",
               "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "error: compile='default' is the torch backend's torch.compile" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["generate", str(photo_file), "--compile", "reduce-overhead"])
    assert "argument --compile: invalid choice: 'reduce-overhead'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_pipeline_with_the_compiled_step_matches_eager(tiny, photo):
    """The static loop (what cuda_graph='loop' captures) with only the fused step compiled: images within
    1 level of eager torch (inductor's CPU kernels sum in another order)."""
    config = GenerationConfig(image_resolution=64, ddim_steps=4)
    eager = ControlNetPipeline(tiny).run(photo, config).images[0]
    pipe = ControlNetPipeline(tiny, BackendConfig(cuda_graph="loop", compile="default", compiled_networks=("fused_step",)))
    compiled = pipe.run(photo, config).images[0]
    assert np.abs(compiled.astype(int) - eager).max() <= 1
    assert pipe.runners["fused_step"].compile == "default" and pipe.runners["vae_decoder"].compile == "off"


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")


@pytest.mark.gpu
@pytest.mark.slow  # compiles for minutes: gpu_check.sh's tests-slow step
@cuda
@pytest.mark.parametrize("mode", ["default", "max-autotune-no-cudagraphs"])
def test_compiled_step_inside_the_loop_graph_on_cuda(tiny, photo, mode):
    """fp16 on CUDA: the compiled fused step captured in the whole-loop graph; replays equal the first run,
    never wait for the host, and stay within 1 level of the eager fp16 loop."""
    config = GenerationConfig(image_resolution=64, ddim_steps=4)
    eager = ControlNetPipeline(tiny, BackendConfig(device="cuda", precision="fp16")).run(photo, config).images[0]
    pipe = ControlNetPipeline(tiny, BackendConfig(device="cuda", precision="fp16", cuda_graph="loop", compile=mode,
                                                  compiled_networks=("fused_step",)))
    first = pipe.run(photo, config).images[0]
    assert np.array_equal(pipe.run(photo, config).images[0], first)
    assert np.abs(first.astype(int) - eager).max() <= 1
    (loop,) = pipe._loops.values()
    replay_without_host_sync(loop)


def test_compile_flags_are_checked_and_reach_torch_compile(tiny, monkeypatch):
    """BackendConfig.compile_flags: validated, sorted, refused without a mode; the runner hands torch.compile the
    mode's own inductor options with the flags' settings over them (torch takes a mode or options, not both)."""
    from sdcn_trt.engines.torch import compile_arguments

    config = BackendConfig(compile="default", compile_flags=["no_epilogue_fusion", "conv_1x1_as_mm", "conv_1x1_as_mm"])
    assert config.compile_flags == ("conv_1x1_as_mm", "no_epilogue_fusion")
    with pytest.raises(InputError, match="unknown compile flag 'fast'; choose one of conv_1x1_as_mm, "
                                         "coordinate_descent_tuning, no_epilogue_fusion"):
        BackendConfig(compile="default", compile_flags=("fast",))
    with pytest.raises(InputError, match="compile_flags must be a list of names, got 'conv_1x1_as_mm'"):
        BackendConfig(compile="default", compile_flags="conv_1x1_as_mm")
    with pytest.raises(InputError, match="they need compile='default' or 'max-autotune-no-cudagraphs'"):
        BackendConfig(compile_flags=("conv_1x1_as_mm",))
    with pytest.raises(InputError, match="need a torch.compile mode, not compile='off'"):
        TorchRunner(get_descriptor("control_hint", tiny), compile_flags=("conv_1x1_as_mm",))
    assert compile_arguments("default", ()) == {"mode": None}
    assert compile_arguments("max-autotune-no-cudagraphs", ()) == {"mode": "max-autotune-no-cudagraphs"}
    assert compile_arguments("default", ("conv_1x1_as_mm", "no_epilogue_fusion")) == {
        "options": {"conv_1x1_as_mm": True, "epilogue_fusion": False}}
    tuned = compile_arguments("max-autotune-no-cudagraphs", ("no_epilogue_fusion",))["options"]
    assert tuned["max_autotune"] is True and tuned["epilogue_fusion"] is False
    runner = create_runner(get_descriptor("control_hint", tiny), BackendConfig(
        compile="default", compile_flags=("conv_1x1_as_mm",), compiled_networks=("control_hint",)))
    assert runner.compile_flags == ("conv_1x1_as_mm",)
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: seen.update(kwargs) or module)
    runner.activate()
    assert seen == {"options": {"conv_1x1_as_mm": True}}
    eager = create_runner(get_descriptor("vae_decoder", tiny), BackendConfig(
        compile="default", compile_flags=("conv_1x1_as_mm",), compiled_networks=("control_hint",)))
    assert (eager.compile, eager.compile_flags) == ("off", ())  # not a compiled network: no flags either


def test_cli_compile_flags_map_onto_the_backend(photo_file, tmp_path, capsys):
    from sdcn_trt.cli import build_parser
    from sdcn_trt.cli_options import backend_config

    args = build_parser().parse_args(["generate", str(photo_file), "--compile", "default", "--compile-flags",
                                      "coordinate_descent_tuning", "conv_1x1_as_mm"])
    assert backend_config(args).compile_flags == ("conv_1x1_as_mm", "coordinate_descent_tuning")
    rc = main(["generate", str(photo_file), "--preset", "tiny", "--compile-flags", "conv_1x1_as_mm",
               "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "compile_flags conv_1x1_as_mm are torch.compile's inductor settings" in err
    assert not (tmp_path / "out").exists()


def test_regional_compilation_compiles_each_block_kind_once_per_shape(tiny):
    """compile_scope='blocks': the VAE decoder's ResNet blocks and upsamplers are compiled apart (the glue stays
    eager), blocks of one kind and shape share a graph, and the output matches eager."""
    from diffusers.models.resnet import ResnetBlock2D, Upsample2D
    from torch._dynamo.utils import counters

    with pytest.raises(InputError, match="compile_scope='blocks' says what torch.compile compiles; it needs"):
        BackendConfig(compile_scope="blocks")
    with pytest.raises(InputError, match="unknown compile_scope 'layers'; choose one of whole, blocks"):
        BackendConfig(compile="default", compile_scope="layers")
    desc = get_descriptor("vae_decoder", tiny)
    feed = desc.sample_inputs(ShapeSpec(1, 64, 64))
    eager = TorchRunner(desc).infer(feed)["images"].clone()
    runner = create_runner(desc, BackendConfig(compile="default", compile_scope="blocks"))
    runner.activate()
    assert not isinstance(runner.module, torch._dynamo.eval_frame.OptimizedModule)  # the module itself runs eager
    regions = [m for m in runner.module.modules() if isinstance(m, (ResnetBlock2D, Upsample2D))]
    assert regions and all(m._compiled_call_impl is not None for m in regions)
    shared = [m for m in tiny.vae.modules() if isinstance(m, (ResnetBlock2D, Upsample2D))]
    assert shared and all(m._compiled_call_impl is None for m in shared)  # compiled on a copy, never the session's
    counters.clear()
    out = runner.infer(feed)["images"]
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-3)
    shapes = {(type(m).__name__, m.in_channels if hasattr(m, "in_channels") else m.channels) for m in regions}
    assert counters["stats"]["unique_graphs"] < len(regions)  # repeated blocks reuse a compiled graph
    assert counters["stats"]["unique_graphs"] >= len({kind for kind, _ in shapes})


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_fused_step_compiles_as_one_graph_on_either_fast_path(tiny, device):
    """No graph breaks: dynamo traces the whole fused step (the CPU fast path, and the CUDA one's NHWC
    layout and GroupNorm+SiLU, on CPU tensors) into one graph, so a compile is one inductor run and the
    compiled step never drops back to Python between pieces. A break added later fails here."""
    import torch._dynamo

    from sdcn_trt.engines.torch import FastPath, prepare_module

    cpu = torch.device("cpu")
    fast = FastPath.default_for(torch.device(device), torch.float16 if device == "cuda" else torch.float32)
    desc = get_descriptor("fused_step", tiny)
    module = prepare_module(desc, cpu, torch.float32, fast, private=True)
    feed = desc.sample_inputs(ShapeSpec(), cpu)
    with torch.no_grad():
        explained = torch._dynamo.explain(module)(*(feed[n] for n in desc.input_names))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
