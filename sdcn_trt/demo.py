"""The offline main job: a built-in preset (tiny-trained: a small model trained here), scikit-image's
photos with their captions as prompts, torch and the backends asked for (skipped with the reason where
unavailable), parity with torch fp32."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from sdcn_trt.config import BackendConfig, GenerationConfig
from sdcn_trt.engines import backend_available
from sdcn_trt.errors import WeightsError
from sdcn_trt.images import PHOTO_PROMPTS, contact_sheet, sample_photos, save_image, write_contest_image
from sdcn_trt.models.presets import load_preset
from sdcn_trt.pipeline.pipeline import ControlNetPipeline
from sdcn_trt.progress import RunProgress
from sdcn_trt.scoring import PDScorer, contest_score

logger = logging.getLogger(__name__)

def run_demo(out_dir: Path, backends: list[str] | None = None, steps: int = 20,
             samples: list[str] | None = None, progress: bool = True, preset: str = "tiny-trained") -> dict:
    """Generate every sample photo on each backend; report time and parity with torch fp32. Each
    photo's prompt is its caption (PHOTO_PROMPTS), else the contest's "a bird".
    `progress`: one bar over every image of the run (the current backend and step beside it)."""
    config = GenerationConfig(ddim_steps=steps)
    photos = sample_photos(samples)
    components = load_preset(preset)
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = ["torch"] + [b for b in (backends or []) if b != "torch"]
    available = {backend: backend_available(backend) for backend in wanted}
    results: dict[str, dict[str, np.ndarray]] = {}
    prompts = {name: PHOTO_PROMPTS.get(name, config.prompt) for name in photos}
    summary: dict = {"preset": preset, "settings": {**config.__dict__, "prompt": prompts}, "backends": {}}
    controls: dict[str, np.ndarray] = {}
    runs = sum(ok for ok, _ in available.values()) * len(photos)
    with RunProgress(runs, "demo", enabled=progress) as bar:
        for backend in wanted:
            ok, why = available[backend]
            if not ok:
                bar.write(f"[{backend}] skipped: {why}")
                summary["backends"][backend] = {"skipped": why}
                continue
            bar.note(f"{backend}: preparing (export / build)")
            clock = time.perf_counter()
            pipe = ControlNetPipeline(components, BackendConfig(backend=backend))
            for runner in pipe.runners.values():
                runner.activate()  # export / engine build happens here, timed separately
            setup = time.perf_counter() - clock
            results[backend], seconds = {}, []
            for name, photo in photos.items():
                bar.describe(f"demo {backend}")
                clock = time.perf_counter()
                out = pipe.run(photo, config.replace(prompt=prompts[name]), progress=bar.steps)
                seconds.append(time.perf_counter() - clock)
                results[backend][name] = out.images[0]
                controls[name] = out.control
                save_image(out_dir / f"{name}_{backend}.png", out.images[0])
                bar.advance()
            entry = {"setup_s": setup, "mean_s_per_image": float(np.mean(seconds))}
            if backend != "torch" and "torch" in results:
                diffs = [np.abs(results[backend][n].astype(int) - results["torch"][n]) for n in photos]
                entry.update(max_abs_diff=int(max(d.max() for d in diffs)),
                             mean_abs_diff=float(np.mean([d.mean() for d in diffs])))
            summary["backends"][backend] = entry
            pipe.close()
            bar.write(f"[{backend}] {len(photos)} images, setup {setup:.1f} s, {entry['mean_s_per_image']:.2f} s/image"
                      + (f", vs torch fp32: max |diff| {entry['max_abs_diff']}, mean {entry['mean_abs_diff']:.4f} levels"
                         if "max_abs_diff" in entry else ""))
    ran = [b for b in wanted if b in results]
    _score(out_dir, results, summary)
    labels = ["input", "canny"] + ran + [f"|{b}-torch| x20" for b in ran if b != "torch"]
    rows = []
    for name, photo in photos.items():
        row = [photo, 255 - controls[name]] + [results[b][name] for b in ran]
        row += [np.clip(np.abs(results[b][name].astype(int) - results["torch"][name]) * 20, 0, 255).astype(np.uint8)
                for b in ran if b != "torch"]
        rows.append(row)
    sheet = save_image(out_dir / "demo_sheet.png", contact_sheet(rows, labels))
    summary["files"] = {"images": len(photos) * len(ran), "sheet": str(sheet),
                        "summary": str(out_dir / "demo_summary.json")}
    (out_dir / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def report_lines(summary: dict) -> list[str]:
    """What `sdcn-trt demo` prints after the run: PD and contest score per backend, the files written."""
    lines = []
    if summary.get("pd_weights") == "random":
        lines.append("PD: no FID Inception weights here (see `sdcn-trt score --help`); random Inception weights, "
                     "so PD below checks the plumbing, not the contest's numbers")
    for backend, entry in summary["backends"].items():
        if "mean_pd" in entry:
            lines.append(f"[{backend}] PD vs torch fp32: mean {entry['mean_pd']:.3f}, max {entry['max_pd']:.3f}; "
                         f"contest score {entry['contest_score']:.1f} at {1000 * entry['mean_s_per_image']:.0f} ms/image")
    files = summary["files"]
    lines.append(f"wrote {files['images']} images, {files['sheet']} and {files['summary']}")
    return lines


def _score(out_dir: Path, results: dict[str, dict[str, np.ndarray]], summary: dict) -> None:
    """PD of each backend's images against torch fp32, through JPEG files as the contest did, and the
    contest score from the measured latency. Real FID weights when they are found, else random ones."""
    try:
        scorer = PDScorer()
        summary["pd_weights"] = "fid"
    except WeightsError:
        scorer = PDScorer(random_seed=0)
        summary["pd_weights"] = "random"  # PD checks the plumbing, not the contest's numbers
    files = {b: {n: write_contest_image(out_dir / "jpg" / b / f"{n}.jpg", im) for n, im in imgs.items()}
             for b, imgs in results.items()}
    for backend in results:
        if backend == "torch":
            continue
        pds = [scorer.pd(files["torch"][n], files[backend][n]) for n in results[backend]]
        entry = summary["backends"][backend]
        entry.update(mean_pd=float(np.mean(pds)), max_pd=float(np.max(pds)),
                     contest_score=contest_score(float(np.mean(pds)), 1000 * entry["mean_s_per_image"]))
