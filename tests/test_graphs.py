"""The static-buffer loop that CUDA graphs capture, checked eagerly on the CPU; GPU tests skip here."""
import numpy as np
import pytest
import torch

from sdcn_trt import BackendConfig, ControlNetPipeline, GenerationConfig, InputError
from sdcn_trt.engines.base import NonFiniteOutputError


@pytest.fixture(scope="module")
def static_pipe(tiny):
    return ControlNetPipeline(tiny, BackendConfig(cuda_graph="loop"))


@pytest.mark.parametrize("settings", [dict(), dict(eta=0.7, guess_mode=True, num_samples=2), dict(scale=1.0)])
def test_static_loop_equals_the_eager_loop(tiny_pipe, static_pipe, photo, settings):
    config = GenerationConfig(image_resolution=64, ddim_steps=4, **settings)
    eager = tiny_pipe.run(photo, config).images
    static = static_pipe.run(photo, config).images
    assert all(np.array_equal(a, b) for a, b in zip(eager, static, strict=True))


def test_loops_are_keyed_by_what_they_bake_in(tiny, photo):
    pipe = ControlNetPipeline(tiny, BackendConfig(cuda_graph="loop"))
    config = GenerationConfig(image_resolution=64, ddim_steps=2)
    pipe.run(photo, config)
    pipe.run(photo, config.replace(seed=9, prompt="other"))  # same shapes and constants: reused
    assert len(pipe._graphs) == 1
    for change in (dict(scale=5.0), dict(ddim_steps=4), dict(eta=0.5), dict(num_samples=2), dict(image_resolution=128)):
        pipe.run(photo, config.replace(**change))
    assert len(pipe._graphs) == 6
    keys = list(pipe._graphs)
    assert keys[0].timesteps == (501, 1) and keys[1].scale == 5.0 and keys[2].timesteps == (751, 501, 251, 1)


def test_graph_modes_are_validated():
    with pytest.raises(InputError, match="unknown cuda_graph mode 'all'"):
        BackendConfig(cuda_graph="all")
    with pytest.raises(InputError, match="cuda_graph='step' needs device='cuda'"):
        BackendConfig(cuda_graph="step")


def test_nonfinite_outputs_name_the_network(tiny, photo, monkeypatch):
    pipe = ControlNetPipeline(tiny, BackendConfig(check_finite=True))
    runner = pipe.runners["fused_step"]
    runner.activate()
    real = runner.module.forward

    def overflow(*args):
        out = real(*args)
        out[0, 0, 0, 0] = float("inf")
        return out

    monkeypatch.setattr(runner.module, "forward", overflow)
    with pytest.raises(NonFiniteOutputError, match="network 'fused_step' produced 1 NaN/Inf values in 'noise_pred'"):
        pipe.run(photo, GenerationConfig(image_resolution=64, ddim_steps=1))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("mode", ["step", "loop"])
def test_cuda_graphs_match_eager_cuda(tiny, photo, mode):
    config = GenerationConfig(image_resolution=64, ddim_steps=4, eta=0.3)
    eager = ControlNetPipeline(tiny, BackendConfig(device="cuda")).run(photo, config).images[0]
    graphed_pipe = ControlNetPipeline(tiny, BackendConfig(device="cuda", cuda_graph=mode))
    first = graphed_pipe.run(photo, config).images[0]
    second = graphed_pipe.run(photo, config).images[0]  # a replay
    assert np.array_equal(first, second)
    assert np.abs(first.astype(int) - eager).max() <= 1


@pytest.mark.gpu
@cuda
def test_fp16_cuda_close_to_fp32_cpu(tiny, photo):
    config = GenerationConfig(image_resolution=64, ddim_steps=4)
    ref = ControlNetPipeline(tiny).run(photo, config).images[0]
    fp16 = ControlNetPipeline(tiny, BackendConfig(device="cuda", precision="fp16", cuda_graph="loop")).run(photo, config).images[0]
    assert np.abs(fp16.astype(int) - ref).mean() <= 3.0


@pytest.mark.tensorrt
@pytest.mark.skipif(not __import__("sdcn_trt").backend_available("tensorrt")[0],
                    reason="needs TensorRT and a CUDA GPU (not installable here)")
def test_tensorrt_pipeline_close_to_torch(tiny, photo):
    config = GenerationConfig(image_resolution=256, ddim_steps=4)
    ref = ControlNetPipeline(tiny).run(photo, config).images[0]
    trt = ControlNetPipeline(tiny, BackendConfig(backend="tensorrt", device="cuda", precision="fp16", cuda_graph="loop"))
    assert np.abs(trt.run(photo, config).images[0].astype(int) - ref).mean() <= 3.0


def test_eps_reuse_in_eager_and_static_loops(tiny_pipe, static_pipe, photo):
    config = GenerationConfig(image_resolution=64, ddim_steps=6, eps_steps=3)
    calls = []
    runner = tiny_pipe.runners["fused_step"]
    real = runner.infer_impl
    runner.infer_impl = lambda feed: calls.append(float(feed["timestep"])) or real(feed)
    try:
        eager = tiny_pipe.run(photo, config).images[0]
    finally:
        runner.infer_impl = real
    assert calls == [997.0, 665.0, 333.0]  # 6 steps run 7 timesteps (997, 831, ..., 1) in ldm; 0, 2, 4 evaluate
    assert np.array_equal(eager, static_pipe.run(photo, config).images[0])
    assert not np.array_equal(eager, tiny_pipe.run(photo, config.replace(eps_steps=0)).images[0])
