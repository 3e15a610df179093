"""The denoising loop over static buffers, replayed from CUDA graphs (whole loop, or one step).

`StaticLoop.body()` is the entire image: every DDIM step (fused ControlNet+UNet, guidance, the
update with that step's constants baked in as Python floats), then VAE decode and the uint8
conversion — reading and writing only tensors allocated once. On CUDA it is captured into one
graph and replayed per image; on the CPU the same body runs eagerly, which is how the tests check
it against the pipeline's eager loop. Loops are keyed by everything baked into them (shapes,
timesteps, guidance scale, eta): a new key captures a new graph, never replays a stale one.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from sdcn_trt.engines.base import Runner
from sdcn_trt.errors import InputError
from sdcn_trt.pipeline.scheduler import DdimSchedule, DdimStep, classifier_free_guidance, ddim_update

logger = logging.getLogger(__name__)

GRAPH_MODES = ("off", "step", "loop")


@dataclass(frozen=True)
class LoopKey:
    """Everything a captured loop bakes in."""

    latent_shape: tuple[int, ...]  # (B, 4, h, w)
    control_shape: tuple[int, ...]  # (B, 3, H, W)
    text_shape: tuple[int, ...]  # (2B, 77, D)
    scales_shape: tuple[int, ...]  # (2, n)
    timesteps: tuple[int, ...]
    scale: float  # guidance scale (1.0: conditional prediction only)
    eta: float
    compute: tuple[bool, ...] = ()  # per step: evaluate the network (True) or reuse the last eps


class StaticLoop:
    """One image's whole denoising loop + decode over persistent device buffers."""

    def __init__(self, key: LoopKey, schedule: DdimSchedule, runners: dict[str, Runner], device: torch.device):
        if tuple(schedule.timesteps) != key.timesteps:
            raise InputError("schedule and loop key disagree on the timesteps")
        self.key, self.schedule, self.device = key, schedule, device
        self.hint_net, self.fused, self.decoder = runners["control_hint"], runners["fused_step"], runners["vae_decoder"]
        steps = len(schedule)
        self.latents = torch.zeros(key.latent_shape, device=device)
        self.control = torch.zeros(key.control_shape, device=device)
        self.text = torch.zeros(key.text_shape, device=device)
        self.scales = torch.zeros(key.scales_shape, device=device)
        self.noise = torch.zeros((steps, *key.latent_shape), device=device) if key.eta > 0 else None
        self.timestep_values = torch.tensor([[float(t)] for t in schedule.timesteps], device=device)  # (S, 1)
        self.output: torch.Tensor | None = None  # (B, H, W, 3) uint8, set by body()

    def body(self) -> None:
        """The captured region: no host synchronisation, no new inputs, constants baked in."""
        hint = self.hint_net.infer({"control": self.control})["hint"]  # once per image, (B, C, h, w)
        x, guided = self.latents, self.latents
        for i, step in enumerate(self.schedule.steps):
            if not self.key.compute or self.key.compute[i]:
                feed = {"latents": x, "timestep": self.timestep_values[i], "text_embeddings": self.text,
                        "hint": hint, "control_scales": self.scales}
                eps = self.fused.infer(feed)["noise_pred"].float()  # (2B, 4, h, w)
                eps_uncond, eps_cond = eps.chunk(2)
                guided = eps_cond if self.key.scale == 1.0 else classifier_free_guidance(eps_uncond, eps_cond, self.key.scale)
            x = ddim_update(x, guided, step, self.noise[i] if self.noise is not None else None)
        images = self.decoder.infer({"latents": x})["images"]  # (B, 3, H, W) float in [0, 255]
        self.output = images.permute(0, 2, 3, 1).float().to(torch.uint8)  # truncation, as astype(uint8)

    def load(self, latents: torch.Tensor, text: torch.Tensor, control: torch.Tensor, scales: torch.Tensor,
             noise: torch.Tensor | None) -> None:
        """Copy one image's inputs into the static buffers."""
        self.latents.copy_(latents)
        self.text.copy_(text)
        self.control.copy_(control)
        self.scales.copy_(scales)
        if self.noise is not None:
            assert noise is not None, "eta > 0 needs the per-step noise"
            self.noise.copy_(noise)

    def replay(self) -> None:
        self.body()

    def run(self, latents: torch.Tensor, text: torch.Tensor, control: torch.Tensor, scales: torch.Tensor,
            noise: torch.Tensor | None) -> np.ndarray:
        self.load(latents, text, control, scales, noise)
        self.replay()
        assert self.output is not None
        return self.output.cpu().numpy()


class GraphedLoop(StaticLoop):
    """StaticLoop captured once into a CUDA graph (after one warm-up run on a side stream)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.device.type != "cuda":
            raise InputError("CUDA graphs need device='cuda'")
        self.graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self.body()  # warm-up: engines bind buffers, cuDNN/cuBLAS pick kernels, allocator settles
        torch.cuda.current_stream(self.device).wait_stream(stream)
        with torch.cuda.graph(self.graph, stream=stream):
            self.body()
        logger.info("captured the denoising loop (%d steps) in one CUDA graph", len(self.schedule))

    def replay(self) -> None:
        self.graph.replay()


class GraphedStep:
    """Level (a): one CUDA graph for one denoising step, replayed for every step with that step's
    constants written into device scalars first (so one capture serves all steps)."""

    CONSTANTS = ("sqrt_one_minus_alpha", "sqrt_alpha", "sqrt_alpha_prev", "dir_coef", "sigma")

    def __init__(self, key: LoopKey, fused: Runner, hint_shape: tuple[int, ...], device: torch.device):
        self.key, self.fused, self.device = key, fused, device
        self.x = torch.zeros(key.latent_shape, device=device)
        self.noise = torch.zeros(key.latent_shape, device=device)
        self.hint = torch.zeros(hint_shape, device=device)
        self.text = torch.zeros(key.text_shape, device=device)
        self.scales = torch.zeros(key.scales_shape, device=device)
        self.timestep = torch.zeros(1, device=device)
        self.constants = {name: torch.zeros((), device=device) for name in self.CONSTANTS}
        self.graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            self._step()
        torch.cuda.current_stream(device).wait_stream(stream)
        with torch.cuda.graph(self.graph, stream=stream):
            self._step()

    def _step(self) -> None:
        feed = {"latents": self.x, "timestep": self.timestep, "text_embeddings": self.text, "hint": self.hint,
                "control_scales": self.scales}
        eps_uncond, eps_cond = self.fused.infer(feed)["noise_pred"].float().chunk(2)
        guided = eps_cond if self.key.scale == 1.0 else classifier_free_guidance(eps_uncond, eps_cond, self.key.scale)
        c = self.constants
        pred_x0 = (self.x - c["sqrt_one_minus_alpha"] * guided) / c["sqrt_alpha"]
        x_prev = c["sqrt_alpha_prev"] * pred_x0 + c["dir_coef"] * guided + c["sigma"] * self.noise
        self.x.copy_(x_prev)

    def load(self, text: torch.Tensor, hint: torch.Tensor, scales: torch.Tensor) -> None:
        self.text.copy_(text)
        self.hint.copy_(hint)
        self.scales.copy_(scales)

    def step(self, step: DdimStep, noise: torch.Tensor | None) -> None:
        self.timestep.fill_(float(step.timestep))
        for name in self.CONSTANTS:
            self.constants[name].fill_(getattr(step, name))
        if noise is not None:
            self.noise.copy_(noise)
        else:
            self.noise.zero_()
        self.graph.replay()
