"""`sdcn-trt tune`: measure schedules on the user's weights and photos, and pick the best for the contest.

Every candidate schedule (the named families at several N, then a greedy search that drops network
evaluations one step at a time while the quality stays within a bound) is run over the photos; its
latency is timed as the contest timed it (wall clock around one call, after a warm-up) and its
quality is measured against the full-schedule torch fp32 reference: PD with the real FID Inception
weights when they are found, else SSIM / PSNR / |diff| (labelled as such, and the choice then is the
fastest schedule within the SSIM bound). Measured candidates are cached in the output folder, so an
interrupted run resumes. Writes candidates.jsonl, best_schedule.json (usable as --schedule-file),
tune.json and report.html.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from sdcn_trt.cache import hash_json
from sdcn_trt.models.components import Components
from sdcn_trt.config import BackendConfig, GenerationConfig
from sdcn_trt.errors import InputError, WeightsError
from sdcn_trt.images import read_contest_image, write_contest_image
from sdcn_trt.pipeline.pipeline import ControlNetPipeline
from sdcn_trt.samplers import check_sampler
from sdcn_trt.schedule import (
    FULL,
    REUSE_CONTROL,
    REUSE_EPS,
    SHALLOW,
    kinds_spelling,
    parse_schedule,
)
from sdcn_trt.scoring.contest import contest_score
from sdcn_trt.scoring.latency import summarize, timed
from sdcn_trt.scoring.metrics import image_metrics
from sdcn_trt.scoring.pd import PDScorer
from sdcn_trt.scoring.run import (
    ScoreSettings,
    check_fid_choice,
    check_input_folder,
    collect_inputs,
    reference_image,
    weights_hash,
)
from sdcn_trt.scoring.tune_report import write_tune_report

logger = logging.getLogger(__name__)

CACHE_FILE = "candidates.jsonl"
FAMILY_SIZES = {"eps": (5, 7, 10, 14), "control": (5, 7, 10, 14), "deepcache": (2, 3, 5)}


@dataclass
class TuneSettings:
    """What `sdcn-trt tune` measures; flag names equal field names."""

    inputs: str | None = None  # folder of photos; None: scikit-image's sample photos
    output: str = "sdcn_tune"  # results folder (also the resumable cache of measured candidates)
    candidates: tuple[str, ...] = ()  # schedule spellings to measure; () = full, steps=10 and the families
    samplers: tuple[str, ...] = ()  # samplers to measure each candidate with; () = the generation's sampler
    greedy: bool = True  # then drop network evaluations one step at a time while the quality holds
    greedy_kinds: tuple[str, ...] = (REUSE_EPS, REUSE_CONTROL)  # what a dropped full step becomes
    greedy_budget: int = 40  # at most this many greedy candidates
    max_pd: float = 4.0  # quality bound with real FID weights (the contest's PD factor falls faster past 4)
    min_ssim: float = 0.9  # quality bound without them
    fid_weights: str | None = None  # pt_inception-2015-12-05-6726825d.pth; default: $SDCN_FID_WEIGHTS, hub cache
    random_fid: bool = False  # seeded random Inception weights: plumbing only, PD values not the contest's
    warmup: int = 1  # untimed runs per candidate before timing
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def __post_init__(self) -> None:
        self.candidates = tuple(parse_schedule(c).spec for c in self.candidates)
        self.samplers = tuple(dict.fromkeys(check_sampler(s) for s in self.samplers))
        for sampler in self.samplers:  # eta, step counts: refused now, before any weights load
            self.generation.replace(sampler=sampler)
        unknown = [k for k in self.greedy_kinds if k not in (REUSE_EPS, REUSE_CONTROL, SHALLOW)]
        if unknown:
            raise InputError(f"greedy_kinds {unknown} are not step kinds a full step can become; "
                             f"valid: {REUSE_EPS}, {REUSE_CONTROL}, {SHALLOW}")
        if self.greedy_budget < 0 or self.warmup < 0:
            raise InputError(f"greedy_budget and warmup must be >= 0, got {self.greedy_budget}, {self.warmup}")
        if not 0 < self.min_ssim <= 1 or self.max_pd <= 0:
            raise InputError(f"min_ssim must be in (0, 1] and max_pd > 0, got {self.min_ssim}, {self.max_pd}")
        check_fid_choice(self.fid_weights, self.random_fid)
        check_input_folder(self.inputs)


def default_candidates(steps: int) -> list[str]:
    """full, steps=half, and each family at the sizes that fit the run."""
    out = ["full", f"steps={max(1, steps // 2)}"]
    for family, sizes in FAMILY_SIZES.items():
        out += [f"{family}={n}" for n in sizes if n < steps]
    return [parse_schedule(c).spec for c in dict.fromkeys(out)]


def evaluations(kinds: tuple[str, ...]) -> dict[str, int]:
    """Network evaluations per image: ControlNet runs, full UNet runs, shallow UNet runs."""
    return {"controlnet": kinds.count(FULL), "unet": kinds.count(FULL) + kinds.count(REUSE_CONTROL),
            "shallow": kinds.count(SHALLOW), "steps": len(kinds)}


class Tuner:
    """Measures candidates over fixed photos and references; remembers them in the output folder."""

    def __init__(self, components: Components, backend: BackendConfig, settings: TuneSettings):
        self.settings, self.backend = settings, backend
        self.out = Path(settings.output)
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            self.scorer: PDScorer | None = PDScorer(settings.fid_weights, random_seed=0 if settings.random_fid else None)
        except WeightsError as exc:
            if settings.fid_weights:
                raise
            logger.warning("no FID Inception weights (%s): quality is SSIM/PSNR/|diff| against the reference, "
                           "and the choice is the fastest schedule with mean SSIM >= %.3f", exc, settings.min_ssim)
            self.scorer = None
        score = ScoreSettings(inputs=settings.inputs, output=str(self.out))
        self.sources = collect_inputs(score, self.out / "inputs")
        self.images = [read_contest_image(p) for p in self.sources]  # as score and the contest read photos
        self.pipe = ControlNetPipeline(components, backend)
        weights = weights_hash(components)
        reference_pipe = ControlNetPipeline(components, BackendConfig(device=backend.device,
                                                                      cache_dir=backend.cache_dir))
        full = settings.generation.replace(schedule=FULL, sampler="ddim")  # the reference: ldm's DDIM, every step
        self.references = []
        for source, image in zip(self.sources, self.images, strict=True):
            ref = reference_image(weights, reference_pipe, score, source, image, full)
            self.references.append(write_contest_image(self.out / "reference" / f"{source.stem}.jpg", ref))
        generation = {k: v for k, v in asdict(full).items() if k != "sampler"}  # the candidate's own is in _key
        self.key_base = {"weights": weights, "backend": asdict(backend), "generation": generation,
                         "inputs": [p.name for p in self.sources], "pd": self.scorer.weights if self.scorer else None}
        self.measured: dict[str, dict[str, Any]] = {}
        cache = self.out / CACHE_FILE
        if cache.is_file():
            for line in cache.read_text().splitlines():
                try:
                    record = json.loads(line)
                    self.measured[record["key"]] = record
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a kill

    def _key(self, spec: str, sampler: str) -> str:
        """The candidate's cache key; DDIM's without a sampler field, as measured before samplers existed."""
        return hash_json({**self.key_base, "schedule": spec, **({"sampler": sampler} if sampler != "ddim" else {})})[:24]

    def measure(self, spec: str, sampler: str | None = None) -> dict[str, Any]:
        """Latency and quality of one schedule with one sampler (None: the generation's) over every photo
        (from the cache when measured before)."""
        sampler = sampler or self.settings.generation.sampler
        key = self._key(spec, sampler)
        if key in self.measured:
            return self.measured[key]
        config = self.settings.generation.replace(schedule=spec, sampler=sampler)
        for _ in range(self.settings.warmup):
            self.pipe.run(self.images[0], config)
        latencies, rows = [], []
        folder = self.out / "candidates" / key
        for source, image, ref_path in zip(self.sources, self.images, self.references, strict=True):
            result, ms = timed(lambda: self.pipe.run(image, config))
            path = write_contest_image(folder / f"{source.stem}.jpg", result.images[0])
            metrics = image_metrics(cv2.imread(str(ref_path)), cv2.imread(str(path)))
            if self.scorer is not None:
                metrics["pd"] = self.scorer.pd(ref_path, path)
            latencies.append(ms)
            rows.append(metrics)
        _, kinds = config.step_kinds()
        record = {"key": key, "schedule": spec, "sampler": sampler, "latency_ms": summarize(latencies),
                  "evaluations": evaluations(kinds),
                  **{m: float(np.mean([r[m] for r in rows])) for m in rows[0] if m != "max_abs_diff"},
                  "max_abs_diff": int(max(r["max_abs_diff"] for r in rows))}
        record["objective"] = self.objective(record)
        self.measured[key] = record
        with open(self.out / CACHE_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        return record

    def within_bound(self, record: dict[str, Any]) -> bool:
        if self.scorer is not None:
            return record["pd"] <= self.settings.max_pd
        return record["ssim"] >= self.settings.min_ssim

    def objective(self, record: dict[str, Any]) -> float:
        """Higher is better: the contest score with real PD; else -latency within the SSIM bound."""
        if self.scorer is not None:
            return contest_score(record["pd"], record["latency_ms"]["mean"])
        return -record["latency_ms"]["mean"] if self.within_bound(record) else float("-inf")

    def greedy(self, start: tuple[str, ...], steps: int, report: Callable[[], None],
               sampler: str | None = None) -> list[dict[str, Any]]:
        """From `start` (with `sampler`), turn one full step at a time into a cheaper kind: each round takes
        the change with the best objective among those within the quality bound; stops when none is."""
        kinds, tried = list(start), []
        prefix = f"steps={steps}+"
        while len(tried) < self.settings.greedy_budget:
            options = [(i, k) for i, kind in enumerate(kinds) if kind == FULL and i > 0 for k in self.settings.greedy_kinds]
            if not options:
                break
            best = None
            for i, kind in options:
                if len(tried) >= self.settings.greedy_budget:
                    break
                candidate = kinds[:i] + [kind] + kinds[i + 1:]
                record = self.measure(prefix + kinds_spelling(candidate), sampler)
                tried.append(record)
                report()
                if self.within_bound(record) and (best is None or record["objective"] > best[1]["objective"]):
                    best = (candidate, record)
            if best is None:
                break
            kinds = best[0]
        return tried


def pareto_frontier(records: list[dict[str, Any]], quality: str) -> list[dict[str, Any]]:
    """Records no other record beats on both latency and quality (lower PD / higher SSIM is better)."""
    sign = -1.0 if quality == "pd" else 1.0
    ordered = sorted(records, key=lambda r: (r["latency_ms"]["mean"], -sign * r[quality]))
    frontier, best = [], -np.inf
    for r in ordered:
        if sign * r[quality] > best:
            frontier.append(r)
            best = sign * r[quality]
    return frontier


def tune(components: Components, backend: BackendConfig, settings: TuneSettings,
         progress: bool = True) -> dict[str, Any]:
    """Measure the candidates (and the greedy search), write the results, return the summary."""
    from tqdm.auto import tqdm

    tuner = Tuner(components, backend, settings)
    steps = settings.generation.ddim_steps
    candidates = list(settings.candidates) or default_candidates(steps)
    samplers = settings.samplers or (settings.generation.sampler,)
    total = len(candidates) * len(samplers) + (settings.greedy_budget if settings.greedy else 0)
    bar = tqdm(total=total, desc="tune", unit="schedule", disable=not progress)
    records = []
    for sampler in samplers:
        for spec in candidates:
            bar.set_postfix_str(f"{sampler} {spec}")
            records.append(tuner.measure(spec, sampler))
            bar.update(1)
    if settings.greedy:
        ok = [r for r in records if tuner.within_bound(r)] or records
        start = max(ok, key=lambda r: r["objective"])
        start_steps, start_kinds = settings.generation.replace(schedule=start["schedule"],
                                                               sampler=start["sampler"]).step_kinds()
        records += tuner.greedy(start_kinds, start_steps, lambda: bar.update(1), start["sampler"])
    bar.close()
    quality = "pd" if tuner.scorer is not None else "ssim"
    best = max(records, key=lambda r: r["objective"])
    summary = {"quality": quality, "fid_weights": tuner.scorer.weights if tuner.scorer else None,
               "bound": {"pd": settings.max_pd} if quality == "pd" else {"ssim": settings.min_ssim},
               "best": best, "frontier": pareto_frontier(records, quality), "candidates": records,
               "backend": asdict(backend), "generation": asdict(settings.generation)}
    out = tuner.out
    (out / "tune.json").write_text(json.dumps(summary, indent=1))
    (out / "best_schedule.json").write_text(json.dumps({"schedule": best["schedule"], "sampler": best["sampler"],
                                                         "measured": best, "quality": quality}, indent=1))
    write_tune_report(out, summary)
    return summary


def frontier_table(summary: dict[str, Any]) -> str:
    """The frontier as plain text for the terminal."""
    q = summary["quality"]
    lines = [f"{'sampler':<16} {'schedule':<40} {'mean ms':>9} {q:>7} {'PSNR':>6} {'ControlNet':>10} {'UNet':>5} "
             f"{'shallow':>7}"]
    for r in summary["frontier"]:
        e = r["evaluations"]
        lines.append(f"{r['sampler']:<16} {r['schedule']:<40} {r['latency_ms']['mean']:>9.1f} {r[q]:>7.3f} {r['psnr']:>6.1f} "
                     f"{e['controlnet']:>10} {e['unet']:>5} {e['shallow']:>7}")
    return "\n".join(lines)
