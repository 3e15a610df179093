"""The contest's drop-in `hackathon` class (initialize / process -> images only) and the kit that hosts it.

The TensorRT Hackathon 2023 scorer (`compute_score.py`) does `from canny2image_TRT import hackathon`,
`hk = hackathon(); hk.initialize()`, then per photo times one `hk.process(img, ...)` call with wall-clock
timestamps and writes `cv2.imwrite(path, new_img[0])`. This class answers those calls unchanged:
`process()` takes the contest's 14 arguments and returns **only the generated images** (a list of
`num_samples` uint8 HxWx3 arrays, in the channel order the reference gives for the array passed in),
not the Gradio app's `[255 - canny] + images` that `ControlNetPipeline.process()` returns.
`initialize()` loads the weights and does every export, engine build, graph capture and one warm-up
`process()` at the contest shape, so the first timed call is as fast as the tenth.

The harness passes no arguments, so settings come from environment variables:

    SDCN_CHECKPOINT   control_sd15_canny.pth (ldm layout); default: the contest's
                      /home/player/ControlNet/models/control_sd15_canny.pth, then ./models/control_sd15_canny.pth
    SDCN_PRESET       tiny | tiny-trained | sd15-random: a built-in model instead of a checkpoint
                      (tests, offline runs); used only when set, and then it wins over SDCN_CHECKPOINT
    SDCN_BACKEND      torch | onnxruntime | tensorrt | inductor; default: the fastest available, in order
                      TensorRT, inductor (the compiled engine), torch CUDA fp16 with the loop graph,
                      onnxruntime on the CPU, torch on the CPU
    SDCN_DEVICE       cpu | cuda | cuda:N; default: cuda when a CUDA GPU is visible and the backend can run
                      there (onnxruntime: its CUDA execution provider), else cpu (the log says why)
    SDCN_PRECISION    fp32 | fp16; default: fp16 on CUDA, fp32 on the CPU
    SDCN_CUDA_GRAPH   off | step | loop; default: loop on CUDA, off on the CPU
    SDCN_COMPILE      off | default | max-autotune-no-cudagraphs: the torch backend through torch.compile
                      (BackendConfig.compile); default: off
    SDCN_COMPILED_NETWORKS  networks, comma-separated (e.g. fused_step), a built backend builds or
                      torch.compile compiles (BackendConfig.compiled_networks); default: all
    SDCN_SCHEDULE     a schedule (sdcn_trt.schedule: full, steps=N, eps=N, control=N, deepcache=N,
                      full@i,j,..., kinds=...); default: full (the reference's 20 network evaluations)
    SDCN_TRT_CACHE    where exported ONNX and engines are cached (default ~/.cache/sdcn_trt)

A bad value raises InputError naming the variable and the valid values; the chosen backend and the
reason are logged in one line.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import cv2
import numpy as np
import torch

from sdcn_trt.config import (
    BACKENDS, COMPILE_MODES, CONTEST_HEIGHT, CONTEST_WIDTH, GRAPH_MODES, PRECISIONS, BackendConfig,
    GenerationConfig,
)
from sdcn_trt.engines import backend_available, require_backend
from sdcn_trt.errors import BackendUnavailableError, InputError, SdcnError, WeightsError
from sdcn_trt.images import sample_photos
from sdcn_trt.models.presets import preset_names
from sdcn_trt.pipeline.pipeline import ControlNetPipeline
from sdcn_trt.schedule import parse_schedule

logger = logging.getLogger(__name__)

CONTEST_CHECKPOINT = Path("/home/player/ControlNet/models/control_sd15_canny.pth")  # where the contest kept it
LOCAL_CHECKPOINT = Path("models") / "control_sd15_canny.pth"  # relative to the working directory
# the contest's positional process() arguments, in order (GenerationConfig's defaults are their values)
PROCESS_ARGS = ("prompt", "a_prompt", "n_prompt", "num_samples", "image_resolution", "ddim_steps", "guess_mode",
                "strength", "scale", "seed", "eta", "low_threshold", "high_threshold")
WARMUP_PHOTO = "chelsea"  # scikit-image sample, resized to the contest's 256x384

# name -> what it sets; the kit's README and the tests read this table
ENV_VARS = {
    "SDCN_CHECKPOINT": f"control_sd15_canny.pth (default: {CONTEST_CHECKPOINT}, then ./{LOCAL_CHECKPOINT})",
    "SDCN_PRESET": f"{' | '.join(preset_names())}: a built-in model instead of a checkpoint (tests, offline)",
    "SDCN_BACKEND": f"{' | '.join(BACKENDS)} (default: the fastest available; the choice is logged)",
    "SDCN_DEVICE": "cpu | cuda | cuda:N (default: cuda when a GPU is visible and the backend can run there)",
    "SDCN_PRECISION": f"{' | '.join(PRECISIONS)} (default: fp16 on CUDA, fp32 on the CPU)",
    "SDCN_CUDA_GRAPH": f"{' | '.join(GRAPH_MODES)} (default: loop on CUDA, off on the CPU)",
    "SDCN_COMPILE": f"{' | '.join(COMPILE_MODES)}: the torch backend through torch.compile (default: off)",
    "SDCN_COMPILED_NETWORKS": "networks, comma-separated (e.g. fused_step), that a built backend builds or torch.compile "
                              "compiles (default: all)",
    "SDCN_SCHEDULE": "full | steps=N | eps=N | control=N | deepcache=N | full@i,j,... | kinds=... (default: full)",
    "SDCN_TRT_CACHE": "cache of exported ONNX and engines (default: ~/.cache/sdcn_trt)",
}


# -- backend choice ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    """One default backend setting, tried in order until one is available."""

    backend: str
    device: str  # "cuda" or "cpu"
    precision: str
    cuda_graph: str

    @property
    def label(self) -> str:
        return f"{self.backend} on {self.device}"


def cuda_available() -> bool:
    """Whether torch sees a CUDA GPU (a function so tests can say otherwise)."""
    return torch.cuda.is_available()


def default_candidates() -> tuple[Candidate, ...]:
    """Fastest first: TensorRT, the compiled engine (inductor), torch CUDA fp16 with the whole loop in
    one graph, onnxruntime on the CPU, and torch on the CPU, which is always there."""
    gpu = [b for b in ("tensorrt", "inductor", "torch") if b in BACKENDS]
    return (*(Candidate(b, "cuda", "fp16", "loop") for b in gpu),
            Candidate("onnxruntime", "cpu", "fp32", "off"), Candidate("torch", "cpu", "fp32", "off"))


def choose_backend(device: str | None = None) -> tuple[Candidate, str]:
    """The first available default candidate (only those of `device`'s kind when given) and why, in
    words: which candidates came before it and what each was missing."""
    kind = None if device is None else device.split(":")[0]
    gpu = cuda_available()
    skipped: list[str] = []
    for candidate in default_candidates():
        if kind is not None and candidate.device != kind:
            continue
        if candidate.device == "cuda" and not gpu:
            ok, why = False, "no CUDA GPU"
        else:
            ok, why = backend_available(candidate.backend, candidate.device)
        if ok:
            return candidate, "the fastest available" + (f" (skipped {'; '.join(skipped)})" if skipped else "")
        skipped.append(f"{candidate.label}: {why}")
    raise BackendUnavailableError(f"SDCN_DEVICE={device!r} but no backend can run there: {'; '.join(skipped)}")


def device_for(backend: str) -> tuple[str, str]:
    """(device, why) for a backend set by SDCN_BACKEND without SDCN_DEVICE: cuda when a GPU is visible
    and the backend can run there, else the CPU, saying what cuda lacked."""
    if not cuda_available():
        return "cpu", "set by SDCN_BACKEND"
    ok, why = backend_available(backend, "cuda")
    if ok:
        return "cuda", "set by SDCN_BACKEND"
    return "cpu", f"set by SDCN_BACKEND; on the CPU, since {backend} on cuda is unavailable: {why}"


# -- settings from the environment ---------------------------------------------------------------------
def _env_choice(environ: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str | None:
    value = environ.get(name) or None
    if value is not None and value not in choices:
        raise InputError(f"{name}={value!r} is not valid; use one of {', '.join(choices)} (or leave it unset)")
    return value


def _env_device(environ: Mapping[str, str]) -> str | None:
    value = environ.get("SDCN_DEVICE") or None
    if value is None:
        return None
    index = value[len("cuda:"):] if value.startswith("cuda:") else None
    if value not in ("cpu", "cuda") and not (index is not None and index.isdigit()):
        raise InputError(f"SDCN_DEVICE={value!r} is not valid; use cpu, cuda or cuda:N (or leave it unset)")
    if value.startswith("cuda") and not cuda_available():
        raise BackendUnavailableError(f"SDCN_DEVICE={value!r} but torch sees no CUDA GPU; use SDCN_DEVICE=cpu")
    return value


@dataclass(frozen=True)
class ContestSettings:
    """What `hackathon` runs, read from SDCN_* environment variables (see the module docstring)."""

    backend: BackendConfig
    reason: str  # one line: why this backend
    preset: str | None = None  # built-in weights instead of a checkpoint
    checkpoint: str | None = None  # SDCN_CHECKPOINT as given; None: the default places
    schedule: str = "full"  # a schedule spelling (sdcn_trt.schedule), in its canonical form

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "ContestSettings":
        env = os.environ if environ is None else environ
        preset = _env_choice(env, "SDCN_PRESET", tuple(preset_names()))
        backend = _env_choice(env, "SDCN_BACKEND", BACKENDS)
        precision = _env_choice(env, "SDCN_PRECISION", PRECISIONS)
        graph = _env_choice(env, "SDCN_CUDA_GRAPH", GRAPH_MODES)
        compile_mode = _env_choice(env, "SDCN_COMPILE", COMPILE_MODES) or "off"
        networks = env.get("SDCN_COMPILED_NETWORKS") or None
        compiled = None if networks is None else tuple(n.strip() for n in networks.split(","))
        schedule = env.get("SDCN_SCHEDULE") or "full"
        try:
            schedule = parse_schedule(schedule).spec
        except InputError as exc:
            raise InputError(f"SDCN_SCHEDULE={schedule!r}: {exc}") from exc
        device = _env_device(env)
        if backend is None:
            candidate, reason = choose_backend(device)
            backend, device = candidate.backend, device or candidate.device
            precision, graph = precision or candidate.precision, graph or candidate.cuda_graph
        else:
            reason = "set by SDCN_BACKEND"
            if device is None:
                device, reason = device_for(backend)
            on_gpu = device.startswith("cuda")
            precision, graph = precision or ("fp16" if on_gpu else "fp32"), graph or ("loop" if on_gpu else "off")
        try:
            config = BackendConfig(backend=backend, device=device, precision=precision, cuda_graph=graph,
                                   compile=compile_mode, compiled_networks=compiled)
        except InputError as exc:
            raise InputError(f"SDCN_* settings do not fit together: {exc}") from exc
        compiled_text = "" if compile_mode == "off" else f", torch.compile {compile_mode}"
        reason = f"{backend} on {device}, {precision}, CUDA graph {graph}{compiled_text}: {reason}"
        return cls(config, reason, preset, env.get("SDCN_CHECKPOINT") or None, schedule)


def find_checkpoint(given: str | None) -> Path:
    """SDCN_CHECKPOINT when set, else the contest's path, else ./models/; WeightsError naming every place tried."""
    tried = [Path(given)] if given else [CONTEST_CHECKPOINT, Path.cwd() / LOCAL_CHECKPOINT]
    for path in tried:
        if path.is_file():
            return path
    where = ", ".join(str(p) for p in tried)
    raise WeightsError(
        f"control_sd15_canny.pth not found (tried: {where}). Set SDCN_CHECKPOINT to the ldm checkpoint "
        f"file, or SDCN_PRESET={'|'.join(preset_names())} for a built-in model"
    )


# -- the class the contest's scorer imports -----------------------------------------------------------------
class hackathon:  # noqa: N801 - the contest's name, imported as `from canny2image_TRT import hackathon`
    """`initialize()` (untimed: load, export/build/capture, warm up) then `process(...)` -> images."""

    def __init__(self, settings: ContestSettings | None = None):
        """Settings default to the SDCN_* environment, read when `initialize()` runs."""
        self.settings = settings
        self.pipe: ControlNetPipeline | None = None

    def initialize(self) -> None:
        """Load the weights, pick the backend, and run one warm-up `process()` at the contest shape."""
        settings = self.settings or ContestSettings.from_env()
        self.settings = settings
        logger.info("backend: %s", settings.reason)
        require_backend(settings.backend)  # before loading weights
        if settings.schedule != "full":
            logger.info("schedule %s in every process() call (not the reference's)", settings.schedule)
        if self.pipe is not None:
            self.pipe.close()
            self.pipe = None
        clock = time.perf_counter()
        if settings.preset is not None:
            pipe = ControlNetPipeline.from_preset(settings.preset, backend=settings.backend)
            source = f"preset {settings.preset} (seeded random weights)"
        else:
            path = find_checkpoint(settings.checkpoint)
            pipe = ControlNetPipeline.from_single_file(path, backend=settings.backend)
            source = str(path)
        loaded = time.perf_counter() - clock
        self.pipe = pipe
        clock = time.perf_counter()
        self.process(warmup_image(), *contest_arguments())  # exports, builds, captures, fills the prompt cache
        logger.info("initialized: %s loaded in %.1f s, warm-up process() at %dx%d in %.1f s", source, loaded,
                    CONTEST_HEIGHT, CONTEST_WIDTH, time.perf_counter() - clock)

    def process(self, input_image: np.ndarray, prompt: str, a_prompt: str, n_prompt: str, num_samples: int,
                image_resolution: int, ddim_steps: int, guess_mode: bool, strength: float, scale: float, seed: int,
                eta: float, low_threshold: int, high_threshold: int) -> list[np.ndarray]:
        """The contest's call: returns only the `num_samples` generated images (uint8 HxWx3), no canny map."""
        if self.pipe is None or self.settings is None:
            raise SdcnError("hackathon.process() called before initialize(); call initialize() once first")
        config = GenerationConfig(prompt, a_prompt, n_prompt, num_samples, image_resolution, ddim_steps, guess_mode,
                                  strength, scale, seed, eta, low_threshold, high_threshold,
                                  schedule=self.settings.schedule)
        return list(self.pipe.run(input_image, config).images)


def contest_arguments(config: GenerationConfig | None = None) -> tuple[Any, ...]:
    """The positional `process()` arguments after the image; default: the contest's call."""
    config = config or GenerationConfig()
    return tuple(getattr(config, name) for name in PROCESS_ARGS)


def warmup_image() -> np.ndarray:
    """A photo as `cv2.imread` gives it (BGR) at the contest's 256x384."""
    rgb = sample_photos([WARMUP_PHOTO])[WARMUP_PHOTO]
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    return cv2.resize(bgr, (CONTEST_WIDTH, CONTEST_HEIGHT), interpolation=cv2.INTER_AREA)


# -- the kit: a folder where the contest's compute_score.py runs unchanged ----------------------------------
KIT_MODULE = "canny2image_TRT.py"
KIT_README = "README_sdcn_trt.md"
KIT_MARKER = "# written by `sdcn-trt contest-kit`"

KIT_SOURCE = f'''"""The contest's canny2image_TRT module, backed by sdcn_trt: `from canny2image_TRT import hackathon`.

Settings come from SDCN_* environment variables; see {KIT_README} beside this file.
"""
{KIT_MARKER}
import logging

from sdcn_trt.contest import hackathon

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

__all__ = ["hackathon"]
'''


def kit_readme(folder: Path) -> str:
    """The README written beside the kit module in `folder`."""
    rows = "\n".join(f"| `{name}` | {text} |" for name, text in ENV_VARS.items())
    return f"""# sdcn_trt contest kit

`{KIT_MODULE}` here imports `sdcn_trt.contest.hackathon`, so the TensorRT Hackathon 2023's own
`compute_score.py`, copied into this folder, runs unchanged: it calls `hackathon()`, `initialize()`
(weights, exports, engine builds, graph captures and one warm-up call: all untimed) and, per photo,
one timed `process(img, ...)` that returns only the generated images, as the contest's class did.

```bash
cd {folder}
SDCN_CHECKPOINT=/path/to/control_sd15_canny.pth python compute_score.py
SDCN_PRESET=tiny python compute_score.py          # offline smoke run: built-in random weights
```

Run it with the Python that has `sdcn_trt` installed. The base images PD compares against are the
torch fp32 pipeline's: make them with `SDCN_BACKEND=torch SDCN_PRECISION=fp32 SDCN_CUDA_GRAPH=off`
(or let `sdcn-trt score` make and cache them). Settings:

| variable | what |
|---|---|
{rows}

Bad values stop `initialize()` with a message naming the variable and the valid values; the chosen
backend and why are logged in one line.
"""


def write_kit(folder: str | Path, force: bool = False) -> list[Path]:
    """Write `canny2image_TRT.py` and its README into `folder`; an existing module that this command did
    not write is kept unless `force`."""
    folder = Path(folder)
    module = folder / KIT_MODULE
    if module.exists() and not force and KIT_MARKER not in module.read_text(errors="replace"):
        raise InputError(f"{module} exists and was not written by sdcn-trt contest-kit; move it away or pass --force")
    folder.mkdir(parents=True, exist_ok=True)
    module.write_text(KIT_SOURCE)
    readme = folder / KIT_README
    readme.write_text(kit_readme(folder))
    return [module, readme]
