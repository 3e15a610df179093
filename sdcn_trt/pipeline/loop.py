"""The denoising loop, written once: one step function, one decode, and the ways of running them.

`Denoiser.step` is the denoising step: it evaluates what the step's kind calls for (the fused
ControlNet+UNet, the UNet alone on cached ControlNet residuals, the UNet's outer blocks on cached deep
features, or nothing), applies classifier-free guidance and the sampler's update: ldm's DDIM, or a table
sampler's linear map of the current and earlier latents and predictions (sdcn_trt.samplers). `decode_uint8` is the VAE decode and the uint8 conversion. The loop
variants only differ in where their tensors live and how the same calls are replayed:
- `EagerLoop`: fresh tensors per image;
- `StaticLoop`: the whole image (hint, every step, decode) over buffers allocated once — what a
  CUDA graph captures; on the CPU it runs eagerly, which is how tests check it against `EagerLoop`;
- `GraphedLoop`: `StaticLoop` captured in one CUDA graph and replayed per image;
- `GraphedSteps`: one CUDA graph per step kind, replayed at every step with that step's sampler
  constants written into device scalars first (one capture serves all timesteps).
`make_loop` picks one from the backend's `cuda_graph` mode; loops are keyed by everything they bake
in (`LoopKey`), so a new key builds a new loop and a stale graph is never replayed.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from sdcn_trt.engines.base import Runner
from sdcn_trt.errors import DeviceMemoryError, InputError
from sdcn_trt.export.descriptors import ShapeSpec
from sdcn_trt.pipeline.scheduler import DdimSchedule, DdimStep, classifier_free_guidance, ddim_update
from sdcn_trt.samplers import LinearStep, SamplerSchedule, linear_update
from sdcn_trt.schedule import FULL, KINDS, REUSE_CONTROL, REUSE_EPS, SHALLOW

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
Schedule = DdimSchedule | SamplerSchedule  # a sampler's steps in run order
Past = tuple[tuple[torch.Tensor, torch.Tensor], ...]  # earlier (x, guided eps) pairs, newest first


@dataclass(frozen=True)
class LoopKey:
    """Everything a loop bakes in: a different key needs a different loop (and graph)."""

    latent_shape: tuple[int, ...]  # (B, 4, h, w)
    control_shape: tuple[int, ...]  # (B, 3, H, W), each ControlNet's
    text_shape: tuple[int, ...]  # (2B, 77, D)
    scales_shape: tuple[int, ...]  # (N, 2, 13): N ControlNets
    timesteps: tuple[float, ...]  # run order (integers for DDIM; Karras sigmas give fractional ones)
    scale: float  # guidance scale (1.0: the conditional prediction only)
    eta: float
    kinds: tuple[str, ...]  # per step: full | reuse_eps | reuse_control | shallow (sdcn_trt.schedule)
    sampler: str = "ddim"  # sdcn_trt.samplers; the loop's constants are this sampler's
    noisy: bool | None = None  # the steps take a noise draw each (None: eta > 0, as DDIM's)
    constants: int = 0  # hash of the schedule's step constants (a model folder's scheduler config changes them)

    def __post_init__(self) -> None:
        if self.noisy is None:
            object.__setattr__(self, "noisy", self.eta > 0)
        if len(self.kinds) != len(self.timesteps):
            raise InputError(f"{len(self.kinds)} step kinds for {len(self.timesteps)} timesteps")
        unknown = sorted(set(self.kinds) - set(KINDS))
        if unknown:
            raise InputError(f"unknown step kinds {unknown}; valid: {', '.join(KINDS)}")

    @property
    def spec(self) -> ShapeSpec:
        """The image shape the loop runs: batch, pixels, CFG multiplier."""
        batch, _, height, width = self.control_shape
        return ShapeSpec(batch, height, width, self.text_shape[0] // batch)


STEP_NETWORKS = ("fused_step", "controlnet", "unet", "unet_deep", "unet_shallow")  # the ones a step runs


def networks_for(kinds: Sequence[str]) -> tuple[str, ...]:
    """The networks a schedule needs. All-full (or eps-reuse) schedules run the fused ControlNet+UNet;
    with ControlNet-residual reuse, full steps run the ControlNet and the UNet apart so the residuals
    can be kept; with shallow steps the UNet also returns its deep feature."""
    if SHALLOW in kinds:
        return ("control_hint", "controlnet", "unet_deep", "unet_shallow", "vae_decoder")
    if REUSE_CONTROL in kinds:
        return ("control_hint", "controlnet", "unet", "vae_decoder")
    return ("control_hint", "fused_step", "vae_decoder")


@dataclass
class StepState:
    """What the loop carries from one step to the next."""

    x: torch.Tensor  # (B, 4, h, w) latents
    guided: torch.Tensor | None = None  # (B, 4, h, w) the last guided noise prediction
    residuals: tuple[torch.Tensor, ...] = ()  # the last full step's scaled ControlNet residuals
    deep: torch.Tensor | None = None  # (2B, C1, h, w) the UNet's deep feature at the last UNet pass
    past: Past = ()  # the sampler's history: earlier latents and guided predictions, newest first


class Denoiser:
    """The denoising step for one image: its text, hint and control scales are fixed per image."""

    def __init__(self, runners: Mapping[str, Runner], kinds: Sequence[str], scale: float, text: torch.Tensor,
                 hints: Mapping[str, torch.Tensor], scales: torch.Tensor, prepare: bool = True):
        self.runners, self.scale = runners, scale
        self.text = text
        # the ControlNet's inputs besides the step's, the same at every step: hints "hint", "hint_1", ...
        # per ControlNet (tensors a static loop refills in place) and the control scales
        self.control = {**hints, "control_scales": scales}
        # which UNet network full and reuse_control steps run: the fused step, the UNet on given
        # residuals, or that UNet also returning its deep feature (networks_for picks the same)
        self.unet = "unet_deep" if SHALLOW in kinds else "unet" if REUSE_CONTROL in kinds else None
        if prepare:  # once per image: what depends on these alone (Runner.prepare); inside a captured loop too
            self.prepare()

    def prepare(self) -> None:
        """Hand every step network this image's constant inputs (Runner.prepare)."""
        for name in STEP_NETWORKS:
            if name in self.runners:
                self.runners[name].prepare({"text_embeddings": self.text, **self.control})

    def guide(self, noise_pred: torch.Tensor) -> torch.Tensor:
        """(2B, 4, h, w) [uncond, cond] -> the guided (B, 4, h, w) prediction, as p_sample_ddim combines them."""
        eps_uncond, eps_cond = noise_pred.float().chunk(2)
        return eps_cond if self.scale == 1.0 else classifier_free_guidance(eps_uncond, eps_cond, self.scale)

    def evaluate(self, state: StepState, kind: str, timestep: torch.Tensor, latents: torch.Tensor) -> StepState:
        """Run the networks `kind` calls for on `latents` (the sampler's model input of state.x) at `timestep`
        (a (1,) tensor): a new guided prediction and whatever later steps may reuse. Runner outputs may be
        buffers the next call of the same runner overwrites; kept residuals are only read before the
        ControlNet runs again."""
        if kind == REUSE_EPS:
            assert state.guided is not None, "a reuse step needs an earlier full step"
            return state
        base = {"latents": latents, "timestep": timestep, "text_embeddings": self.text}
        if kind == FULL and self.unet is None:
            noise_pred = self.runners["fused_step"].infer({**base, **self.control})["noise_pred"]
            return dataclasses.replace(state, guided=self.guide(noise_pred))
        residuals = state.residuals
        if kind == FULL:
            controlnet = self.runners["controlnet"]
            out = controlnet.infer({**base, **self.control})
            residuals = tuple(out[n] for n in controlnet.descriptor.output_names)  # (2B, C_i, h_i, w_i) each
        assert residuals, f"a {kind} step needs an earlier full step"
        if kind == SHALLOW:
            shallow = self.runners["unet_shallow"]
            names = shallow.descriptor.input_names[3:-1]  # residual_0 .. residual_{k-1}
            feed = {**base, **dict(zip(names, residuals, strict=False)), "deep_feature": state.deep}
            noise_pred = shallow.infer(feed)["noise_pred"]
            return dataclasses.replace(state, guided=self.guide(noise_pred))
        assert self.unet is not None
        unet = self.runners[self.unet]
        names = unet.descriptor.input_names[3:]  # residual_0 .. residual_12
        out = unet.infer({**base, **dict(zip(names, residuals, strict=True))})
        return StepState(state.x, self.guide(out["noise_pred"]), residuals, out.get("deep_feature"), state.past)

    def step(self, state: StepState, kind: str, step: "DdimStep | LinearStep | DeviceStep", timestep: torch.Tensor,
             noise: torch.Tensor | None, history: int = 0) -> StepState:
        """One sampler step: evaluate (or reuse) on the step's model input, guide, update x_i -> x_{i+1};
        the sampler's `history` earlier (x, eps) pairs are carried along."""
        state = self.evaluate(state, kind, timestep, step.model_input(state.x))
        assert state.guided is not None
        x = step.update(state.x, state.guided, state.past, noise)
        # at guidance 1 the prediction is a view of the runner's output, which its next call may overwrite
        kept = state.guided.clone() if history and self.scale == 1.0 else state.guided
        past = ((state.x, kept), *state.past)[:history]
        return dataclasses.replace(state, x=x, past=past)


def embed_controls(hint_net: Runner, controls: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each ControlNet's hint embedding of its control map, once per image: {"hint": .., "hint_1": ..}."""
    names = hint_net.descriptor.input_names
    if len(names) != len(controls):
        raise InputError(f"{len(controls)} control images for {len(names)} ControlNets; give one per ControlNet")
    return hint_net.infer(dict(zip(names, controls, strict=True)))


def decode_uint8(decoder: Runner, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode to [0, 255] floats, then uint8 by truncation as the reference's astype does: (B, H, W, 3)."""
    images = decoder.infer({"latents": latents})["images"]  # (B, 3, H, W)
    return images.permute(0, 2, 3, 1).float().to(torch.uint8)


@dataclass
class LoopInputs:
    """One image's inputs to the loop, on the loop's device."""

    latents: torch.Tensor  # (B, 4, h, w) initial noise
    text: torch.Tensor  # (2B, 77, D) [negative x B, positive x B]
    controls: tuple[torch.Tensor, ...]  # (B, 3, H, W) per ControlNet: control maps in [0, 1] (canny first)
    scales: torch.Tensor  # (N, 2, 13) control scales per ControlNet, row 0 unconditional
    noise: torch.Tensor | None  # (S, B, 4, h, w) per-step noise (DDIM's eta, euler_a, lcm), or None


def _no_progress(done: int, total: int) -> None:
    pass


class EagerLoop:
    """Hint, every step and decode, eagerly, on the image's own tensors."""

    def __init__(self, key: LoopKey, schedule: Schedule, runners: Mapping[str, Runner], device: torch.device):
        if tuple(schedule.timesteps) != key.timesteps or schedule.name != key.sampler:
            raise InputError("schedule and loop key disagree on the sampler or its timesteps")
        self.key, self.schedule, self.runners, self.device = key, schedule, runners, device

    def denoise(self, inputs: LoopInputs, timesteps: Sequence[torch.Tensor], report: ProgressFn) -> torch.Tensor:
        """The hint once, then every step: the final latents (B, 4, h, w)."""
        hints = embed_controls(self.runners["control_hint"], inputs.controls)  # (B, C, h, w) each
        denoiser = Denoiser(self.runners, self.key.kinds, self.key.scale, inputs.text, hints, inputs.scales)
        state = StepState(inputs.latents)
        steps = self.schedule.steps
        for i, (step, kind) in enumerate(zip(steps, self.key.kinds, strict=True)):
            noise = inputs.noise[i] if inputs.noise is not None else None
            state = denoiser.step(state, kind, step, timesteps[i], noise, self.schedule.history)
            report(i + 1, len(steps))
        return state.x

    def run(self, inputs: LoopInputs, report: ProgressFn = _no_progress) -> tuple[torch.Tensor, dict[str, float]]:
        """(uint8 images (B, H, W, 3) on the device, host seconds per stage)."""
        clock = time.perf_counter()
        timesteps = [torch.full((1,), float(t), device=self.device) for t in self.key.timesteps]
        latents = self.denoise(inputs, timesteps, report)
        middle = time.perf_counter()
        pixels = decode_uint8(self.runners["vae_decoder"], latents)
        return pixels, {"denoise": middle - clock, "decode": time.perf_counter() - middle}


class StaticLoop(EagerLoop):
    """The same loop over buffers allocated once; `body()` reads and writes only those buffers."""

    def __init__(self, key: LoopKey, schedule: Schedule, runners: Mapping[str, Runner], device: torch.device):
        super().__init__(key, schedule, runners, device)
        steps = len(schedule)
        self.buffers = LoopInputs(
            latents=torch.zeros(key.latent_shape, device=device), text=torch.zeros(key.text_shape, device=device),
            controls=tuple(torch.zeros(key.control_shape, device=device) for _ in range(key.scales_shape[0])),
            scales=torch.zeros(key.scales_shape, device=device),
            noise=torch.zeros((steps, *key.latent_shape), device=device) if key.noisy else None,
        )
        self.timesteps = torch.tensor([[float(t)] for t in key.timesteps], device=device)  # (S, 1)
        self.output: torch.Tensor | None = None  # (B, H, W, 3) uint8, written by body()

    def body(self) -> None:
        """The captured region: no host synchronisation, no new inputs, constants baked in."""
        latents = self.denoise(self.buffers, list(self.timesteps), _no_progress)
        self.output = decode_uint8(self.runners["vae_decoder"], latents)

    def load(self, inputs: LoopInputs) -> None:
        """Copy one image's inputs into the buffers."""
        b = self.buffers
        for buffer, value in zip((b.latents, b.text, b.scales, *b.controls),
                                 (inputs.latents, inputs.text, inputs.scales, *inputs.controls), strict=True):
            buffer.copy_(value)
        if b.noise is not None:
            assert inputs.noise is not None, "a noisy sampler needs the per-step noise"
            b.noise.copy_(inputs.noise)

    def replay(self) -> None:
        self.body()

    def run(self, inputs: LoopInputs, report: ProgressFn = _no_progress) -> tuple[torch.Tensor, dict[str, float]]:
        clock = time.perf_counter()
        self.load(inputs)
        self.replay()
        report(len(self.key.timesteps), len(self.key.timesteps))
        assert self.output is not None
        return self.output, {"denoise": time.perf_counter() - clock, "decode": 0.0}  # decode is in the replay


def capture(body: Callable[[], None], device: torch.device, what: str) -> torch.cuda.CUDAGraph:
    """Run `body` once on a side stream (engines bind buffers, kernels are picked, the allocator
    settles), then capture it into a CUDA graph."""
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    try:
        with torch.cuda.stream(stream):
            body()
        torch.cuda.current_stream(device).wait_stream(stream)
        with torch.cuda.graph(graph, stream=stream):
            body()
    except torch.OutOfMemoryError as exc:
        raise DeviceMemoryError(f"out of GPU memory while capturing {what}: {exc}") from exc
    return graph


class GraphedLoop(StaticLoop):
    """StaticLoop captured once into a CUDA graph and replayed per image."""

    def __init__(self, key: LoopKey, schedule: Schedule, runners: Mapping[str, Runner], device: torch.device):
        super().__init__(key, schedule, runners, device)
        self.graph = capture(self.body, device, f"the denoising loop for {key.latent_shape}")
        logger.info("captured the denoising loop (%d steps + decode) in one CUDA graph", len(schedule))

    def replay(self) -> None:
        self.graph.replay()


class DeviceStep:
    """A schedule's step constants as device scalars, so one captured step serves every timestep: DDIM's
    (DdimStep's fields) or a table sampler's (input scale, coefficients on the history, noise)."""

    DDIM_FIELDS = ("sqrt_one_minus_alpha", "sqrt_alpha", "sqrt_alpha_prev", "dir_coef", "sigma")

    def __init__(self, schedule: Schedule, device: torch.device):
        self.ddim = isinstance(schedule, DdimSchedule)
        scalar = lambda: torch.zeros((), device=device)  # noqa: E731
        if self.ddim:
            for name in self.DDIM_FIELDS:
                setattr(self, name, scalar())
        else:
            self.input_scale = scalar()
            self.x_coefs = tuple(scalar() for _ in range(schedule.history + 1))
            self.eps_coefs = tuple(scalar() for _ in range(schedule.history + 1))
            self.noise_coef = scalar()

    def load(self, step: DdimStep | LinearStep) -> None:
        if isinstance(step, DdimStep):
            for name in self.DDIM_FIELDS:
                getattr(self, name).fill_(getattr(step, name))
            return
        self.input_scale.fill_(step.input_scale)
        self.noise_coef.fill_(step.noise_coef)
        for buffer, value in zip((*self.x_coefs, *self.eps_coefs), (*step.x_coefs, *step.eps_coefs), strict=True):
            buffer.fill_(value)

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.ddim else x * self.input_scale

    def update(self, x: torch.Tensor, eps: torch.Tensor, past: Past, noise: torch.Tensor | None) -> torch.Tensor:
        return ddim_update(x, eps, self, noise) if self.ddim else linear_update(self, x, eps, past, noise)  # type: ignore[arg-type]


class GraphedSteps(EagerLoop):
    """One CUDA graph per step kind; per step: write the constants, replay. Hint and decode run eagerly.
    A multistep sampler's history lives in buffers the captured step shifts (zeros before the first step,
    where its coefficients are zero too). `capture_fn`: how a step is captured (tests pass a stand-in
    that runs it eagerly, so the CPU checks the buffer logic)."""

    def __init__(self, key: LoopKey, schedule: Schedule, runners: Mapping[str, Runner], device: torch.device,
                 capture_fn: Callable[[Callable[[], None], torch.device, str], Any] | None = None):
        super().__init__(key, schedule, runners, device)
        self.x = torch.zeros(key.latent_shape, device=device)
        self.guided = torch.zeros(key.latent_shape, device=device)
        self.noise = torch.zeros(key.latent_shape, device=device) if key.noisy else None
        self.text = torch.zeros(key.text_shape, device=device)
        self.scales = torch.zeros(key.scales_shape, device=device)
        self.timestep = torch.zeros(1, device=device)
        self.constants = DeviceStep(schedule, device)
        self.past = tuple((torch.zeros(key.latent_shape, device=device), torch.zeros(key.latent_shape, device=device))
                          for _ in range(schedule.history))
        hint_shapes = runners["control_hint"].descriptor.shapes(key.spec)
        self.hints = {n: torch.zeros(hint_shapes[n], device=device) for n in runners["control_hint"].descriptor.output_names}
        self.residuals: tuple[torch.Tensor, ...] = ()
        self.deep: torch.Tensor | None = None
        if "controlnet" in runners:
            shapes = runners["controlnet"].descriptor.shapes(key.spec)
            self.residuals = tuple(torch.zeros(shapes[n], device=device)
                                   for n in runners["controlnet"].descriptor.output_names)
        if "unet_deep" in runners:
            self.deep = torch.zeros(runners["unet_deep"].descriptor.shapes(key.spec)["deep_feature"], device=device)
        capture_fn = capture_fn or capture
        self._prepare()  # the prepared buffers exist before the steps are captured over them
        self.graphs = {kind: capture_fn(lambda k=kind: self._step(k), device, f"a {kind} step for {key.latent_shape}")
                       for kind in dict.fromkeys(key.kinds)}

    def _step(self, kind: str) -> None:
        # prepared outside the graphs, once per image (run); the captured steps read what that wrote
        denoiser = Denoiser(self.runners, self.key.kinds, self.key.scale, self.text, self.hints, self.scales,
                            prepare=False)
        before = StepState(self.x, self.guided, self.residuals, self.deep, self.past)
        state = denoiser.step(before, kind, self.constants, self.timestep, self.noise, len(self.past))
        # the history first, oldest slot first (it reads the buffers the step read: self.x is still x_i)
        for k in reversed(range(len(self.past))):
            source = (self.x, state.guided) if k == 0 else self.past[k - 1]
            for buffer, value in zip(self.past[k], source, strict=True):
                assert value is not None
                buffer.copy_(value)
        for buffer, value in zip((self.x, self.guided, self.deep, *self.residuals),
                                 (state.x, state.guided, state.deep, *state.residuals), strict=True):
            if buffer is not None and value is not None and buffer is not value:
                buffer.copy_(value)

    def _prepare(self) -> None:
        Denoiser(self.runners, self.key.kinds, self.key.scale, self.text, self.hints, self.scales)

    def run(self, inputs: LoopInputs, report: ProgressFn = _no_progress) -> tuple[torch.Tensor, dict[str, float]]:
        clock = time.perf_counter()
        for name, hint in embed_controls(self.runners["control_hint"], inputs.controls).items():
            self.hints[name].copy_(hint)
        self.x.copy_(inputs.latents)
        self.text.copy_(inputs.text)
        self.scales.copy_(inputs.scales)
        self._prepare()
        for pair in self.past:
            for buffer in pair:
                buffer.zero_()
        for i, (step, kind) in enumerate(zip(self.schedule.steps, self.key.kinds, strict=True)):
            self.timestep.fill_(float(step.timestep))
            self.constants.load(step)
            if self.noise is not None:
                assert inputs.noise is not None, "a noisy sampler needs the per-step noise"
                self.noise.copy_(inputs.noise[i])
            self.graphs[kind].replay()
            report(i + 1, len(self.schedule))
        middle = time.perf_counter()
        pixels = decode_uint8(self.runners["vae_decoder"], self.x)
        return pixels, {"denoise": middle - clock, "decode": time.perf_counter() - middle}


def make_loop(mode: str, key: LoopKey, schedule: Schedule, runners: Mapping[str, Runner],
              device: torch.device) -> EagerLoop:
    """The loop for a `cuda_graph` mode: off -> eager; loop -> one graph (static buffers on the CPU);
    step -> one graph per step kind (CUDA only)."""
    if mode == "off":
        return EagerLoop(key, schedule, runners, device)
    if mode == "loop":
        return (GraphedLoop if device.type == "cuda" else StaticLoop)(key, schedule, runners, device)
    if mode == "step":
        if device.type != "cuda":
            raise InputError("cuda_graph='step' needs device='cuda'")
        return GraphedSteps(key, schedule, runners, device)
    raise InputError(f"unknown cuda_graph mode {mode!r}")
