"""ControlNetPipeline: canny image + prompt -> image, the reference's canny2image on any backend."""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from sdcn_trt import preprocess
from sdcn_trt.models.single_file import load_single_file
from sdcn_trt.models.components import Components
from sdcn_trt.config import BackendConfig, GenerationConfig
from sdcn_trt.engines import create_runner
from sdcn_trt.engines.base import Runner
from sdcn_trt.errors import InputError
from sdcn_trt.export.descriptors import PIPELINE_NETWORKS, get_descriptor
from sdcn_trt.models.lora import LoraMerge, apply_loras, check_strength, unmerge_lora
from sdcn_trt.models.presets import load_diffusers, load_preset, with_controlnets
from sdcn_trt.pipeline.loop import EagerLoop, LoopInputs, LoopKey, ProgressFn, make_loop, networks_for
from sdcn_trt.pipeline.scheduler import DdimSchedule, make_ddim_schedule
from sdcn_trt.models.tokenizer import tokenize

logger = logging.getLogger(__name__)


@dataclass
class PipelineOutput:
    """Generated images (uint8 HxWx3 RGB arrays, or PIL images), the edge map, and how long it took."""

    images: list[Any]
    control: np.ndarray  # the detected canny map, uint8 HxWx3 (0 or 255)
    seed: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


def _backend_config(backend: BackendConfig | str, options: dict[str, Any]) -> BackendConfig:
    if isinstance(backend, BackendConfig):
        if options:
            raise InputError(f"pass either a BackendConfig or options, not both: {sorted(options)}")
        return backend
    unknown = set(options) - {"device", "precision", "cache_dir"}
    if unknown:
        raise InputError(f"unknown backend options {sorted(unknown)}; valid: cache_dir, device, precision")
    return BackendConfig(backend=backend, **options)


class ControlNetPipeline:
    """SD1.5 + ControlNet canny. The pipeline calls runners; it never asks which backend it holds."""

    def __init__(self, components: Components, backend: BackendConfig | str = "torch",
                 lora: Sequence[tuple[str | Path, float]] = (), **backend_options: Any):
        """`lora`: (file, strength) pairs merged into the UNet and text encoder (see set_lora); the
        from_* constructors pass it on."""
        self.components = components
        self.backend = _backend_config(backend, backend_options)
        self.descriptors = {name: get_descriptor(name, components) for name in PIPELINE_NETWORKS}
        self.runners: dict[str, Runner] = {n: create_runner(d, self.backend) for n, d in self.descriptors.items()}
        self._text_cache: dict[tuple[str, str], torch.Tensor] = {}
        self._loops: dict[LoopKey, EagerLoop] = {}  # keyed by everything they bake in
        self.loras: list[tuple[str | Path, float]] = []  # the LoRA files merged now, with their strengths
        self._lora_merge: LoraMerge | None = None
        if lora:
            self.set_lora(lora)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, sd_dir: str | Path, controlnet: str | Path | Sequence[str | Path],
                        tokenizer: str | Path | None = None, backend: BackendConfig | str = "torch",
                        **backend_options: Any) -> "ControlNetPipeline":
        """diffusers folders: an SD1.5 pipeline folder and a ControlNet folder (or one ldm file), or a
        list of ControlNets (Multi-ControlNet: the first gets the photo's edge map)."""
        return cls(load_diffusers(sd_dir, controlnet, tokenizer), backend, **backend_options)

    @classmethod
    def from_single_file(cls, checkpoint: str | Path, original_config: str | Path | None = None,
                         tokenizer: str | Path | None = None, text_encoder_config: str | Path | None = None,
                         backend: BackendConfig | str = "torch", more_controlnets: Sequence[str | Path] = (),
                         cache: bool = True, **backend_options: Any) -> "ControlNetPipeline":
        """control_sd15_canny.pth-style file (ldm layout); architecture from the YAML or the shapes.
        `more_controlnets`: further ControlNet folders or files whose residuals add to the file's.
        The weights are held in the backend's precision; `cache`: keep the converted weights in the
        weights cache (beside the backend's exports), so the next start maps them and converts nothing."""
        lora = backend_options.pop("lora", ())
        config = _backend_config(backend, backend_options)
        components = load_single_file(checkpoint, original_config, tokenizer, text_encoder_config,
                                      precision=config.precision, cache=cache, cache_dir=config.cache_dir)
        return cls(with_controlnets(components, more_controlnets), config, lora=lora)

    @classmethod
    def from_preset(cls, name: str = "tiny", seed: int = 0, backend: BackendConfig | str = "torch", cache: bool = True,
                    **backend_options: Any) -> "ControlNetPipeline":
        """Built-in architecture with seeded random weights: 'tiny' or 'sd15-random' (drawn once, then
        mapped from the weights cache unless `cache` is False), held in the backend's precision."""
        lora = backend_options.pop("lora", ())
        config = _backend_config(backend, backend_options)
        return cls(load_preset(name, seed, precision=config.precision, cache=cache, cache_dir=config.cache_dir), config,
                   lora=lora)

    def close(self) -> None:
        for runner in self.runners.values():
            runner.deactivate()

    def set_lora(self, lora: str | Path | Sequence[tuple[str | Path, float]] | None, strength: float = 1.0) -> None:
        """Merge LoRA files (kohya or diffusers/PEFT layout) into the UNet and text encoder, replacing
        the ones merged before; `set_lora(None)` restores the original weights exactly. One file:
        `set_lora(path, 0.8)`; several: `set_lora([(path, 0.8), (other, 0.5)])`. The runners take
        the new weights on their next call: torch directly, onnxruntime by swapping the cached
        export's initializers (no export), TensorRT by refit when built refittable. A bad file or
        strength leaves the LoRAs merged before in place."""
        items = [] if lora is None else [(lora, strength)] if isinstance(lora, (str, Path)) else list(lora)
        wanted = [(path, check_strength(s)) for path, s in items]
        previous = self.loras
        if self._lora_merge is not None:
            unmerge_lora(self.components, self._lora_merge)
            self._lora_merge, self.loras = None, []
        try:
            self._lora_merge = apply_loras(self.components, wanted) if wanted else None
            self.loras = wanted
        except Exception:
            self._lora_merge = apply_loras(self.components, previous) if previous else None
            self.loras = previous
            raise
        finally:
            self.close()  # runners rebuild from the current weights when next called
            self._text_cache.clear()
            self._loops.clear()

    # -- stages ---------------------------------------------------------------------------------
    def encode_prompts(self, positive: str, negative: str) -> torch.Tensor:
        """(2, 77, D) CLIP states of [negative, positive], cached per prompt pair."""
        key = (positive, negative)
        if key not in self._text_cache:
            ids = tokenize(self.components.tokenizer, [negative, positive]).to(torch.int32)  # (2, 77)
            out = self.runners["text_encoder"].infer({"input_ids": ids})["text_embeddings"]
            self._text_cache[key] = out.detach().clone()
        return self._text_cache[key]

    def runner(self, name: str) -> Runner:
        """The runner of network `name`, created on first use (schedules may need more than the four)."""
        if name not in self.runners:
            self.descriptors[name] = get_descriptor(name, self.components)
            self.runners[name] = create_runner(self.descriptors[name], self.backend)
        return self.runners[name]

    def run(self, image: np.ndarray, config: GenerationConfig, progress: bool | ProgressFn = False,
            output_type: str = "np", generator: torch.Generator | None = None,
            control_image: bool = False, control_images: Sequence[np.ndarray | None] | None = None) -> PipelineOutput:
        """Generate `config.num_samples` images for one input image.

        `image` is a uint8 photo (HW, HWC; gray, RGB/BGR or RGBA) that is resized and edge-detected
        as the reference does, or, with `control_image=True`, a ready 0/255 control map.
        `control_images`: with several ControlNets, one entry per ControlNet: a ready control map
        (uint8, resized to the generation size if it differs), or None for the edge map of `image`.
        `progress`: True for a bar over the steps, or a callable(done, total) called after each step.
        """
        if output_type not in ("np", "pil"):
            raise InputError(f"output_type must be 'np' or 'pil', got {output_type!r}")
        timings: dict[str, float] = {}
        clock = time.perf_counter()

        # 1. Check inputs (size guard before any compute), preprocess: HWC3 -> resize -> Canny -> control in [0, 1]
        preprocess.check_image(image)
        if control_image:
            preprocess.check_side(image.shape[0], image.shape[1], config.max_side)
            detected = preprocess.hwc3(image)
        else:
            height, width, _ = preprocess.resize_shape(image.shape[0], image.shape[1], config.image_resolution)
            preprocess.check_side(height, width, config.max_side, original=image.shape[:2])
            _, detected = preprocess.prepare(image, config.image_resolution, config.low_threshold, config.high_threshold)
        height, width = detected.shape[:2]
        device = self.runners["fused_step"].device
        maps = self._control_maps(detected, control_images)
        controls = tuple(preprocess.control_tensor(m, config.num_samples).to(device) for m in maps)  # (B, 3, H, W)
        timings["preprocess"] = time.perf_counter() - clock

        # 2. Encode prompts: [negative, positive] -> repeated per sample, (2B, 77, D)
        clock = time.perf_counter()
        text = self.encode_prompts(config.positive_prompt, config.n_prompt)
        text = text.repeat_interleave(config.num_samples, dim=0).to(device)
        timings["text"] = time.perf_counter() - clock

        # 3. Control scales (N, 2, 13), per ControlNet: row 0 unconditional (zeros in guess mode), row 1 conditional
        dims = self.descriptors["fused_step"].dims
        scales = torch.tensor(config.controlnet_scales(dims.num_controlnets, dims.num_scales), dtype=torch.float32,
                              device=device)

        # 4. The schedule: DDIM steps, the kind of every step, DDIM tables
        ddim_steps, kinds = config.step_kinds()
        schedule = make_ddim_schedule(ddim_steps, config.eta)

        # 5. Initial noise: seed -> torch.manual_seed(seed); torch.randn(B, 4, H/8, W/8), on the CPU
        seed = config.seed if config.seed != -1 else random.randint(0, 65535)
        if generator is None:
            generator = torch.Generator().manual_seed(seed)
        latent_shape = (config.num_samples, dims.latent_channels, height // dims.vae_scale, width // dims.vae_scale)
        latents = torch.randn(latent_shape, generator=generator).to(device)

        # 6. Per-step eta noise, drawn now in the reference's order (one draw per step after the latents)
        noise = None
        if schedule.eta > 0:
            noise = torch.stack([torch.randn(latent_shape, generator=generator) for _ in schedule.steps]).to(device)

        # 7. Denoise and decode: eagerly, or replayed from static buffers / CUDA graphs (BackendConfig.cuda_graph)
        key = LoopKey(latent_shape, tuple(controls[0].shape), tuple(text.shape), tuple(scales.shape),
                      tuple(schedule.timesteps), float(config.scale), float(schedule.eta), kinds)
        loop = self._loop(key, schedule)
        pixels, stage_times = loop.run(LoopInputs(latents, text, controls, scales, noise), _progress(progress))
        timings.update(stage_times)

        # 8. uint8 HxWx3 arrays (or PIL images)
        array = pixels.cpu().numpy()  # (B, H, W, 3)
        images: list[Any] = [array[i] for i in range(array.shape[0])]
        if output_type == "pil":
            from PIL import Image

            images = [Image.fromarray(im) for im in images]
        return PipelineOutput(images=images, control=detected, seed=seed, timings=timings)

    def _control_maps(self, detected: np.ndarray,
                      control_images: Sequence[np.ndarray | None] | None) -> list[np.ndarray]:
        """One uint8 HxWx3 control map per ControlNet: the edge map where the entry is None."""
        count = self.components.num_controlnets
        if control_images is None:
            if count > 1:
                raise InputError(f"this pipeline has {count} ControlNets: give control_images with {count} entries "
                                 f"(None for the edge map of the photo)")
            return [detected]
        if len(control_images) != count:
            raise InputError(f"{len(control_images)} control images for {count} ControlNets; give one per ControlNet "
                             f"(None for the edge map of the photo)")
        height, width = detected.shape[:2]
        maps = []
        for k, given in enumerate(control_images):
            if given is None:
                maps.append(detected)
                continue
            ready = preprocess.hwc3(preprocess.check_image(given, name=f"control image {k}"))
            if ready.shape[:2] != (height, width):
                ready = preprocess.resize_to(ready, height, width)
            maps.append(ready)
        return maps

    def _loop(self, key: LoopKey, schedule: DdimSchedule) -> EagerLoop:
        """The loop for `key` in the backend's graph mode, built (and captured) on first use."""
        if key not in self._loops:
            runners = {name: self.runner(name) for name in networks_for(key.kinds)}
            self._loops[key] = make_loop(self.backend.cuda_graph, key, schedule, runners, runners["vae_decoder"].device)
        return self._loops[key]

    # -- public call styles ---------------------------------------------------------------------
    def __call__(self, prompt: str, image: np.ndarray, num_inference_steps: int = 20, guidance_scale: float = 9.0,
                 controlnet_conditioning_scale: float | Sequence[float] = 1.0, guess_mode: bool = False,
                 negative_prompt: str = GenerationConfig.n_prompt, eta: float = 0.0, seed: int | None = None,
                 generator: torch.Generator | None = None, output_type: str = "np", num_images_per_prompt: int = 1,
                 a_prompt: str = "", image_resolution: int = GenerationConfig.image_resolution,
                 low_threshold: int = 100, high_threshold: int = 200, control_image: bool = False,
                 control_images: Sequence[np.ndarray | None] | None = None, schedule: str = "full",
                 progress: bool | ProgressFn = False) -> PipelineOutput:
        """diffusers-style call. `image` is the photo to edge-detect (or, with control_image=True,
        the edge map itself); `seed` None with no generator draws one like the reference (-1).
        With several ControlNets: `control_images` (one per ControlNet, None = the photo's edge map)
        and one `controlnet_conditioning_scale` per ControlNet, or one for all."""
        several = not isinstance(controlnet_conditioning_scale, (int, float))
        config = GenerationConfig(
            prompt=prompt, a_prompt=a_prompt, n_prompt=negative_prompt, num_samples=num_images_per_prompt,
            image_resolution=image_resolution, ddim_steps=num_inference_steps, guess_mode=guess_mode,
            strength=1.0 if several else controlnet_conditioning_scale,  # type: ignore[arg-type]
            controlnet_strengths=tuple(controlnet_conditioning_scale) if several else (),  # type: ignore[arg-type]
            scale=guidance_scale, seed=-1 if seed is None else seed, eta=eta, low_threshold=low_threshold,
            high_threshold=high_threshold, schedule=schedule,
        )
        return self.run(image, config, progress=progress, output_type=output_type, generator=generator,
                        control_image=control_image, control_images=control_images)

    def process(self, input_image: np.ndarray, prompt: str, a_prompt: str, n_prompt: str, num_samples: int,
                image_resolution: int, ddim_steps: int, guess_mode: bool, strength: float, scale: float, seed: int,
                eta: float, low_threshold: int, high_threshold: int) -> list[np.ndarray]:
        """The original Gradio app's canny2image `process()`: same arguments, same return shape —
        [255 - edges, image, ...]. (The contest's `hackathon.process()` returns the images only;
        see `sdcn_trt.contest`.)"""
        config = GenerationConfig(prompt, a_prompt, n_prompt, num_samples, image_resolution, ddim_steps, guess_mode,
                                  strength, scale, seed, eta, low_threshold, high_threshold)
        out = self.run(input_image, config)
        return [255 - out.control] + out.images


def _progress(progress: bool | ProgressFn) -> ProgressFn:
    """A callable(done, total): the caller's own, a tqdm bar over the steps (True), or nothing."""
    if callable(progress):
        return progress
    if not progress:
        return lambda done, total: None
    from tqdm.auto import tqdm

    bar: Any = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="denoising", unit="step", leave=False)
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return update
