"""The baseline a user would pick instead: diffusers' StableDiffusionControlNetPipeline, same weights."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch


def diffusers_end_to_end(components: Any, photo: np.ndarray, config: Any,
                         args: Any) -> tuple[dict[str, float], np.ndarray]:
    """(end-to-end latency statistics in ms — `sdcn_trt.scoring.latency.measure` after one warm-up —,
    the last image as floats in [0, 1] (H, W, 3)) of diffusers' own pipeline on the canny map of
    `photo`, with the DDIM configuration that matches ldm (fp32 on CPU, fp16 on GPU: every network,
    CLIP included, as users run it)."""
    from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline
    from PIL import Image

    from sdcn_trt.preprocess import prepare
    from sdcn_trt.scoring.latency import measure

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionControlNetPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        unet=components.unet, controlnet=components.controlnet, scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    pipe = pipe.to(args.device, dtype)
    pipe.set_progress_bar_config(disable=True)
    _, detected = prepare(photo, config.image_resolution, config.low_threshold, config.high_threshold)
    control = Image.fromarray(detected)

    def call() -> np.ndarray:
        return pipe(config.positive_prompt, control, num_inference_steps=config.ddim_steps,
                    guidance_scale=config.scale, negative_prompt=config.n_prompt,
                    generator=torch.Generator().manual_seed(config.seed), height=detected.shape[0],
                    width=detected.shape[1], output_type="np").images[0]

    return measure(call, args.repeats, warmup=1), call()
