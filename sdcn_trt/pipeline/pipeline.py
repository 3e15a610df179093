"""ControlNetPipeline: canny image + prompt -> image, the reference's canny2image on any backend."""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

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
from sdcn_trt.pipeline.batched import (BatchItem, Prepared, broadcast, group_by_size, is_list, is_out_of_memory,
                                       photos_per_call, stack_text)
from sdcn_trt.pipeline.loop import EagerLoop, LoopInputs, LoopKey, ProgressFn, Schedule, make_loop, networks_for
from sdcn_trt.pipeline.scheduler import make_schedule
from sdcn_trt.models.tokenizer import tokenize

logger = logging.getLogger(__name__)


@dataclass
class PipelineOutput:
    """Generated images (uint8 HxWx3 RGB arrays, or PIL images), the edge map, and how long it took.

    A call with lists (many photos) returns one output as diffusers does: `images` holds every photo's
    images in input order (num_images_per_prompt per photo), `control` and `seed` are lists, one per photo."""

    images: list[Any]
    control: np.ndarray | list[np.ndarray]  # the detected canny map, uint8 HxWx3 (0 or 255); a list per photo
    seed: int | list[int]
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage (of the whole call when batched)
    batch: int = 1  # photos in the network calls that made these images (run_batch)

    @classmethod
    def merge(cls, outputs: Sequence["PipelineOutput"]) -> "PipelineOutput":
        """run_batch's per-photo outputs as one: images concatenated in order, controls and seeds as lists,
        the seconds per stage summed over the network calls (each photo's share of its call's)."""
        timings: dict[str, float] = {}
        for out in outputs:
            for stage, seconds in out.timings.items():
                timings[stage] = timings.get(stage, 0.0) + seconds / out.batch
        return cls(images=[image for out in outputs for image in out.images],
                   control=[out.control for out in outputs],  # type: ignore[misc]
                   seed=[out.seed for out in outputs], timings=timings,  # type: ignore[misc]
                   batch=max(out.batch for out in outputs))


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
        self._fits: dict[tuple[int, int, int], int] = {}  # (H, W, samples) -> photos per call that fit in GPU memory
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
        """Built-in model: 'tiny-trained' (small, trained here, not SD1.5), or an architecture with seeded
        random weights, 'tiny' or 'sd15-random' (drawn once, then mapped from the weights cache unless
        `cache` is False); held in the backend's precision."""
        lora = backend_options.pop("lora", ())
        config = _backend_config(backend, backend_options)
        return cls(load_preset(name, seed, precision=config.precision, cache=cache, cache_dir=config.cache_dir), config,
                   lora=lora)

    def close(self) -> None:
        """Release the runners; the loops captured over their buffers go too (a later call builds new ones)."""
        self._loops.clear()
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
        return self.encode_prompt_pairs([(positive, negative)])[0]

    def encode_prompt_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[torch.Tensor]:
        """(2, 77, D) [negative, positive] states per (positive, negative) pair; the pairs not cached
        yet are encoded together in one text-encoder call of (2 x new pairs) rows."""
        missing = list(dict.fromkeys(key for key in pairs if key not in self._text_cache))
        if missing:
            texts = [text for positive, negative in missing for text in (negative, positive)]
            ids = tokenize(self.components.tokenizer, texts).to(torch.int32)  # (2M, 77)
            out = self.runners["text_encoder"].infer({"input_ids": ids})["text_embeddings"]  # (2M, 77, D)
            for j, key in enumerate(missing):
                self._text_cache[key] = out[2 * j : 2 * j + 2].detach().clone()  # (2, 77, D)
        return [self._text_cache[key] for key in pairs]

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
        _check_output_type(output_type)
        clock = time.perf_counter()
        item = self._prepare(0, BatchItem(image, generator=generator), config, control_image, control_images)
        return self._generate([item], config, progress, output_type, time.perf_counter() - clock)[0]

    def run_batch(self, items: Sequence[BatchItem | np.ndarray], config: GenerationConfig,
                  batch_size: int | None = None, progress: bool | ProgressFn = False, output_type: str = "np",
                  control_image: bool = False,
                  control_images: Sequence[np.ndarray | None] | None = None) -> list[PipelineOutput]:
        """`run()` for many photos, several per network call: one PipelineOutput per item, in input order,
        each item's images those a single `run()` with its own prompt and seed makes. Items (BatchItem,
        or a bare image: the config's prompt and seed) of one preprocessed size share calls of at most
        `batch_size` photos (None: all of them, within the backend's `max_batch`); other sizes run apart.
        `control_images` (several ControlNets) are the same for every item."""
        results: list[PipelineOutput | None] = [None] * len(items)
        for index, output in self.iter_batch(items, config, batch_size, progress, output_type, control_image,
                                             control_images):
            results[index] = output
        return [r for r in results if r is not None]

    def iter_batch(self, items: Sequence[BatchItem | np.ndarray], config: GenerationConfig,
                   batch_size: int | None = None, progress: bool | ProgressFn = False, output_type: str = "np",
                   control_image: bool = False, control_images: Sequence[np.ndarray | None] | None = None,
                   ) -> Iterator[tuple[int, PipelineOutput]]:
        """run_batch's results as each call finishes: (item index, output), so a failing call never takes
        the finished ones with it. Every item is checked and preprocessed before the first call."""
        _check_output_type(output_type)
        if not len(items):
            raise InputError("run_batch got no items; give at least one image")
        clock = time.perf_counter()
        prepared = []
        for index, item in enumerate(items):
            item = item if isinstance(item, BatchItem) else BatchItem(item)
            try:
                prepared.append(self._prepare(index, item, config, control_image, control_images))
            except InputError as exc:
                raise InputError(f"batch item {index}: {exc}") from exc
        seconds = (time.perf_counter() - clock) / len(items)  # preprocessing, per item
        for call in group_by_size(prepared, photos_per_call(batch_size, self.backend, config.num_samples)):
            outputs = self._generate_fitting(call, config, progress, output_type, seconds * len(call))
            yield from ((item.index, out) for item, out in zip(call, outputs, strict=True))

    def _generate_fitting(self, call: list[Prepared], config: GenerationConfig, progress: bool | ProgressFn,
                          output_type: str, preprocess_seconds: float) -> list[PipelineOutput]:
        """_generate, split in halves (and remembered per size) when the batch does not fit in GPU memory."""
        key = (*call[0].size, config.num_samples)
        fits = self._fits.get(key, len(call))
        if len(call) > fits:
            return [out for i in range(0, len(call), fits)
                    for out in self._generate_fitting(call[i : i + fits], config, progress, output_type,
                                                      preprocess_seconds * min(fits, len(call) - i) / len(call))]
        try:
            return self._generate(call, config, progress, output_type, preprocess_seconds)
        except Exception as exc:
            if not is_out_of_memory(exc) or len(call) == 1:
                raise
            half = (len(call) + 1) // 2
            self._fits[key] = half
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            logger.warning("a batch of %d photos at %dx%d (x%d samples) does not fit in GPU memory; running calls of "
                           "at most %d at this size", len(call), *key, half)
            return self._generate_fitting(call, config, progress, output_type, preprocess_seconds)

    def _prepare(self, index: int, item: BatchItem, config: GenerationConfig, control_image: bool,
                 control_images: Sequence[np.ndarray | None] | None) -> Prepared:
        """1. Check inputs (size guard before any compute), preprocess: HWC3 -> resize -> Canny; the item's
        prompts and seed (validated as the config's are) and the generator that draws its noise."""
        image = item.image
        preprocess.check_image(image)
        if control_image:
            preprocess.check_side(image.shape[0], image.shape[1], config.max_side)
            detected = preprocess.hwc3(image)
        else:
            height, width, _ = preprocess.resize_shape(image.shape[0], image.shape[1], config.image_resolution)
            preprocess.check_side(height, width, config.max_side, original=image.shape[:2])
            _, detected = preprocess.prepare(image, config.image_resolution, config.low_threshold, config.high_threshold)
        own = {name: value for name, value in (("prompt", item.prompt), ("n_prompt", item.n_prompt), ("seed", item.seed))
               if value is not None}
        settings = config.replace(**own) if own else config  # validates the item's prompts and seed
        seed = settings.seed if settings.seed != -1 else random.randint(0, 65535)
        generator = item.generator if item.generator is not None else torch.Generator().manual_seed(seed)
        return Prepared(index, detected, self._control_maps(detected, control_images), settings.positive_prompt,
                        settings.n_prompt, seed, generator, generator.get_state())

    def _generate(self, call: list[Prepared], config: GenerationConfig, progress: bool | ProgressFn,
                  output_type: str, preprocess_seconds: float) -> list[PipelineOutput]:
        """Steps 2-8 for B prepared photos of one size in one pass through the networks (B = 1: a single call)."""
        samples = config.num_samples
        timings: dict[str, float] = {"preprocess": preprocess_seconds}
        clock = time.perf_counter()
        device = self.runners["fused_step"].device
        controls = tuple(torch.cat([preprocess.control_tensor(p.maps[k], samples) for p in call]).to(device)
                         for k in range(len(call[0].maps)))  # (BS, 3, H, W) per ControlNet
        height, width = call[0].size

        # 2. Encode prompts (new pairs in one call): [negatives x S..., positives x S...], (2BS, 77, D)
        text = stack_text(self.encode_prompt_pairs([(p.positive, p.negative) for p in call]), samples).to(device)
        timings["text"] = time.perf_counter() - clock

        # 3. Control scales (N, 2, 13), per ControlNet: row 0 unconditional (zeros in guess mode), row 1 conditional
        dims = self.descriptors["fused_step"].dims
        scales = torch.tensor(config.controlnet_scales(dims.num_controlnets, dims.num_scales), dtype=torch.float32,
                              device=device)

        # 4. The schedule: the sampler's steps (DDIM's tables, or a table sampler's from its diffusers scheduler,
        # configured from the model folder's scheduler config where it has one), the kind of every step
        steps, kinds = config.step_kinds()
        schedule = make_schedule(config.sampler, steps, config.eta, self.components.scheduler_config)

        # 5-6. Per photo, from its own generator on the CPU: latents torch.randn(S, 4, H/8, W/8), then one noise
        # draw per step where the sampler takes one (the reference's order); concatenated photo after photo.
        # The latents are scaled by the sampler's init_noise_sigma (1 for DDIM), as diffusers scales them
        latent_shape = (samples, dims.latent_channels, height // dims.vae_scale, width // dims.vae_scale)
        drawn = [p.draw(latent_shape, len(schedule.steps), schedule.stochastic) for p in call]
        latents = torch.cat([d[0] for d in drawn]).to(device)  # (BS, 4, h, w)
        if schedule.init_noise_sigma != 1.0:
            latents = latents * schedule.init_noise_sigma
        noise = torch.cat([d[1] for d in drawn if d[1] is not None], dim=1).to(device) if schedule.stochastic else None

        # 7. Denoise and decode: eagerly, or replayed from static buffers / CUDA graphs (BackendConfig.cuda_graph)
        key = LoopKey(tuple(latents.shape), tuple(controls[0].shape), tuple(text.shape), tuple(scales.shape),
                      tuple(schedule.timesteps), float(config.scale), float(schedule.eta), kinds, schedule.name,
                      schedule.stochastic, hash(schedule.steps))
        loop = self._loop(key, schedule)
        pixels, stage_times = loop.run(LoopInputs(latents, text, controls, scales, noise), _progress(progress))
        timings.update(stage_times)

        # 8. uint8 HxWx3 arrays (or PIL images), S per photo
        array = pixels.cpu().numpy()  # (BS, H, W, 3)
        outputs = []
        for i, item in enumerate(call):
            images: list[Any] = [array[i * samples + j] for j in range(samples)]
            if output_type == "pil":
                from PIL import Image

                images = [Image.fromarray(im) for im in images]
            outputs.append(PipelineOutput(images=images, control=item.detected, seed=item.seed, timings=dict(timings),
                                          batch=len(call)))
        return outputs

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

    def _loop(self, key: LoopKey, schedule: Schedule) -> EagerLoop:
        """The loop for `key` in the backend's graph mode, built (and captured) on first use."""
        if key not in self._loops:
            runners = {name: self.runner(name) for name in networks_for(key.kinds)}
            self._loops[key] = make_loop(self.backend.cuda_graph, key, schedule, runners, runners["vae_decoder"].device)
        return self._loops[key]

    # -- public call styles ---------------------------------------------------------------------
    def __call__(self, prompt: str | Sequence[str], image: np.ndarray | Sequence[np.ndarray],
                 num_inference_steps: int = 20, guidance_scale: float = 9.0,
                 controlnet_conditioning_scale: float | Sequence[float] = 1.0, guess_mode: bool = False,
                 negative_prompt: str | Sequence[str] = GenerationConfig.n_prompt, eta: float = 0.0,
                 seed: int | None | Sequence[int | None] = None,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None, output_type: str = "np",
                 num_images_per_prompt: int = 1, a_prompt: str = "",
                 image_resolution: int = GenerationConfig.image_resolution, low_threshold: int = 100,
                 high_threshold: int = 200, control_image: bool = False,
                 control_images: Sequence[np.ndarray | None] | None = None, schedule: str = "full",
                 sampler: str = "ddim", progress: bool | ProgressFn = False,
                 batch_size: int | None = None) -> PipelineOutput:
        """diffusers-style call. `image` is the photo to edge-detect (or, with control_image=True,
        the edge map itself); `seed` None with no generator draws one like the reference (-1).
        With several ControlNets: `control_images` (one per ControlNet, None = the photo's edge map)
        and one `controlnet_conditioning_scale` per ControlNet, or one for all.
        Many photos: a list of images, prompts, negative prompts, seeds or generators (lists of one
        length, single values used for every photo) returns one PipelineOutput holding every photo's
        images in input order, with lists of their seeds and control maps (as diffusers returns lists),
        computed as `run_batch` does: up to `batch_size` photos of one size per network call."""
        several = not isinstance(controlnet_conditioning_scale, (int, float))
        batched = any(is_list(v) for v in (prompt, image, negative_prompt, seed, generator))
        config = GenerationConfig(
            prompt="" if is_list(prompt) else prompt, a_prompt=a_prompt,  # type: ignore[arg-type]
            n_prompt=GenerationConfig.n_prompt if is_list(negative_prompt) else negative_prompt,  # type: ignore[arg-type]
            num_samples=num_images_per_prompt, image_resolution=image_resolution, ddim_steps=num_inference_steps,
            guess_mode=guess_mode, strength=1.0 if several else controlnet_conditioning_scale,  # type: ignore[arg-type]
            controlnet_strengths=tuple(controlnet_conditioning_scale) if several else (),  # type: ignore[arg-type]
            scale=guidance_scale, seed=-1 if seed is None or is_list(seed) else seed,  # type: ignore[arg-type]
            eta=eta, low_threshold=low_threshold, high_threshold=high_threshold, schedule=schedule, sampler=sampler,
        )
        if not batched:
            return self.run(image, config, progress=progress, output_type=output_type,  # type: ignore[arg-type]
                            generator=generator, control_image=control_image,  # type: ignore[arg-type]
                            control_images=control_images)
        rows = broadcast(image=image, prompt=prompt, negative_prompt=negative_prompt, seed=seed, generator=generator)
        items = [BatchItem(row["image"], prompt=row["prompt"], n_prompt=row["negative_prompt"], seed=row["seed"],
                           generator=row["generator"]) for row in rows]
        return PipelineOutput.merge(self.run_batch(items, config, batch_size=batch_size, progress=progress,
                                                   output_type=output_type, control_image=control_image,
                                                   control_images=control_images))

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


def _check_output_type(output_type: str) -> None:
    if output_type not in ("np", "pil"):
        raise InputError(f"output_type must be 'np' or 'pil', got {output_type!r}")


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
