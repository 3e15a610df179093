"""The whole pipeline on onnxruntime reproduces the torch backend's images (fp32, CPU)."""
import re

import numpy as np
import pytest

from sdcn_trt import ControlNetPipeline, GenerationConfig, InputError
from tests.conftest import pixel_diff


@pytest.fixture(scope="module")
def ort_pipe(tiny):
    return ControlNetPipeline(tiny, "onnxruntime")


@pytest.mark.parametrize("settings", [
    dict(seed=2946901, prompt="a bird"),
    dict(seed=1, prompt="a cat sitting on a sofa", guess_mode=True),
    dict(seed=99, prompt="a house", scale=7.5, strength=0.6, eta=0.5),
    dict(seed=12345, prompt="", guess_mode=True, scale=1.0),
])
def test_onnxruntime_matches_torch(tiny_pipe, ort_pipe, photo, settings):
    config = GenerationConfig(image_resolution=64, ddim_steps=6, **settings)
    torch_image = tiny_pipe.run(photo, config).images[0]
    ort_image = ort_pipe.run(photo, config).images[0]
    diff = pixel_diff(torch_image, ort_image)
    assert diff.mean() <= 1.0 and diff.max() <= 2, (diff.mean(), diff.max())


@pytest.mark.parametrize("schedule", ["eps=3", "control=3", "deepcache=2"])
def test_schedules_on_onnxruntime_match_torch(tiny_pipe, ort_pipe, photo, schedule):
    """Partial steps run the split networks (ControlNet alone, UNet on residuals, deep/shallow UNets)
    exported like the others."""
    config = GenerationConfig(image_resolution=64, ddim_steps=6, schedule=schedule)
    diff = pixel_diff(tiny_pipe.run(photo, config).images[0], ort_pipe.run(photo, config).images[0])
    assert diff.mean() <= 1.0 and diff.max() <= 2, (diff.mean(), diff.max())


def test_shape_outside_profile_is_a_clear_error(ort_pipe):
    config = GenerationConfig(image_resolution=64, ddim_steps=1, max_side=4096)  # past the size guard
    wide = np.zeros((64, 64 * 40, 3), np.uint8)  # resizes to 64 x 2560: past the 2048 limit
    with pytest.raises(InputError, match=r"control_hint: input 'control' has shape \(1, 3, 64, 2560\); the profile allows \(1, 3, 64, 64\) .. \(64, 3, 2048, 2048\)"):
        ort_pipe.run(wide, config)


# -- availability on a device: the CUDA execution provider, asked for before anything runs ----------------
def _machine(monkeypatch, providers, torch_gpu):
    """A machine whose onnxruntime offers `providers` and whose torch sees a GPU or not."""
    import onnxruntime
    import torch

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: list(providers))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: torch_gpu)


CPU_BUILD = "here has no CUDAExecutionProvider (the CPU build: its providers are CPUExecutionProvider"


def test_onnxruntime_on_cuda_needs_its_cuda_execution_provider(monkeypatch, tiny):
    import onnxruntime

    from sdcn_trt import BackendConfig, BackendUnavailableError, backend_available
    from sdcn_trt.engines import create_runner
    from sdcn_trt.export.descriptors import get_descriptor

    _machine(monkeypatch, ["CPUExecutionProvider"], torch_gpu=True)  # a GPU machine with the CPU build
    ok, why = backend_available("onnxruntime", "cuda:0")
    assert not ok and why == (f"onnxruntime {onnxruntime.__version__} {CPU_BUILD}): pip uninstall onnxruntime && "
                              "pip install onnxruntime-gpu, or use device 'cpu'")
    assert backend_available("onnxruntime", "cpu") == (True, "")
    assert backend_available("torch", "cuda") == (True, "")
    with pytest.raises(BackendUnavailableError, match=f"backend 'onnxruntime' is unavailable: .*{re.escape(CPU_BUILD)}"):
        create_runner(get_descriptor("control_hint", tiny), BackendConfig("onnxruntime", device="cuda"))

    _machine(monkeypatch, ["CUDAExecutionProvider", "CPUExecutionProvider"], torch_gpu=True)
    assert backend_available("onnxruntime", "cuda") == (True, "")
    _machine(monkeypatch, ["CUDAExecutionProvider", "CPUExecutionProvider"], torch_gpu=False)
    no_gpu = (False, "device 'cuda' was asked for but torch sees no CUDA GPU here")
    assert backend_available("onnxruntime", "cuda") == no_gpu and backend_available("torch", "cuda") == no_gpu


def test_contest_runs_onnxruntime_where_it_can(monkeypatch, tmp_path):
    """SDCN_BACKEND=onnxruntime on a GPU machine: cuda when the provider is there, else the CPU and why;
    SDCN_DEVICE=cuda with the CPU build stops initialize() before any weights load."""
    import sdcn_trt.contest as contest
    from sdcn_trt import BackendUnavailableError

    monkeypatch.setattr(contest, "cuda_available", lambda: True)
    _machine(monkeypatch, ["CPUExecutionProvider"], torch_gpu=True)
    settings = contest.ContestSettings.from_env({"SDCN_BACKEND": "onnxruntime"})
    assert (settings.backend.device, settings.backend.precision, settings.backend.cuda_graph) == ("cpu", "fp32", "off")
    assert settings.reason.startswith("onnxruntime on cpu, fp32, CUDA graph off: set by SDCN_BACKEND; on the CPU, "
                                      f"since onnxruntime on cuda is unavailable: onnxruntime ")
    assert CPU_BUILD in settings.reason

    monkeypatch.chdir(tmp_path)  # no checkpoint here: the backend error must come first
    cuda = contest.ContestSettings.from_env({"SDCN_BACKEND": "onnxruntime", "SDCN_DEVICE": "cuda"})
    with pytest.raises(BackendUnavailableError, match=f"backend 'onnxruntime' is unavailable: .*{re.escape(CPU_BUILD)}"):
        contest.hackathon(cuda).initialize()

    _machine(monkeypatch, ["CUDAExecutionProvider", "CPUExecutionProvider"], torch_gpu=True)
    settings = contest.ContestSettings.from_env({"SDCN_BACKEND": "onnxruntime"})
    assert (settings.backend.device, settings.backend.precision, settings.backend.cuda_graph) == ("cuda", "fp16", "loop")
    assert settings.reason == "onnxruntime on cuda, fp16, CUDA graph loop: set by SDCN_BACKEND"


def test_cli_checks_the_backend_before_loading_weights(monkeypatch, tmp_path, photo, capsys):
    import cv2

    from sdcn_trt.cli import main

    _machine(monkeypatch, ["CPUExecutionProvider"], torch_gpu=True)
    cv2.imwrite(str(tmp_path / "cat.png"), photo)
    rc = main(["generate", str(tmp_path / "cat.png"), "-o", str(tmp_path / "out"), "--backend", "onnxruntime",
               "--device", "cuda", "--checkpoint", str(tmp_path / "missing.pth")])  # a missing file would fail later
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: backend 'onnxruntime' is unavailable: onnxruntime ") and CPU_BUILD in err


def test_a_cached_export_is_a_debug_line_an_export_news(tiny, tmp_path, caplog):
    """A warm start says nothing at INFO about the caches it used (the demo's progress bar stays clean)."""
    import logging

    from sdcn_trt import BackendConfig
    from sdcn_trt.engines import create_runner
    from sdcn_trt.export.descriptors import get_descriptor

    config = BackendConfig(backend="onnxruntime", cache_dir=str(tmp_path))
    desc = get_descriptor("control_hint", tiny)
    with caplog.at_level(logging.INFO, logger="sdcn_trt"):
        create_runner(desc, config).activate()
    assert "control_hint: fp32 ONNX at" in caplog.text and "exported in" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="sdcn_trt"):
        create_runner(desc, config).activate()
    hits = [r for r in caplog.records if "control_hint: fp32 ONNX at" in r.getMessage()]
    assert len(hits) == 1 and hits[0].levelno == logging.DEBUG
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and r.name.startswith("sdcn_trt")]
