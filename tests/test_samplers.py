"""Samplers beyond DDIM: the tables against diffusers' own step loops, the loops, the choices, the refusals."""
from __future__ import annotations

import json
import logging
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sdcn_trt import BackendConfig, ControlNetPipeline, GenerationConfig
from sdcn_trt.errors import InputError
from sdcn_trt.pipeline import pipeline as pipeline_module
from sdcn_trt.pipeline.batched import BatchItem
from sdcn_trt.pipeline.loop import GraphedSteps
from sdcn_trt.samplers import (SAMPLER_NAMES, SAMPLERS, make_scheduler, read_scheduler_config, sampler_schedule)

from .conftest import pixel_diff
from .lora_files import TEXT_MODULES, UNET_MODULES, kohya_state, random_factors, write

TABLE_SAMPLERS = SAMPLER_NAMES[1:]  # every one but ldm's DDIM


def fake_model(x: torch.Tensor, t: float, i: int, offsets: torch.Tensor) -> torch.Tensor:
    """A stand-in network: depends on its input and the timestep, with a fixed random part per step."""
    return 0.5 * torch.sin(x + t / 1000.0) + offsets[i]


def diffusers_trajectory(name: str, steps: int, x0: torch.Tensor, offsets: torch.Tensor, noises: torch.Tensor):
    """diffusers' scale_model_input + step loop with the fake model; its noise draws are `noises`."""
    scheduler = make_scheduler(name)
    scheduler.set_timesteps(steps)
    module = sys.modules[type(scheduler).__module__]
    draws = iter(noises)
    original = getattr(module, "randn_tensor", None)
    if original is not None:
        module.randn_tensor = lambda *args, **kwargs: next(draws)
    try:
        x, out = x0 * scheduler.init_noise_sigma, []
        for i, t in enumerate(scheduler.timesteps):
            eps = fake_model(scheduler.scale_model_input(x, t), float(t), i, offsets)
            x = scheduler.step(eps, t, x).prev_sample
            out.append(x)
    finally:
        if original is not None:
            module.randn_tensor = original
    return out


@pytest.mark.parametrize("name", TABLE_SAMPLERS)
@pytest.mark.parametrize("steps", [4, 10, 20])
def test_table_follows_diffusers_step_by_step(name, steps):
    """fp32, every step: the table's update equals diffusers' scheduler.step within 1e-6 of the latents' scale."""
    assert_follows_diffusers(name, steps)


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_karras", "unipc"])
@pytest.mark.parametrize("steps", [1, 2])
def test_no_step_count_is_too_few_for_a_multistep_order(name, steps):
    """diffusers' multistep schedulers drop to first order at the first step and (lower_order_final) the last,
    so 1 and 2 steps are valid runs, not refusals: the tables build, look back on nothing, and follow
    diffusers' loop."""
    assert sampler_schedule(name, steps).history == 0
    assert_follows_diffusers(name, steps)


def assert_follows_diffusers(name: str, steps: int) -> None:
    gen = torch.Generator().manual_seed(steps)
    offsets = torch.randn(steps, 1, 4, 8, 8, generator=gen)
    noises = torch.randn(steps, 1, 4, 8, 8, generator=gen)
    x0 = torch.randn(1, 4, 8, 8, generator=gen)
    reference = diffusers_trajectory(name, steps, x0, offsets, noises)
    table = sampler_schedule(name, steps)
    assert len(table) == steps == len(reference)
    x, past = x0 * table.init_noise_sigma, ()
    for i, step in enumerate(table.steps):
        eps = fake_model(step.model_input(x), step.timestep, i, offsets)
        x, past = step.update(x, eps, past, noises[i] if table.stochastic else None), ((x, eps), *past)[:table.history]
        scale = max(1.0, reference[i].abs().max().item())
        assert (x - reference[i]).abs().max().item() <= 1e-6 * scale, (name, steps, i)


def test_tables_have_the_expected_structure():
    """What the probe finds, checked against what the samplers are: first-order ones look back on
    nothing, DPM++ 2M on one step, UniPC (predictor-corrector) on two; noise where diffusers draws it."""
    assert {n: sampler_schedule(n, 20).history for n in TABLE_SAMPLERS} == {
        "dpmpp_2m": 1, "dpmpp_2m_karras": 1, "unipc": 2, "euler": 0, "euler_a": 0, "lcm": 0}
    assert [n for n in TABLE_SAMPLERS if sampler_schedule(n, 20).stochastic] == ["euler_a", "lcm"]
    assert sampler_schedule("lcm", 4).steps[-1].noise_coef == 0.0  # LCM's last step returns its x0 estimate
    euler = sampler_schedule("euler", 20)
    assert euler.init_noise_sigma == pytest.approx(14.6146, abs=1e-3)
    assert euler.steps[0].input_scale == pytest.approx(1 / (14.6146**2 + 1) ** 0.5, rel=1e-4)
    assert any(t != int(t) for t in euler.timesteps)  # fractional timesteps, fed as they are
    assert sampler_schedule("dpmpp_2m_karras", 20).timesteps != sampler_schedule("dpmpp_2m", 20).timesteps


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc", "euler", "euler_a", "lcm"])
def test_whole_image_matches_diffusers_pipeline(tiny, photo, name):
    """The tiny preset through diffusers' StableDiffusionControlNetPipeline with the sampler's scheduler and
    the same seed: within 1 uint8 level (it rounds where we truncate, as the reference does). Ancestral
    noise matches too: both draw latents, then one draw per step, from the same CPU generator."""
    from diffusers import StableDiffusionControlNetPipeline
    from PIL import Image

    from sdcn_trt import preprocess

    config = GenerationConfig(prompt="a cat", a_prompt="", n_prompt="bad", image_resolution=64, ddim_steps=5,
                              scale=7.5, seed=5, sampler=name)
    ours = ControlNetPipeline(tiny).run(photo, config).images[0]
    _, edges = preprocess.prepare(photo, 64, 100, 200)
    reference = StableDiffusionControlNetPipeline(
        vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=tiny.unet,
        controlnet=tiny.controlnet, scheduler=make_scheduler(name), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    theirs = reference("a cat", Image.fromarray(edges), num_inference_steps=5, guidance_scale=7.5, negative_prompt="bad",
                       generator=torch.Generator().manual_seed(5), height=64, width=128, output_type="np").images[0]
    diff = np.abs(ours.astype(float) - np.floor(theirs * 255 + 1e-4))
    assert diff.max() <= 1.0, diff.max()


@pytest.mark.parametrize("name, schedule", [(name, "full") for name in SAMPLER_NAMES]
                         + [("dpmpp_2m", "eps=3"), ("unipc", "control=3")])
def test_static_and_step_loops_equal_the_eager_loop(tiny, photo, monkeypatch, name, schedule):
    """Bit for bit, every sampler (and multistep ones with reuse steps): the static loop (what one CUDA graph
    captures) and the per-step loop (its history buffers and device-scalar constants; captured here by a
    stand-in that runs the step)."""
    config = GenerationConfig(image_resolution=64, ddim_steps=5, sampler=name, seed=3, schedule=schedule)
    eager = ControlNetPipeline(tiny).run(photo, config).images[0]
    static = ControlNetPipeline(tiny, BackendConfig(cuda_graph="loop")).run(photo, config).images[0]
    assert np.array_equal(eager, static)

    def per_step(mode, key, schedule, runners, device):
        return GraphedSteps(key, schedule, runners, device,
                            capture_fn=lambda body, device, what: SimpleNamespace(replay=body))

    monkeypatch.setattr(pipeline_module, "make_loop", per_step)
    pipe = ControlNetPipeline(tiny)
    stepped = pipe.run(photo, config).images[0]
    assert np.array_equal(eager, stepped)
    assert np.array_equal(eager, pipe.run(photo, config).images[0])  # a second image: the history was reset


def test_step_kinds_compose_with_a_multistep_sampler(tiny, photo):
    """eps reuse hands the sampler the last prediction again; its history carries on, eager = static."""
    config = GenerationConfig(image_resolution=64, ddim_steps=6, sampler="dpmpp_2m", schedule="eps=3")
    eager = ControlNetPipeline(tiny).run(photo, config).images[0]
    static = ControlNetPipeline(tiny, BackendConfig(cuda_graph="loop")).run(photo, config).images[0]
    full = ControlNetPipeline(tiny).run(photo, config.replace(schedule="full")).images[0]
    assert np.array_equal(eager, static)
    assert not np.array_equal(eager, full)
    assert config.step_kinds() == (6, ("full", "reuse_eps", "full", "reuse_eps", "full", "reuse_eps"))


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc"])
def test_shallow_steps_compose_with_a_multistep_sampler(tiny, photo, name):
    """deepcache=N: the shallow UNet's prediction enters the sampler's history like a full step's; eager = static
    bit for bit, and the shallow steps did run (the image is not the full schedule's)."""
    config = GenerationConfig(image_resolution=64, ddim_steps=6, sampler=name, schedule="deepcache=2", seed=4)
    assert config.step_kinds() == (6, ("full", "shallow") * 3)
    pipe = ControlNetPipeline(tiny)
    shallow = pipe.runner("unet_shallow")
    real, timesteps = shallow.infer_impl, []
    shallow.infer_impl = lambda feed: (timesteps.append(float(feed["timestep"])), real(feed))[1]
    eager = pipe.run(photo, config).images[0]
    assert timesteps == sampler_schedule(name, 6).timesteps[1::2]
    static = ControlNetPipeline(tiny, BackendConfig(cuda_graph="loop")).run(photo, config).images[0]
    full = ControlNetPipeline(tiny).run(photo, config.replace(schedule="full")).images[0]
    assert np.array_equal(eager, static)
    assert not np.array_equal(eager, full)


def test_ancestral_noise_is_seeded_per_image(tiny_pipe, photo):
    """euler_a draws fresh noise every step from the image's own generator: the same seed gives the same
    image alone or in a batch (within 1 level: batched convolutions round differently, as for DDIM),
    another seed another image."""
    config = GenerationConfig(image_resolution=64, ddim_steps=4, sampler="euler_a")
    alone = [tiny_pipe.run(photo, config.replace(seed=s)).images[0] for s in (1, 2)]
    together = tiny_pipe.run_batch([BatchItem(photo, seed=1), BatchItem(photo, seed=2)], config)
    for single, batched in zip(alone, together, strict=True):
        assert pixel_diff(single, batched.images[0]).max() <= 1
    assert pixel_diff(alone[0], alone[1]).mean() > 5


def test_the_call_takes_a_sampler(tiny_pipe, photo):
    ddim = tiny_pipe("a cat", photo, num_inference_steps=4, image_resolution=64, seed=1).images[0]
    unipc = tiny_pipe("a cat", photo, num_inference_steps=4, image_resolution=64, seed=1, sampler="unipc").images[0]
    again = tiny_pipe.run(photo, GenerationConfig(prompt="a cat", a_prompt="", image_resolution=64, ddim_steps=4, seed=1,
                                                  sampler="unipc")).images[0]
    assert not np.array_equal(ddim, unipc)
    assert np.array_equal(unipc, again)


def test_lcm_with_a_merged_lora_at_guidance_one(photo, tmp_path):
    """The LCM-LoRA route: a LoRA merged by the LoRA loader, 4 LCM steps at guidance 1 (the conditional
    prediction only). No LCM weights exist here: this checks the mechanism, not LCM's pictures. (Its own
    copy of the preset: a merge changes the weights the session's `tiny` shares.)"""
    from sdcn_trt.models.presets import load_preset

    tiny = load_preset("tiny", seed=0)
    unet = random_factors(tiny.unet, UNET_MODULES, 4, seed=1)
    text = random_factors(tiny.text_encoder, TEXT_MODULES, 4, seed=2)
    lora = write(kohya_state(unet, text, alpha=2.0), tmp_path / "lcm.safetensors")
    config = GenerationConfig(image_resolution=64, ddim_steps=4, sampler="lcm", scale=1.0, seed=7)
    plain = ControlNetPipeline(tiny).run(photo, config).images[0]
    pipe = ControlNetPipeline(tiny, lora=[(lora, 1.0)])
    merged = pipe.run(photo, config).images[0]
    assert not np.array_equal(plain, merged)
    pipe.set_lora(None)
    assert np.array_equal(plain, pipe.run(photo, config).images[0])


def test_bad_sampler_choices_are_refused_before_any_weights_load():
    with pytest.raises(InputError, match="unknown sampler 'dpm'; choose one of ddim, dpmpp_2m, dpmpp_2m_karras, unipc"):
        GenerationConfig(sampler="dpm")
    with pytest.raises(InputError, match="eta=0.5 is DDIM's noise knob; sampler unipc has none"):
        GenerationConfig(sampler="unipc", eta=0.5)
    with pytest.raises(InputError, match="sampler lcm cannot run 60 steps"):
        GenerationConfig(sampler="lcm", ddim_steps=60)
    with pytest.raises(InputError, match=r"eps=N needs N in 1..5 \(the run has 5 steps\)"):
        GenerationConfig(sampler="euler", ddim_steps=5, schedule="eps=6")
    with pytest.raises(InputError, match="steps must be an integer >= 1"):
        sampler_schedule("euler", 0)
    with pytest.raises(InputError, match="ddim is ldm's own sampler"):
        sampler_schedule("ddim", 20)
    assert GenerationConfig(sampler="euler", ddim_steps=7).step_kinds() == (7, ("full",) * 7)  # DDIM runs 8
    assert GenerationConfig(ddim_steps=7).step_kinds()[1] == ("full",) * 8


def test_a_model_folders_scheduler_config_is_read_and_its_unknown_fields_named(tmp_path, caplog):
    folder = tmp_path / "scheduler"
    folder.mkdir()
    assert read_scheduler_config(tmp_path) is None
    shipped = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.02, "beta_schedule": "scaled_linear",
               "num_train_timesteps": 1000, "skip_prk_steps": True, "steps_offset": 1}
    (folder / "scheduler_config.json").write_text(json.dumps(shipped))
    config = read_scheduler_config(tmp_path)
    with caplog.at_level(logging.INFO, logger="sdcn_trt.samplers"):
        table = sampler_schedule("dpmpp_2m", 10, config)
    assert "skip_prk_steps" in caplog.text and "_class_name" not in caplog.text
    assert table.steps[1] != sampler_schedule("dpmpp_2m", 10).steps[1]  # its beta_end was used
    (folder / "scheduler_config.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot read the scheduler config"):
        read_scheduler_config(tmp_path)
    (folder / "scheduler_config.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="is not a JSON object"):
        read_scheduler_config(tmp_path)


def test_an_option_the_sampler_pins_is_named_when_the_folder_sets_it_otherwise(caplog):
    """A folder's use_karras_sigmas / solver_order do not turn dpmpp_2m into another sampler: the pinned
    values win, and one line says which of the folder's values were overridden and what was used."""
    from sdcn_trt import samplers

    samplers._cached_schedule.cache_clear()  # the line is said when a table is built
    folder = {**samplers.SD15_SCHEDULER, "use_karras_sigmas": True, "solver_order": 3}
    with caplog.at_level(logging.INFO, logger="sdcn_trt.samplers"):
        sampler_schedule("dpmpp_2m", 7, folder)
        sampler_schedule("dpmpp_2m_karras", 7, folder)  # its own value agrees: only solver_order is named
        sampler_schedule("dpmpp_2m", 7, samplers.SD15_SCHEDULER)  # nothing pinned is set: no line
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and " sets " in r.getMessage()]
    assert lines == [
        "sampler dpmpp_2m: the model's scheduler config sets solver_order=3, use_karras_sigmas=True; the sampler "
        "uses solver_order=2, use_karras_sigmas=False (they define dpmpp_2m)",
        "sampler dpmpp_2m_karras: the model's scheduler config sets solver_order=3; the sampler uses solver_order=2 "
        "(they define dpmpp_2m_karras)"]


def test_every_sampler_is_described():
    from sdcn_trt.samplers import describe_samplers

    lines = describe_samplers().splitlines()
    assert [line.split()[0] for line in lines] == list(SAMPLERS)
    assert all(len(line.split()) > 3 for line in lines)


def test_cli_lists_and_chooses_samplers(tiny_pipe, tmp_path, photo_file, capsys):
    from sdcn_trt.batch.local import BatchSettings, run_batch
    from sdcn_trt.cli import main

    assert main(["samplers"]) == 0
    listed = capsys.readouterr().out
    assert [line.split()[0] for line in listed.splitlines()] == list(SAMPLERS)
    flags = ["--image-resolution", "64", "--ddim-steps", "3", "--sampler", "dpmpp_2m_karras", "--quiet"]
    assert main(["generate", str(photo_file.parent), "-o", str(tmp_path / "gen"), *flags]) == 0
    config = GenerationConfig(image_resolution=64, ddim_steps=3, sampler="dpmpp_2m_karras")
    run_batch(tiny_pipe, BatchSettings(str(photo_file.parent), str(tmp_path / "batch"), generation=config))
    assert (tmp_path / "gen" / "cat.png").read_bytes() == (tmp_path / "batch" / "cat.png").read_bytes()
    with pytest.raises(SystemExit):
        main(["generate", str(photo_file), "--sampler", "heun"])
    assert "invalid choice: 'heun'" in capsys.readouterr().err
    assert main(["generate", str(photo_file), "--sampler", "euler", "--eta", "0.3", "-o", str(tmp_path / "o")]) == 2
    assert "sampler euler has none" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_diffusers_folders_scheduler_config_drives_the_table_samplers_not_ddim(tiny, tmp_path, photo):
    """from_pretrained reads scheduler/scheduler_config.json: a changed beta_end changes a table sampler's
    image; DDIM stays ldm's whatever the folder says (the reference)."""
    from sdcn_trt.models.presets import save_diffusers

    save_diffusers(tiny, tmp_path / "sd", tmp_path / "cn")
    plain = ControlNetPipeline.from_pretrained(tmp_path / "sd", tmp_path / "cn")
    assert plain.components.scheduler_config is None
    (tmp_path / "sd" / "scheduler").mkdir()
    (tmp_path / "sd" / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {**{"beta_start": 0.00085, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}, "beta_end": 0.02}))
    shipped = ControlNetPipeline.from_pretrained(tmp_path / "sd", tmp_path / "cn")
    assert shipped.components.scheduler_config["beta_end"] == 0.02
    config = GenerationConfig(image_resolution=64, ddim_steps=3, sampler="euler")
    assert not np.array_equal(plain.run(photo, config).images[0], shipped.run(photo, config).images[0])
    ddim = config.replace(sampler="ddim", ddim_steps=4)
    assert np.array_equal(plain.run(photo, ddim).images[0], shipped.run(photo, ddim).images[0])


def test_a_changed_scheduler_config_builds_a_new_loop_not_a_stale_one(tiny, photo):
    """The loop bakes the step constants in: new constants under the same sampler and timesteps (another
    scheduler config) key a new loop."""
    pipe = ControlNetPipeline(tiny.with_more_controlnets((), tiny.source), BackendConfig(cuda_graph="loop"))
    config = GenerationConfig(image_resolution=64, ddim_steps=3, sampler="euler")
    before = pipe.run(photo, config).images[0]
    pipe.components.scheduler_config = {"beta_start": 0.00085, "beta_end": 0.02, "beta_schedule": "scaled_linear"}
    after = pipe.run(photo, config).images[0]
    assert len(pipe._loops) == 2 and not np.array_equal(before, after)
    assert tiny.scheduler_config is None  # (a copy was changed, not the shared preset)


def test_history_survives_a_runner_that_reuses_its_output_buffer_at_guidance_one(tiny, photo, monkeypatch):
    """At guidance 1 the prediction is a view of the runner's output; engines (TensorRT) return the same
    buffer every call. The multistep history keeps a copy, so such a runner gives the same image."""
    config = GenerationConfig(image_resolution=64, ddim_steps=5, sampler="unipc", scale=1.0, seed=2)
    plain = ControlNetPipeline(tiny).run(photo, config).images[0]
    pipe = ControlNetPipeline(tiny)
    runner = pipe.runner("fused_step")
    real, held = runner.infer, {}

    def reusing(feed):
        out = real(feed)
        for name, value in out.items():
            held.setdefault(name, torch.empty_like(value)).copy_(value)
        return dict(held)

    monkeypatch.setattr(runner, "infer", reusing)
    assert np.array_equal(plain, pipe.run(photo, config).images[0])


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("name", TABLE_SAMPLERS)
def test_every_sampler_runs_in_the_whole_loop_graph_like_eager_cuda(tiny, photo, name):
    """Each table sampler captured with hint, steps and decode in one CUDA graph: its image is eager CUDA's of
    the same sampler and seed (within 1 level, as tests/test_graphs.py's DDIM graphs), a replay repeats it,
    and a replay never waits for the host (sync-debug 'error')."""
    from sdcn_trt.pipeline.loop import GraphedLoop

    from .conftest import replay_without_host_sync

    config = GenerationConfig(image_resolution=64, ddim_steps=5, sampler=name, seed=3)
    eager = ControlNetPipeline(tiny, BackendConfig(device="cuda")).run(photo, config).images[0]
    pipe = ControlNetPipeline(tiny, BackendConfig(device="cuda", cuda_graph="loop"))
    first = pipe.run(photo, config).images[0]
    (loop,) = pipe._loops.values()
    assert isinstance(loop, GraphedLoop) and loop.key.sampler == name
    second = pipe.run(photo, config).images[0]  # a replay
    assert np.array_equal(first, second)
    assert pixel_diff(first, eager).max() <= 1
    replay_without_host_sync(loop)


def test_what_the_probe_cannot_represent_is_refused_with_the_reason(monkeypatch):
    """A non-linear option (dynamic thresholding) is refused, not turned into a wrong table; a folder's
    config cannot turn dpmpp_2m into its Karras variant; a first timestep far from pure noise (Euler at
    one step), a repeated timestep (UniPC at 1000 steps) and a config value that is not JSON are refused."""
    import dataclasses as dc

    from sdcn_trt import samplers

    karras_folder = {**samplers.SD15_SCHEDULER, "use_karras_sigmas": True}
    assert sampler_schedule("dpmpp_2m", 10, karras_folder).timesteps == sampler_schedule("dpmpp_2m", 10).timesteps
    info = samplers.SAMPLERS["dpmpp_2m"]
    monkeypatch.setitem(samplers.SAMPLERS, "dpmpp_2m", dc.replace(info, options=(("thresholding", True),)))
    samplers._cached_schedule.cache_clear()
    with pytest.raises(InputError, match="sampler dpmpp_2m"):
        sampler_schedule("dpmpp_2m", 6, {**samplers.SD15_SCHEDULER, "sample_max_value": 0.5})
    monkeypatch.setitem(samplers.SAMPLERS, "dpmpp_2m", info)
    samplers._cached_schedule.cache_clear()
    with pytest.raises(InputError, match="sampler euler at 1 step starts at timestep 0, far from pure noise"):
        GenerationConfig(sampler="euler", ddim_steps=1)
    with pytest.raises(InputError, match="sampler unipc cannot run 1000 steps"):
        sampler_schedule("unipc", 1000)
    with pytest.raises(InputError, match="not JSON"):
        sampler_schedule("euler", 4, {"beta_end": object()})
