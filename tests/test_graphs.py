"""The one denoising loop: eager, static-buffer (what CUDA graphs capture, run eagerly on the CPU) and
graphed variants, schedules of step kinds; GPU tests skip here."""

import numpy as np
import pytest
import torch

from sdcn_trt import BackendConfig, ControlNetPipeline, GenerationConfig, InputError
from sdcn_trt.engines.base import NonFiniteOutputError
from tests.conftest import replay_without_host_sync


@pytest.fixture(scope="module")
def static_pipe(tiny):
    return ControlNetPipeline(tiny, BackendConfig(cuda_graph="loop"))


@pytest.mark.parametrize("settings", [dict(), dict(eta=0.7, guess_mode=True, num_samples=2), dict(scale=1.0)])
def test_static_loop_equals_the_eager_loop(tiny_pipe, static_pipe, photo, settings):
    config = GenerationConfig(image_resolution=64, ddim_steps=4, **settings)
    eager = tiny_pipe.run(photo, config).images
    static = static_pipe.run(photo, config).images
    assert len(eager) == len(static) == config.num_samples
    assert all(np.array_equal(a, b) for a, b in zip(eager, static, strict=True))


def test_loops_are_keyed_by_what_they_bake_in(tiny, photo):
    pipe = ControlNetPipeline(tiny, BackendConfig(cuda_graph="loop"))
    config = GenerationConfig(image_resolution=64, ddim_steps=2)
    pipe.run(photo, config)
    pipe.run(photo, config.replace(seed=9, prompt="other"))  # same shapes and constants: reused
    assert len(pipe._loops) == 1
    for change in (dict(scale=5.0), dict(ddim_steps=4), dict(eta=0.5), dict(num_samples=2), dict(image_resolution=128)):
        pipe.run(photo, config.replace(**change))
    assert len(pipe._loops) == 6
    keys = list(pipe._loops)
    assert keys[0].timesteps == (501, 1) and keys[1].scale == 5.0 and keys[2].timesteps == (751, 501, 251, 1)


def test_graph_modes_are_validated():
    with pytest.raises(InputError, match="unknown cuda_graph mode 'all'; choose one of off, step, loop"):
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
    with pytest.raises(NonFiniteOutputError,
                       match="network 'fused_step' produced 1 NaN/Inf values in 'noise_pred'") as raised:
        pipe.run(photo, GenerationConfig(image_resolution=64, ddim_steps=1))
    # fp32: not an fp16 overflow, so the message does not blame fp16
    assert str(raised.value).endswith("; in torch.float32, look at the inputs: an extreme scale or eta, or broken weights")


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
@pytest.mark.parametrize("schedule", ["full", "eps=2", "control=2"])
def test_captured_replay_never_synchronises_with_the_host(tiny, photo, schedule):
    """A replay of the whole-loop graph (hint, steps, decode) raises under sync-debug 'error' if any
    operation in it waits for the host."""
    config = GenerationConfig(image_resolution=64, ddim_steps=4, eta=0.5, schedule=schedule)
    pipe = ControlNetPipeline(tiny, BackendConfig(device="cuda", precision="fp16", cuda_graph="loop"))
    pipe.run(photo, config)  # capture
    (loop,) = pipe._loops.values()
    replay_without_host_sync(loop)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("mode", ["step", "loop"])
def test_schedules_run_in_graphs_like_eager_cuda(tiny, photo, mode):
    config = GenerationConfig(image_resolution=64, ddim_steps=6, schedule="control=3")
    eager = ControlNetPipeline(tiny, BackendConfig(device="cuda")).run(photo, config).images[0]
    graphed = ControlNetPipeline(tiny, BackendConfig(device="cuda", cuda_graph=mode)).run(photo, config).images[0]
    assert np.abs(graphed.astype(int) - eager).max() <= 1


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


def _count_calls(pipe, names):
    """Wrap the runners' infer_impl to record (network, timestep) per call."""
    calls = []
    for name in names:
        runner = pipe.runner(name)
        real = runner.infer_impl

        def spy(feed, real=real, name=name):
            calls.append((name, float(feed["timestep"]) if "timestep" in feed else None))
            return real(feed)

        runner.infer_impl = spy
    return calls


def test_eps_reuse_in_eager_and_static_loops(tiny, photo):
    config = GenerationConfig(image_resolution=64, ddim_steps=6, schedule="eps=3")
    eager_pipe = ControlNetPipeline(tiny)
    calls = _count_calls(eager_pipe, ["fused_step", "controlnet", "unet"])
    eager = eager_pipe.run(photo, config).images[0]
    # 6 steps run 7 timesteps (997, 831, ..., 1) in ldm; steps 0, 2, 4 evaluate
    assert calls == [("fused_step", 997.0), ("fused_step", 665.0), ("fused_step", 333.0)]
    static = ControlNetPipeline(tiny, BackendConfig(cuda_graph="loop")).run(photo, config).images[0]
    assert np.array_equal(eager, static)
    assert not np.array_equal(eager, eager_pipe.run(photo, config.replace(schedule="full")).images[0])
    assert GenerationConfig(eps_steps=3, ddim_steps=6).schedule == "eps=3"  # the old spelling


def test_control_reuse_runs_the_unet_alone_on_the_kept_residuals(tiny, photo):
    config = GenerationConfig(image_resolution=64, ddim_steps=4, schedule="control=2")
    pipe = ControlNetPipeline(tiny)
    calls = _count_calls(pipe, ["fused_step", "controlnet", "unet"])
    image = pipe.run(photo, config).images[0]
    # 4 steps: 751, 501, 251, 1; the ControlNet runs at steps 0 and 2, the UNet at all four
    assert calls == [("controlnet", 751.0), ("unet", 751.0), ("unet", 501.0), ("controlnet", 251.0), ("unet", 251.0),
                     ("unet", 1.0)]
    static = ControlNetPipeline(tiny, BackendConfig(cuda_graph="loop")).run(photo, config).images[0]
    assert np.array_equal(image, static)
    full = pipe.run(photo, config.replace(schedule="full")).images[0]
    assert 0 < np.abs(full.astype(int) - image).mean() < 40  # reused residuals: close, not equal


def test_deepcache_runs_the_shallow_unet_between_full_steps(tiny, photo):
    config = GenerationConfig(image_resolution=64, ddim_steps=4, schedule="deepcache=2")
    pipe = ControlNetPipeline(tiny)
    calls = _count_calls(pipe, ["fused_step", "controlnet", "unet", "unet_deep", "unet_shallow"])
    image = pipe.run(photo, config).images[0]
    assert calls == [("controlnet", 751.0), ("unet_deep", 751.0), ("unet_shallow", 501.0), ("controlnet", 251.0),
                     ("unet_deep", 251.0), ("unet_shallow", 1.0)]
    static = ControlNetPipeline(tiny, BackendConfig(cuda_graph="loop")).run(photo, config).images[0]
    assert np.array_equal(image, static)
    full = pipe.run(photo, config.replace(schedule="full")).images[0]
    assert 0 < np.abs(full.astype(int) - image).mean() < 40
    mixed = pipe.run(photo, config.replace(schedule="kinds=fcsf")).images[0]  # control reuse and shallow together
    assert mixed.shape == image.shape


def test_deep_and_shallow_unets_reproduce_the_unet(tiny):
    """The block-by-block UNet equals diffusers' forward exactly, and a shallow pass on the deep feature
    of the same inputs gives the same prediction: a shallow step differs only by what it reuses."""
    from sdcn_trt.export.descriptors import ShapeSpec, get_descriptor

    unet, deep, shallow = (get_descriptor(n, tiny) for n in ("unet", "unet_deep", "unet_shallow"))
    feed = unet.sample_inputs(ShapeSpec(1, 64, 128))
    with torch.no_grad():
        plain = unet.build_module()(*feed.values())
        noise_pred, feature = deep.build_module()(*feed.values())
        skips = [feed[n] for n in shallow.input_names[3:-1]]
        again = shallow.build_module()(feed["latents"], feed["timestep"], feed["text_embeddings"], *skips, feature)
    assert torch.equal(plain, noise_pred) and torch.equal(plain, again)
    assert tuple(feature.shape) == deep.shapes(ShapeSpec(1, 64, 128))["deep_feature"] == (2, 64, 8, 16)
    assert shallow.input_names[3:-1] == ["residual_0", "residual_1"]  # the last up block's two skips


def test_split_networks_equal_the_fused_step(tiny):
    """A full step of a control-reuse schedule runs ControlNet then UNet: the fused network's result."""
    from sdcn_trt.export.descriptors import ShapeSpec, get_descriptor

    fused, control, unet = (get_descriptor(n, tiny) for n in ("fused_step", "controlnet", "unet"))
    feed = fused.sample_inputs(ShapeSpec(1, 64, 64))
    feed["control_scales"] = torch.tensor([[[0.5] * fused.dims.num_scales, [1.0] * fused.dims.num_scales]])
    with torch.no_grad():
        residuals = control.build_module()(*feed.values())
        split = unet.build_module()(feed["latents"], feed["timestep"], feed["text_embeddings"], *residuals)
        whole = fused.build_module()(*feed.values())
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-6)


def test_loop_key_and_modes_are_checked():
    from sdcn_trt.pipeline.loop import LoopKey, make_loop

    with pytest.raises(InputError, match="2 step kinds for 3 timesteps"):
        LoopKey((1, 4, 8, 8), (1, 3, 64, 64), (2, 77, 8), (1, 2, 5), (3, 2, 1), 9.0, 0.0, ("full", "full"))
    with pytest.raises(InputError, match=r"unknown step kinds \['half'\]; valid: full, reuse_eps"):
        LoopKey((1, 4, 8, 8), (1, 3, 64, 64), (2, 77, 8), (1, 2, 5), (3, 2), 9.0, 0.0, ("full", "half"))
    key = LoopKey((1, 4, 8, 8), (1, 3, 64, 64), (2, 77, 8), (1, 2, 5), (1,), 9.0, 0.0, ("full",))
    with pytest.raises(InputError, match="unknown cuda_graph mode 'all'"):
        make_loop("all", key, None, {}, torch.device("cpu"))
    if not torch.cuda.is_available():
        from sdcn_trt.pipeline.scheduler import make_ddim_schedule

        with pytest.raises(InputError, match="cuda_graph='step' needs device='cuda'"):
            make_loop("step", key, make_ddim_schedule(1), {},
                      torch.device("cpu"))


def test_oversized_input_is_refused_before_any_compute(tiny, photo):
    pipe = ControlNetPipeline(tiny)
    calls = _count_calls(pipe, ["text_encoder", "fused_step"])
    thin = np.zeros((64, 2000, 3), np.uint8)
    with pytest.raises(InputError, match="image 64x2000 resizes to 256x8000: its long side exceeds max_side=2048"):
        pipe.run(thin, GenerationConfig())
    with pytest.raises(InputError, match="image 64x2000: its long side exceeds max_side=1024"):
        pipe.run(thin, GenerationConfig(max_side=1024), control_image=True)
    assert calls == []
    assert pipe.run(photo, GenerationConfig(image_resolution=64, ddim_steps=1, max_side=128)).images[0].shape == (64, 128, 3)


@pytest.mark.parametrize("mode", ["off", "loop"])
def test_full_schedule_equals_a_plain_reference_loop(tiny, photo, mode):
    """The 'full' schedule is the reference's loop: written out plainly here (hint, fused step per
    timestep, guidance, ldm's DDIM update, decode, truncation), the pipeline's image is bit-identical."""
    from sdcn_trt import preprocess
    from sdcn_trt.export.descriptors import get_descriptor
    from sdcn_trt.pipeline.scheduler import make_ddim_schedule
    from sdcn_trt.models.tokenizer import tokenize

    config = GenerationConfig(image_resolution=64, ddim_steps=5, scale=7.0, seed=11, eta=0.3)
    image = ControlNetPipeline(tiny, BackendConfig(cuda_graph=mode)).run(photo, config).images[0]
    nets = {n: get_descriptor(n, tiny).build_module() for n in ("text_encoder", "control_hint", "fused_step",
                                                                   "vae_decoder")}
    with torch.no_grad():
        _, edges = preprocess.prepare(photo, 64, 100, 200)
        control = torch.from_numpy(edges.copy()).float().div(255.0).permute(2, 0, 1)[None]
        ids = tokenize(tiny.tokenizer, [config.n_prompt, config.positive_prompt]).to(torch.int32)
        text = nets["text_encoder"](ids)
        hint = nets["control_hint"](control)
        scales = torch.ones(1, 2, 5)
        gen = torch.Generator().manual_seed(11)
        x = torch.randn((1, 4, 8, 16), generator=gen)
        schedule = make_ddim_schedule(5, 0.3)
        noises = [torch.randn((1, 4, 8, 16), generator=gen) for _ in schedule.steps]
        for step, noise in zip(schedule.steps, noises, strict=True):
            eps = nets["fused_step"](x, torch.full((1,), float(step.timestep)), text, hint, scales)
            uncond, cond = eps.chunk(2)
            e = uncond + 7.0 * (cond - uncond)
            pred_x0 = (x - step.sqrt_one_minus_alpha * e) / step.sqrt_alpha
            x = step.sqrt_alpha_prev * pred_x0 + step.dir_coef * e + step.sigma * noise
        pixels = nets["vae_decoder"](x).permute(0, 2, 3, 1).numpy().astype(np.uint8)[0]
    assert np.array_equal(image, pixels)
