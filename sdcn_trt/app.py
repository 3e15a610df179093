"""`sdcn-trt app`: the original ControlNet canny2image Gradio page on any backend, with timings.

The page has the controls, ranges and defaults of lllyasviel/ControlNet's `gradio_canny2image.py`
and its callback returns what that page's `process()` returns, `[255 - edges] + images` (equal to
`ControlNetPipeline.process`). Beyond it: a backend / precision / schedule choice, per-stage timings,
a progress bar over the steps (build messages on a compiled backend's first run), PNG downloads, a
queue that runs one generation at a time, Stop at the next step boundary, errors as messages.
Needs the `[app]` extra (Gradio); nothing else in the package imports this module.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import weakref
from collections import deque
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sdcn_trt.config import BACKENDS, PRECISIONS, GenerationConfig
from sdcn_trt.engines import backend_available
from sdcn_trt.errors import InputError, SdcnError
from sdcn_trt.pipeline.pipeline import ControlNetPipeline, PipelineOutput
from sdcn_trt.samplers import SAMPLER_NAMES

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when Gradio is imported: no telemetry calls
try:
    import gradio as gr
    import PIL.Image
except ImportError as exc:  # pragma: no cover - exercised through a test that hides gradio
    raise SdcnError("`sdcn-trt app` needs Gradio, which is not installed: pip install 'sdcn_trt[app]'") from exc

logger = logging.getLogger(__name__)

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_PIXELS = 50_000_000  # decoded size refused before decoding (a 20 MB PNG can hold far more)
SCHEDULES = ("full", "eps=10", "steps=10", "control=10", "deepcache=3")  # suggestions; any spelling is accepted
KEPT_RUNS = 32  # PNG download folders kept; older ones are deleted
# the original page's defaults where they differ from the contest call (GenerationConfig's defaults)
N_PROMPT = ("longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, cropped, "
            "worst quality, low quality")
IMAGE_RESOLUTION = 512


class GenerationCancelled(SdcnError):
    """The visitor stopped the request; raised from the progress callback at a step boundary."""


def check_upload(payload: Any) -> None:
    """gr.Error (a message in the page) for an uploaded file that is not an image, or whose decoded
    size would be too large; only the file's header is read."""
    path = getattr(payload, "path", None)
    if path is None or str(getattr(payload, "url", "") or "").startswith("data:"):
        return
    name = getattr(payload, "orig_name", None) or Path(path).name
    try:
        with PIL.Image.open(path) as probe:  # reads the header only
            width, height = probe.size
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as exc:
        logger.warning("refused upload %s: not an image (%s)", name, exc)
        raise gr.Error(f"{name} is not an image this page can read; upload a PNG, JPEG, WebP or BMP photo") from None
    if width * height > MAX_PIXELS:
        logger.warning("refused upload %s: %dx%d pixels", name, width, height)
        raise gr.Error(f"{name} is {width}x{height} pixels; at most {MAX_PIXELS // 1_000_000} megapixels are "
                       "accepted: scale it down first") from None


def photo_input(**options: Any) -> gr.Image:
    """A gr.Image whose uploads pass check_upload before Gradio decodes them. (Not a subclass: Gradio
    writes a .pyi stub beside any module that defines a component class.)"""
    image = gr.Image(**options)
    decode = image.preprocess

    def preprocess(payload: Any) -> Any:
        check_upload(payload)
        return decode(payload)

    image.preprocess = preprocess  # type: ignore[method-assign]
    return image


class BuildNotes(logging.Handler):
    """Forwards the package's INFO log lines from one thread (exports, engine builds, package
    compiles on a backend's first run) to a callable, so the page shows them while it works."""

    def __init__(self, show: Callable[[str], None]):
        super().__init__(logging.INFO)
        self.show, self.thread = show, threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.show(record.getMessage())

    def __enter__(self) -> "BuildNotes":
        self.thread = threading.get_ident()
        package = logging.getLogger("sdcn_trt")
        self.level = package.level
        if package.getEffectiveLevel() > logging.INFO:  # INFO records must be made to reach the handler
            package.setLevel(logging.INFO)
        package.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        package = logging.getLogger("sdcn_trt")
        package.removeHandler(self)
        package.setLevel(self.level)


@dataclasses.dataclass
class RunResult:
    """One generation as the page shows it."""

    gallery: list[np.ndarray]  # [255 - edges, image, ...], uint8 HxWx3: what process() returns
    output: PipelineOutput
    seconds: float  # wall clock of the whole call (preprocess .. uint8 images on the host)
    label: str  # "torch fp32 on cpu, schedule full"
    first_run: bool  # this pipeline's first call: may include exports, builds, compiles


class AppState:
    """The pipelines the page can use (one per backend and precision, sharing the weights) and the
    lock that runs one generation at a time on the device."""

    def __init__(self, pipe: ControlNetPipeline):
        self.pipe = pipe
        self.pipelines = {(pipe.backend.backend, pipe.backend.precision): pipe}
        self.used: set[tuple[str, str]] = set()
        self.lock = threading.Lock()
        self.downloads = Path(tempfile.mkdtemp(prefix="sdcn_app_"))
        # removed with the state, at the latest when the interpreter exits (the page's files live as long)
        weakref.finalize(self, shutil.rmtree, self.downloads, True)
        self._runs: deque[Path] = deque()
        self._count = 0

    def backend_choices(self) -> tuple[list[tuple[str, str]], list[str]]:
        """Dropdown (label, value) pairs for every backend and a note per unavailable one (with why)."""
        choices, notes = [], []
        for name in BACKENDS:
            ok, why = backend_available(name, self.pipe.backend.device)
            choices.append((name if ok else f"{name} (unavailable)", name))
            if not ok:
                notes.append(f"**{name}** is unavailable here: {why}")
        return choices, notes

    def pipeline(self, backend: str, precision: str) -> ControlNetPipeline:
        """The pipeline for a backend and precision, made on first use from the same weights."""
        key = (backend, precision)
        if key not in self.pipelines:
            config = dataclasses.replace(self.pipe.backend, backend=backend, precision=precision)  # validates
            self.pipelines[key] = ControlNetPipeline(self.pipe.components, config)
            logger.info("app: made a %s %s pipeline on %s", backend, precision, config.device)
        return self.pipelines[key]

    def generate(self, image: np.ndarray, config: GenerationConfig, backend: str, precision: str,
                 progress: Callable[[int, int], None], note: Callable[[str], None],
                 cancel: threading.Event) -> RunResult:
        """Run one request (waiting for the lock); raises GenerationCancelled at the first step
        boundary after `cancel` is set."""

        def step(done: int, total: int) -> None:
            progress(done, total)
            if cancel.is_set():
                raise GenerationCancelled(f"stopped after step {done} of {total}")

        with self.lock:
            if cancel.is_set():
                raise GenerationCancelled("stopped before it started")
            pipe = self.pipeline(backend, precision)
            first_run = (backend, precision) not in self.used
            if first_run and backend != "torch":
                note(f"first {backend} run: exporting / building its networks (can take minutes)")
            clock = time.perf_counter()
            with BuildNotes(note):
                out = pipe.run(image, config, progress=step)
            seconds = time.perf_counter() - clock
            self.used.add((backend, precision))
        label = f"{backend} {precision} on {pipe.backend.device}, schedule {config.schedule}, sampler {config.sampler}"
        return RunResult([255 - out.control] + list(out.images), out, seconds, label, first_run)

    def write_pngs(self, gallery: list[np.ndarray], seed: int) -> list[str]:
        """The edge map and images as PNG files for download (the last KEPT_RUNS runs are kept)."""
        self._count += 1
        folder = self.downloads / f"run{self._count:05d}"
        folder.mkdir()
        paths = []
        for k, array in enumerate(gallery):
            name = "edges_inverted.png" if k == 0 else f"image_{k}_seed{seed}.png"
            PIL.Image.fromarray(array).save(folder / name)
            paths.append(str(folder / name))
        self._runs.append(folder)
        while len(self._runs) > KEPT_RUNS:
            shutil.rmtree(self._runs.popleft(), ignore_errors=True)
        return paths


def timings_markdown(result: RunResult) -> str:
    """The run's stages (host seconds), the wall clock and images per second, as a Markdown table."""
    t = result.output.timings
    count = len(result.output.images)
    decode = f"{t.get('decode', 0.0):.3f}" if t.get("decode") else "in the denoising loop"
    rows = [("text encoder", f"{t.get('text', 0.0):.3f}"), ("denoising", f"{t.get('denoise', 0.0):.3f}"),
            ("VAE decode", decode), ("total (wall clock)", f"{result.seconds:.3f}")]
    lines = [f"**{result.label}**: {count} image{'s' if count > 1 else ''}, "
             f"{count / result.seconds:.2f} images/s", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage} | {value} |" for stage, value in rows]
    if result.first_run:
        lines += ["", "First run of this backend: the total includes loading (and building) its networks."]
    return "\n".join(lines)


def _whole(name: str, value: Any) -> int:
    """A slider's value as an int (Gradio may send 20.0 for 20)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
        raise InputError(f"{name} must be a whole number, got {value!r}")
    return int(value)


def make_config(prompt: str, a_prompt: str, n_prompt: str, num_samples: Any, image_resolution: Any, ddim_steps: Any,
                guess_mode: bool, strength: float, scale: float, seed: Any, eta: float, low_threshold: Any,
                high_threshold: Any, schedule: str, sampler: str = "ddim") -> GenerationConfig:
    """The page's values (in the original process() order) as a validated GenerationConfig."""
    if eta is None:
        raise InputError("eta is empty; give a number >= 0 (0 is the reference's DDIM)")
    return GenerationConfig(
        prompt=prompt or "", a_prompt=a_prompt or "", n_prompt=n_prompt or "",
        num_samples=_whole("images", num_samples), image_resolution=_whole("image resolution", image_resolution),
        ddim_steps=_whole("steps", ddim_steps), guess_mode=bool(guess_mode), strength=float(strength),
        scale=float(scale), seed=_whole("seed", seed), eta=float(eta),
        low_threshold=_whole("canny low threshold", low_threshold),
        high_threshold=_whole("canny high threshold", high_threshold), schedule=(schedule or "full").strip(),
        sampler=sampler or "ddim")


def make_callback(state: AppState) -> Callable[..., Any]:
    """The Run button's callback: the original process() arguments, then backend, precision,
    schedule, sampler; returns (gallery, seed used, timings, PNG files). Errors become messages in the page."""

    async def process(input_image: np.ndarray | None, prompt: str, a_prompt: str, n_prompt: str, num_samples: Any,
                      image_resolution: Any, ddim_steps: Any, guess_mode: bool, strength: float, scale: float,
                      seed: Any, eta: float, low_threshold: Any, high_threshold: Any, backend: str, precision: str,
                      schedule: str, sampler: str = "ddim", progress: gr.Progress = gr.Progress()) -> tuple[Any, ...]:
        cancel = threading.Event()
        try:
            if input_image is None:
                raise InputError("no image: upload a photo first (its canny edges guide the generation)")
            if backend not in BACKENDS or precision not in PRECISIONS:
                raise InputError(f"unknown backend {backend!r} or precision {precision!r}; choose a backend of "
                                 f"{', '.join(BACKENDS)} and a precision of {', '.join(PRECISIONS)}")
            ok, why = backend_available(backend, state.pipe.backend.device)
            if not ok:
                raise InputError(f"backend {backend!r} is unavailable here: {why}")
            config = make_config(prompt, a_prompt, n_prompt, num_samples, image_resolution, ddim_steps, guess_mode,
                                 strength, scale, seed, eta, low_threshold, high_threshold, schedule, sampler)
            result = await asyncio.to_thread(
                state.generate, input_image, config, backend, precision,
                lambda done, total: progress((done, total), desc="denoising", unit="steps"),
                lambda text: progress(None, desc=text), cancel)
        except asyncio.CancelledError:  # Stop, or the visitor left: the worker stops at its next step
            cancel.set()
            logger.info("app: request cancelled; the generation stops at the next step boundary")
            raise
        except GenerationCancelled as exc:
            logger.info("app: %s", exc)
            raise gr.Error(f"cancelled: {exc}") from None
        except SdcnError as exc:
            logger.warning("app: refused: %s", exc)
            raise gr.Error(str(exc)) from None
        except Exception:
            logger.exception("app: generation failed")
            raise gr.Error("generation failed with an internal error; the server's log has the details") from None
        logger.info("app: %s, seed %d, %d image(s) in %.2f s", result.label, result.output.seed,
                    len(result.output.images), result.seconds)
        files = state.write_pngs(result.gallery, result.output.seed)
        return result.gallery, result.output.seed, timings_markdown(result), files

    return process


def build_app(pipe: ControlNetPipeline) -> gr.Blocks:
    """The page: the original canny2image controls (same ranges and defaults), a backend choice,
    the gallery ([inverted edges] + images), the seed used, timings and PNG downloads."""
    state = AppState(pipe)
    choices, notes = state.backend_choices()
    with gr.Blocks(title="sdcn_trt: canny2image", analytics_enabled=False, delete_cache=(3600, 3600)) as page:
        page.app_state = state  # type: ignore[attr-defined]  # for tests and embedding
        gr.Markdown("## Control Stable Diffusion with Canny Edge Maps")
        with gr.Row():
            with gr.Column():
                input_image = photo_input(sources=["upload"], type="numpy", label="Image")
                prompt = gr.Textbox(label="Prompt")
                with gr.Row():
                    run_button = gr.Button("Run", variant="primary")
                    stop_button = gr.Button("Stop")
                with gr.Accordion("Advanced options", open=False):
                    num_samples = gr.Slider(label="Images", minimum=1, maximum=12, value=1, step=1)
                    image_resolution = gr.Slider(label="Image Resolution", minimum=256, maximum=768,
                                                 value=IMAGE_RESOLUTION, step=64)
                    strength = gr.Slider(label="Control Strength", minimum=0.0, maximum=2.0, value=1.0, step=0.01)
                    guess_mode = gr.Checkbox(label="Guess Mode", value=False)
                    low_threshold = gr.Slider(label="Canny low threshold", minimum=1, maximum=255, value=100, step=1)
                    high_threshold = gr.Slider(label="Canny high threshold", minimum=1, maximum=255, value=200,
                                               step=1)
                    with gr.Row():
                        ddim_steps = gr.Slider(label="Steps", minimum=1, maximum=100, value=20, step=1, scale=3)
                        sampler = gr.Dropdown(list(SAMPLER_NAMES), value="ddim", label="Sampler", scale=1,
                                              info="ddim = the reference; unipc at 10, lcm at 4 (LCM-LoRA)")
                    scale = gr.Slider(label="Guidance Scale", minimum=0.1, maximum=30.0, value=9.0, step=0.1)
                    # the original drew a random initial value on every page load (randomize=True), which
                    # overwrote a seed typed while the page was still loading; -1 draws one per run instead,
                    # and "Seed used" shows it
                    seed = gr.Slider(label="Seed (-1: random)", minimum=-1, maximum=2147483647, step=1, value=-1)
                    eta = gr.Number(label="eta (DDIM)", value=0.0)
                    a_prompt = gr.Textbox(label="Added Prompt", value=GenerationConfig.a_prompt)
                    n_prompt = gr.Textbox(label="Negative Prompt", value=N_PROMPT)
                with gr.Accordion("Backend", open=True):
                    with gr.Row():
                        backend = gr.Dropdown(choices, value=pipe.backend.backend, label="Backend")
                        precision = gr.Radio(list(PRECISIONS), value=pipe.backend.precision, label="Precision")
                        schedule = gr.Dropdown(list(SCHEDULES), value="full", allow_custom_value=True,
                                               label="Schedule", info="full = the reference; eps=10 etc. skip work")
                    gr.Markdown(f"Device: {pipe.backend.device}. " + " ".join(notes), elem_id="backend-notes")
            with gr.Column():
                gallery = gr.Gallery(label="Output", show_label=False, elem_id="gallery", columns=2, height="auto", object_fit="contain",
                                     format="png")
                seed_used = gr.Number(label="Seed used", interactive=False, precision=0)
                timings = gr.Markdown(elem_id="timings")
                files = gr.File(label="Download (PNG)", file_count="multiple", interactive=False)
        inputs = [input_image, prompt, a_prompt, n_prompt, num_samples, image_resolution, ddim_steps, guess_mode,
                  strength, scale, seed, eta, low_threshold, high_threshold, backend, precision, schedule, sampler]
        run_event = run_button.click(make_callback(state), inputs=inputs, outputs=[gallery, seed_used, timings, files],
                                     api_name="process", concurrency_limit=1, concurrency_id="device")
        stop_button.click(None, cancels=[run_event])
    return page


FILE_SIZE = re.compile(r"\s*(\d+)\s*(b|kb|mb|gb|tb)\s*", re.IGNORECASE)  # what Gradio's max_file_size reads


def check_launch_settings(port: int, max_file_size: str) -> None:
    """InputError for a port or an upload limit Gradio would fail on with a traceback after the model
    loaded; the CLI calls this before loading it."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InputError(f"port must be in 1..65535, got {port!r}")
    if not isinstance(max_file_size, str) or not FILE_SIZE.fullmatch(max_file_size):
        raise InputError(f"max_file_size must be a whole number with a unit b, kb, mb, gb or tb (e.g. 20mb), "
                         f"got {max_file_size!r}")


def launch_options(host: str = "127.0.0.1", port: int = 7860, share: bool = False,
                   max_file_size: str = "20mb") -> dict[str, Any]:
    """Gradio launch() arguments: loopback unless told otherwise (warned), no share link unless asked,
    an upload limit, no tracebacks in the page, system fonts (nothing fetched from the internet)."""
    check_launch_settings(port, max_file_size)
    if host not in LOCAL_HOSTS:
        logger.warning("app: listening on %s: anyone who can reach this machine can use the page and its device",
                       host)
    if share:
        logger.warning("app: --share asks Gradio for a public link through its relay: anyone with it can use the page")
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    return dict(server_name=host, server_port=port, share=share, max_file_size=max_file_size, show_error=False,
                theme=theme, ssr_mode=False, footer_links=["api"])


def serve(pipe: ControlNetPipeline, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
          max_file_size: str = "20mb", max_queue: int = 64, block: bool = True) -> gr.Blocks:
    """Build the page, queue its requests (one generation at a time) and serve it."""
    options = launch_options(host, port, share, max_file_size)
    page = build_app(pipe).queue(max_size=max_queue)
    try:
        page.launch(prevent_thread_lock=not block, **options)
    except OSError as exc:  # Gradio's "Cannot find empty port in range: P-P" names its own settings, not ours
        raise InputError(f"cannot serve the page on {host}:{port}: the port is taken or cannot be opened here "
                         f"({exc}); choose another port") from exc
    return page
