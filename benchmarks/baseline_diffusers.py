"""The baseline a user would pick instead: diffusers' StableDiffusionControlNetPipeline, same weights,
eager or with its UNet and ControlNet under torch.compile (the peer a user would tune)."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from sdcn_trt.errors import BackendUnavailableError, InputError

# torch.compile modes of the UNet and ControlNet; "off": eager. reduce-overhead captures CUDA graphs.
COMPILE_MODES = ("off", "max-autotune-no-cudagraphs", "reduce-overhead", "default")


def build_diffusers(components: Any, device: str, dtype: torch.dtype, compile_mode: str = "off",
                    sampler: str = "ddim") -> Any:
    """diffusers' ControlNet pipeline over `components` with the DDIM configuration that matches ldm (another
    sampler: the scheduler sdcn_trt.samplers builds its table from), every network (CLIP included) in `dtype`
    as users run it; UNet and ControlNet compiled when asked (CUDA only: inductor's CPU compile of SD1.5 takes
    far longer than a benchmark case is given)."""
    from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline

    from sdcn_trt.samplers import make_scheduler

    if compile_mode not in COMPILE_MODES:
        raise InputError(f"unknown compile mode {compile_mode!r}; choose one of {', '.join(COMPILE_MODES)}")
    if compile_mode != "off" and not device.startswith("cuda"):
        raise BackendUnavailableError(f"the diffusers baseline compiled with mode {compile_mode!r} runs on CUDA only "
                                      f"(device {device!r} given); use compile mode 'off' on the CPU")
    scheduler = (DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                               set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading") if sampler == "ddim"
                 else make_scheduler(sampler, components.scheduler_config))
    pipe = StableDiffusionControlNetPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        unet=components.unet, controlnet=components.controlnet, scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe = pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    if compile_mode != "off":
        pipe.unet = torch.compile(pipe.unet, mode=compile_mode)  # graph breaks allowed: users get them too
        pipe.controlnet = torch.compile(pipe.controlnet, mode=compile_mode)
    return pipe


def diffusers_image(pipe: Any, photo: np.ndarray, config: Any, **extra: Any) -> np.ndarray:
    """One image of `pipe` on the canny map of `photo` as floats in [0, 1] (H, W, 3); `extra` goes to
    the call (prompt_embeds, latents, ...)."""
    from PIL import Image

    from sdcn_trt.preprocess import prepare

    _, detected = prepare(photo, config.image_resolution, config.low_threshold, config.high_threshold)
    prompts = ({} if "prompt_embeds" in extra else {"prompt": config.positive_prompt, "negative_prompt": config.n_prompt})
    return pipe(image=Image.fromarray(detected), num_inference_steps=config.ddim_steps, guidance_scale=config.scale,
                generator=torch.Generator().manual_seed(config.seed), height=detected.shape[0],
                width=detected.shape[1], output_type="np", **prompts, **extra).images[0]


def diffusers_end_to_end(components: Any, photo: np.ndarray, config: Any,
                         args: Any) -> tuple[dict[str, float], np.ndarray]:
    """(end-to-end latency statistics in ms — `sdcn_trt.scoring.latency.measure` after one warm-up, plus
    `first_call_s`: the first call's seconds, torch.compile's compile time included —, the last image
    as floats in [0, 1] (H, W, 3)); fp32 on CPU, fp16 on GPU."""
    from sdcn_trt.scoring.latency import measure

    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    pipe = build_diffusers(components, args.device, dtype, getattr(args, "compile", "off"), config.sampler)
    clock = time.perf_counter()
    diffusers_image(pipe, photo, config)  # the warm-up; compiles when compiled
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    first_call_s = time.perf_counter() - clock
    stats = measure(lambda: diffusers_image(pipe, photo, config), args.repeats, warmup=0)
    return {**stats, "first_call_s": first_call_s}, diffusers_image(pipe, photo, config)
