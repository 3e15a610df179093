"""Shared fixtures: one tiny model per session, an isolated cache, small test photos."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

# Everything the code under test and its child processes put in the temp folder (the app's downloads,
# Gradio's uploads, inductor's kernel cache, unpacked AOTInductor packages, pytest's own tmp_path
# folders) goes into one folder per test run, removed when the run passes and kept, with its path
# printed, when it fails: test runs must not fill the machine's /tmp (a full disk failed a CI install).
RUN_TMP = Path(tempfile.mkdtemp(prefix="sdcn-tests-"))
os.environ["TMPDIR"] = str(RUN_TMP)
os.environ["GRADIO_TEMP_DIR"] = str(RUN_TMP / "gradio")
tempfile.tempdir = str(RUN_TMP)


def pytest_sessionfinish(session, exitstatus):
    if exitstatus == 0:
        shutil.rmtree(RUN_TMP, ignore_errors=True)
    else:
        print(f"\ntest run's temporary files kept in {RUN_TMP}")


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Every test run exports and caches into its own folder, never the user's cache."""
    path = tmp_path_factory.mktemp("sdcn_cache")
    old = os.environ.get("SDCN_TRT_CACHE")
    os.environ["SDCN_TRT_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("SDCN_TRT_CACHE", None)
    else:
        os.environ["SDCN_TRT_CACHE"] = old


@pytest.fixture(scope="session")
def tiny():
    from sdcn_trt.models.presets import load_preset

    return load_preset("tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_pipe(tiny):
    from sdcn_trt import ControlNetPipeline

    return ControlNetPipeline(tiny, "torch")


@pytest.fixture(scope="session")
def photo():
    """A real photo (scikit-image's cat), 90x135 RGB: resizes to 64x128 at resolution 64."""
    import cv2
    import skimage.data

    return cv2.resize(skimage.data.chelsea(), (135, 90), interpolation=cv2.INTER_AREA)


@pytest.fixture
def photo_file(tmp_path, photo):
    """The photo as a JPEG file, alone in a folder (tmp_path/in/cat.jpg), as the command line reads photos."""
    import cv2

    path = tmp_path / "in" / "cat.jpg"
    path.parent.mkdir()
    cv2.imwrite(str(path), photo[:, :, ::-1])
    return path


@pytest.fixture
def fast_config():
    from sdcn_trt import GenerationConfig

    return GenerationConfig(image_resolution=64, ddim_steps=2)


def replay_without_host_sync(loop) -> None:
    """Replay a captured CUDA-graph loop under sync-debug 'error': raises if any operation in it waits
    for the host."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loop.replay()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def pixel_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16))
