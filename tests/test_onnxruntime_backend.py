"""The whole pipeline on onnxruntime reproduces the torch backend's images (fp32, CPU)."""
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
    with pytest.raises(InputError, match=r"control_hint: input 'control' has shape \(1, 3, 64, 2560\); the profile allows \(1, 3, 64, 64\) .. \(4, 3, 2048, 2048\)"):
        ort_pipe.run(wide, config)
