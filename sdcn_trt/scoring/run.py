"""Score a backend the contest's way: torch fp32 reference images, same seeds, PD from files, latency."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from sdcn_trt.cache import cache_root, hash_file, hash_json
from sdcn_trt.models.components import Components
from sdcn_trt.config import BackendConfig, GenerationConfig
from sdcn_trt.errors import InputError, SdcnError
from sdcn_trt.images import read_contest_image, sample_photos, write_contest_image
from sdcn_trt.pipeline.pipeline import ControlNetPipeline
from sdcn_trt.preprocess import find_images
from sdcn_trt.progress import RunProgress
from sdcn_trt.schedule import parse_schedule
from sdcn_trt.scoring.contest import PD_FAIL, contest_score
from sdcn_trt.scoring.latency import summarize, timed
from sdcn_trt.scoring.metrics import image_metrics
from sdcn_trt.scoring.pd import PDScorer
from sdcn_trt.scoring.report import write_report

logger = logging.getLogger(__name__)


@dataclass
class ScoreSettings:
    """What `sdcn-trt score` runs; flag names equal field names."""

    inputs: str | None = None  # folder of input images; None: scikit-image's sample photos
    output: str = "sdcn_score"  # report folder
    schedules: tuple[str, ...] = ("full",)  # schedule spellings (sdcn_trt.schedule): full, steps=N, eps=N, control=N, ...
    image_format: str = "jpg"  # the contest wrote JPEGs: the codec is part of PD
    reference_dir: str | None = None  # precomputed reference images (by file stem) instead of torch fp32 here
    fid_weights: str | None = None  # pt_inception-2015-12-05-6726825d.pth; default: $SDCN_FID_WEIGHTS, hub cache
    random_fid: bool = False  # seeded random Inception weights: plumbing only, PD values not the contest's
    warmup: int = 1  # untimed runs before timing
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    batch_size: int | None = None  # also time every input through run_batch, this many photos per call (throughput)

    def __post_init__(self) -> None:
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int)
                                            or self.batch_size < 1):
            raise InputError(f"batch_size must be an integer >= 1 (or None: no throughput run), got {self.batch_size!r}")
        if self.image_format not in ("jpg", "png"):
            raise InputError(f"image_format must be jpg or png, got {self.image_format!r}")
        self.schedules = tuple(parse_schedule(schedule).spec for schedule in self.schedules)
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise InputError(f"warmup must be an integer >= 0, got {self.warmup!r}")
        check_fid_choice(self.fid_weights, self.random_fid)
        if self.reference_dir is not None and not Path(self.reference_dir).is_dir():
            raise InputError(f"reference_dir {self.reference_dir} is not a folder; give the folder of precomputed "
                             "reference images (matched by file stem), or leave it out to make them here")
        check_input_folder(self.inputs)


def check_fid_choice(fid_weights: str | None, random_fid: bool) -> None:
    """InputError for both FID choices at once: random weights would silently replace the file given."""
    if fid_weights and random_fid:
        raise InputError("give fid_weights (the contest's PD) or random_fid (plumbing only, PD not the contest's), "
                         "not both")


def check_input_folder(inputs: str | None) -> None:
    """InputError, before any model loads, for an input folder that is missing or holds no image."""
    if inputs is not None and not find_images(inputs):
        raise InputError(f"no images found in {inputs}")


def collect_inputs(settings: ScoreSettings, folder: Path) -> list[Path]:
    if settings.inputs is None:
        return [write_contest_image(folder / f"{name}.png", photo[:, :, ::-1].copy())
                for name, photo in sample_photos().items()]
    files = find_images(settings.inputs)
    if not files:
        raise InputError(f"no images found in {settings.inputs}")
    return files


def reference_image(model_hash: str, reference_pipe: Any, settings: ScoreSettings, source: Path,
                    image: np.ndarray, config: GenerationConfig) -> np.ndarray:
    """The torch fp32 image for `source`, cached by model weights + settings + input bytes."""
    if settings.reference_dir is not None:
        matches = sorted(Path(settings.reference_dir).glob(source.stem + ".*"))
        if not matches:
            raise InputError(f"missing reference image for {source.name} in {settings.reference_dir}")
        ref = cv2.imread(str(matches[0]), cv2.IMREAD_COLOR)
        if ref is None:
            raise InputError(f"cannot read reference image {matches[0]}")
        return ref
    # format 2: inputs read as cv2.imread reads them (EXIF orientation applied, alpha dropped). The reference
    # is ldm's DDIM whatever sampler the scored run uses (process() takes none): the sampler is not in its key
    settings_ = {k: v for k, v in asdict(config).items() if k != "sampler"}
    key = hash_json({"model": model_hash, "config": settings_, "input": hash_file(source), "format": 2})
    cached = cache_root() / "references" / f"{key[:32]}.png"
    if cached.is_file():
        image_ = cv2.imread(str(cached), cv2.IMREAD_UNCHANGED)
        if image_ is not None:
            return image_
    out = reference_pipe.process(image, *_process_args(config))[1]
    write_contest_image(cached, out)
    return out


def weights_hash(components: Components) -> str:
    """A key of the model's weights (keys reference images): the content key of their source while they
    are as loaded (no tensor is read), else a hash of every network's tensors."""
    return components.weights_id()


def _process_args(c: GenerationConfig) -> tuple:
    return (c.prompt, c.a_prompt, c.n_prompt, c.num_samples, c.image_resolution, c.ddim_steps, c.guess_mode,
            c.strength, c.scale, c.seed, c.eta, c.low_threshold, c.high_threshold)


def run_score(components: Components, backend: BackendConfig, settings: ScoreSettings,
              progress: bool = True) -> dict[str, Any]:
    """Generate, time and score every input under every schedule; write rows, summary and report."""
    out = Path(settings.output)
    scorer = PDScorer(settings.fid_weights, random_seed=0 if settings.random_fid else None)  # fails early if absent
    out.mkdir(parents=True, exist_ok=True)  # (after: a bad weights file leaves no empty report folder)
    inputs = collect_inputs(settings, out / "inputs")
    reference_pipe = ControlNetPipeline(components, BackendConfig(device=backend.device, cache_dir=backend.cache_dir))
    pipe = ControlNetPipeline(components, backend)
    model_hash = weights_hash(components) if settings.reference_dir is None else ""  # once: GBs for SD1.5
    rows: list[dict[str, Any]] = []
    throughput: dict[str, dict[str, float]] = {}
    warmed = False
    bar = RunProgress(len(settings.schedules) * len(inputs), "score", enabled=progress)
    for schedule in settings.schedules:
        base = settings.generation.replace(schedule=schedule)
        ref_config = settings.generation.replace(schedule="full")
        read: list[np.ndarray] = []  # the inputs that ran, for the throughput run
        for source in inputs:
            bar.note(f"{schedule}: {source.name}")
            row: dict[str, Any] = {"image": source.name, "schedule": schedule}
            try:
                image = read_contest_image(source)  # as the contest's scorer read its photos
                reference = reference_image(model_hash, reference_pipe, settings, source, image, ref_config)
                ref_path = write_contest_image(out / "reference" / f"{source.stem}.{settings.image_format}", reference)
                if not warmed:
                    for _ in range(settings.warmup):
                        pipe.run(image, base)
                    warmed = True
                # the contest's latency: wall clock around one whole call after warm-up; result.images[0] is
                # what the contest's hackathon.process() returns first and its scorer wrote with cv2.imwrite
                result, ms = timed(lambda: pipe.run(image, base))
                path = write_contest_image(out / schedule / f"{source.stem}.{settings.image_format}", result.images[0])
                written_ref = cv2.imread(str(ref_path), cv2.IMREAD_COLOR)
                written = cv2.imread(str(path), cv2.IMREAD_COLOR)
                row.update(latency_ms=ms, pd=scorer.pd(ref_path, path), **image_metrics(written_ref, written),
                           reference_path=str(ref_path.relative_to(out)), path=str(path.relative_to(out)),
                           input_path=str(source), canny=255 - result.control)
                row["passed"] = row["pd"] <= PD_FAIL
                read.append(image)
            except SdcnError as exc:
                row["error"] = str(exc)
                logger.warning("%s (%s): %s", source.name, schedule, exc)
            rows.append(row)
            bar.advance()
        if settings.batch_size and read:
            throughput[schedule] = measure_throughput(pipe, read, base, settings.batch_size, settings.warmup)
    bar.close()
    summary = summarize_rows(rows, settings, backend, scorer.weights, throughput)
    write_report(out, rows, summary)
    return summary


def measure_throughput(pipe: ControlNetPipeline, images: list[np.ndarray], config: GenerationConfig,
                       batch_size: int, warmup: int) -> dict[str, float]:
    """Every image through run_batch, `batch_size` photos per call, after `warmup` untimed calls of one batch:
    images/s and ms/image (the contest's latency is one photo per call; this is a folder's throughput)."""
    for _ in range(warmup):
        pipe.run_batch(images[:batch_size], config, batch_size=batch_size)
    _, ms = timed(lambda: pipe.run_batch(images, config, batch_size=batch_size))
    return {"batch_size": batch_size, "images": len(images), "seconds": ms / 1000.0,
            "images_per_s": len(images) * config.num_samples / (ms / 1000.0),
            "ms_per_image": ms / (len(images) * config.num_samples)}


def summarize_rows(rows: list[dict[str, Any]], settings: ScoreSettings, backend: BackendConfig,
                   fid_weights: str, throughput: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    per_schedule = {}
    for schedule in settings.schedules:
        ok = [r for r in rows if r["schedule"] == schedule and "error" not in r]
        failed = [r for r in rows if r["schedule"] == schedule and "error" in r]
        latency = summarize([r["latency_ms"] for r in ok])
        mean_pd = float(np.mean([r["pd"] for r in ok])) if ok else float("nan")
        per_schedule[schedule] = {
            "images": len(ok), "errors": len(failed), "latency_ms": latency, "mean_pd": mean_pd,
            "max_pd": float(max((r["pd"] for r in ok), default=float("nan"))),
            "pd_failures": sum(not r["passed"] for r in ok),
            "mean_ssim": float(np.mean([r["ssim"] for r in ok])) if ok else float("nan"),
            "score": contest_score(mean_pd, latency["mean"]) if ok else 0.0,
        }
        if throughput and schedule in throughput:
            per_schedule[schedule]["throughput"] = throughput[schedule]
    return {"backend": asdict(backend), "settings": {**asdict(settings), "generation": asdict(settings.generation)},
            "fid_weights": fid_weights, "schedules": per_schedule}
