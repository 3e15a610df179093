"""Quality against latency of denoising schedules, measured on a model that denoises: the
`tiny-trained` preset (a small model trained here on scikit-image's photos, not SD1.5). Every
schedule's images are compared with the full fp32 schedule's, photo by photo, through the public API.

    python -m benchmarks.quality        # writes benchmarks/results/quality-tiny-trained.{md,json,png}
    python -m benchmarks.quality --rows full eps=10 steps=10@fp16 --photos chelsea coffee

A row is a schedule as sdcn_trt.schedule spells it (full, steps=N, eps=N, control=N, deepcache=N, ...),
optionally @fp16. PD (the contest's Inception distance, images written as JPEG as the contest's scorer
writes them) needs the FID Inception weights (--fid-weights, $SDCN_FID_WEIGHTS or torch hub's cache);
without them the PD column says so and the pixel metrics stand alone.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared cores: sleeping OpenMP threads, not spinning ones

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sdcn_trt import BackendConfig, ControlNetPipeline, GenerationConfig  # noqa: E402
from sdcn_trt.errors import InputError, WeightsError  # noqa: E402
from sdcn_trt.images import PHOTO_PROMPTS, contact_sheet, sample_photos, save_image, write_contest_image  # noqa: E402
from sdcn_trt.models.presets import load_preset  # noqa: E402
from sdcn_trt.schedule import FULL, REUSE_CONTROL, REUSE_EPS, SHALLOW, parse_schedule  # noqa: E402
from sdcn_trt.scoring import image_metrics  # noqa: E402
from sdcn_trt.scoring.latency import timed  # noqa: E402
from sdcn_trt.scoring.pd import PDScorer  # noqa: E402

DEFAULT_ROWS = ("full", "steps=10", "eps=10", "control=10", "deepcache=3")
RESULTS = Path(__file__).parent / "results"


def parse_row(text: str) -> tuple[str, str]:
    """'eps=10@fp16' -> ('eps=10', 'fp16'): the schedule's canonical spelling and the precision (default fp32).
    The last '@' splits, so 'full@19,18@fp16' keeps its step list."""
    schedule, at, precision = text.rpartition("@")
    if not at or precision[:1].isdigit():  # no precision given ('full@19,18' is a schedule)
        schedule, precision = text, "fp32"
    if precision not in ("fp32", "fp16"):
        raise InputError(f"unknown precision {precision!r} in row {text!r}; use fp32 or fp16")
    return parse_schedule(schedule).spec, precision


def step_counts(config: GenerationConfig) -> str:
    """What each image's DDIM steps run, e.g. '10 full + 10 reuse_eps' (each network call on the CFG batch of 2)."""
    _, kinds = config.step_kinds()
    return " + ".join(f"{kinds.count(k)} {k}" for k in (FULL, REUSE_CONTROL, SHALLOW, REUSE_EPS) if kinds.count(k))


def contest_pd(scorer: PDScorer | None, reference: np.ndarray, image: np.ndarray, folder: Path) -> float | None:
    """PD of two RGB images written as the contest's scorer writes them (cv2.imwrite JPEG), or None without weights."""
    if scorer is None:
        return None
    paths = [write_contest_image(folder / f"{i}.jpg", im) for i, im in enumerate((reference, image))]
    return scorer.pd(*paths)


def run_quality(rows: list[str], photos: list[str], preset: str, base: GenerationConfig,
                scorer: PDScorer | None = None) -> dict:
    """Images, metrics against the full fp32 schedule, and latency (after one warm-up) per row and photo."""
    parsed = {row: parse_row(row) for row in rows}  # every row checked before any work
    scratch_dir = tempfile.TemporaryDirectory(prefix="sdcn-quality-")  # the JPEGs PD reads, removed at the end
    scratch = Path(scratch_dir.name)
    components = load_preset(preset)
    inputs = sample_photos(photos)
    pipes: dict[str, ControlNetPipeline] = {}
    images: dict[str, dict[str, np.ndarray]] = {}
    results: dict = {"rows": {}, "per_image": []}
    for row in ["full", *[r for r in rows if r != "full"]]:  # the reference first
        schedule, precision = parsed.get(row, ("full", "fp32"))
        if precision not in pipes:
            pipes[precision] = ControlNetPipeline(components, BackendConfig("torch", precision=precision))
        pipe, images[row], seconds = pipes[precision], {}, []
        for name, photo in inputs.items():
            config = base.replace(prompt=PHOTO_PROMPTS.get(name, base.prompt), schedule=schedule)
            if not seconds:
                pipe.run(photo, config)  # warm-up, untimed
            out, ms = timed(lambda: pipe.run(photo, config))
            images[row][name] = out.images[0]
            seconds.append(ms)
            metrics = image_metrics(images["full"][name], out.images[0])
            metrics["pd"] = contest_pd(scorer, images["full"][name], out.images[0], scratch)
            results["per_image"].append({"row": row, "photo": name, "ms": ms, **metrics})
            print(f"{row:>12} {name:>22}: {ms:7.0f} ms, mean |d| {metrics['mean_abs_diff']:.2f}, "
                  f"SSIM {metrics['ssim']:.4f}, PSNR {metrics['psnr']:.2f} dB, PD {metrics['pd']}", flush=True)
        mine = [r for r in results["per_image"] if r["row"] == row]
        config = base.replace(schedule=schedule)
        pds = [r["pd"] for r in mine if r["pd"] is not None]
        results["rows"][row] = {
            "schedule": schedule, "precision": precision, "ddim_steps": config.step_kinds()[0],
            "steps": step_counts(config), "ms_per_image": float(np.mean(seconds)),
            "pd_mean": float(np.mean(pds)) if pds else None, "pd_max": float(max(pds)) if pds else None,
            "mean_abs_diff": float(np.mean([r["mean_abs_diff"] for r in mine])),
            "max_abs_diff": int(max(r["max_abs_diff"] for r in mine)),
            "ssim_mean": float(np.mean([r["ssim"] for r in mine])), "ssim_min": float(min(r["ssim"] for r in mine)),
            "psnr_mean": float(np.mean([r["psnr"] for r in mine])), "psnr_min": float(min(r["psnr"] for r in mine)),
        }
    for pipe in pipes.values():
        pipe.close()
    scratch_dir.cleanup()
    results["images"] = images
    return results


def write_markdown(path: Path, results: dict, preset: str, base: GenerationConfig, photos: list[str],
                   pd_note: str) -> None:
    full_ms = results["rows"]["full"]["ms_per_image"]
    lines = [
        f"# Schedules on `{preset}`: quality against latency ({time.strftime('%Y-%m-%d')})", "",
        f"**Model: `{preset}`, a small model trained on this machine's CPU on scikit-image's photos and drawn "
        "scenes (scripts/train_tiny.py) — not SD1.5.** It has SD1.5 + ControlNet's structure and code paths and it "
        "denoises, so unlike the random presets its trajectories converge; the numbers show how schedules trade "
        "quality for time on a denoising model, not what they do to SD1.5's images.", "",
        f"Every row against the full fp32 schedule ({base.ddim_steps} DDIM steps), same seed, per photo: "
        f"{', '.join(photos)} ({len(photos)} photos; prompt = the photo's caption + \", {base.a_prompt}\"; "
        f"resolution {base.image_resolution}, guidance {base.scale}, seed {base.seed}). Torch backend on the CPU "
        f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        "cores shared with other work, so latencies are upper bounds, comparable within this table). "
        "Latency: one `run()` per image after a warm-up, mean over the photos.", "", f"PD: {pd_note}", "",
        "| schedule | precision | steps run | ms / image | speed-up | PD mean (max) | mean abs diff | max abs diff | "
        "SSIM mean (min) | PSNR dB mean (min) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row, r in results["rows"].items():
        psnr = "identical" if not np.isfinite(r["psnr_mean"]) else f"{r['psnr_mean']:.2f} ({r['psnr_min']:.2f})"
        pd = "n/a" if r["pd_mean"] is None else f"{r['pd_mean']:.2f} ({r['pd_max']:.2f})"
        lines.append(f"| {r['schedule']} | {r['precision']} | {r['steps']} | {r['ms_per_image']:.0f} | "
                     f"{full_ms / r['ms_per_image']:.2f}x | {pd} | {r['mean_abs_diff']:.2f} | {r['max_abs_diff']} | "
                     f"{r['ssim_mean']:.4f} ({r['ssim_min']:.4f}) | {psnr} |")
    lines += ["", "Differences in uint8 levels. Step kinds (docs/schedules.md): full = ControlNet + UNet; "
              "reuse_eps = no network, the last guided noise prediction reused (the contest winner's trick); "
              "reuse_control = the UNet only, with the last ControlNet residuals; shallow = the UNet's outer blocks "
              "on cached deep features (DeepCache). steps=N: N DDIM steps; fp16: the networks in half precision "
              "(CLIP stays fp32).",
              "Re-run: `python -m benchmarks.quality` (per-image rows in the .json beside this file; the .png shows "
              "each schedule's images)."]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), help="schedule[@fp16] ...")
    parser.add_argument("--photos", nargs="+", default=list(PHOTO_PROMPTS), help="skimage.data names")
    parser.add_argument("--preset", default="tiny-trained")
    parser.add_argument("--ddim-steps", type=int, default=20, help="steps of the full schedule")
    parser.add_argument("--image-resolution", type=int, default=256)
    parser.add_argument("--fid-weights", help="FID Inception weights for PD (default: $SDCN_FID_WEIGHTS, hub cache)")
    parser.add_argument("--out", type=Path, default=RESULTS / "quality-tiny-trained.md")
    args = parser.parse_args(argv)
    base = GenerationConfig(ddim_steps=args.ddim_steps, image_resolution=args.image_resolution)
    try:
        scorer: PDScorer | None = PDScorer(args.fid_weights)
        pd_note = (f"the contest's PD (pytorch-fid InceptionV3 pool3, weights {Path(scorer.weights).name}) of the "
                   "two images written as JPEG by cv2.imwrite, as the contest's scorer writes them.")
    except WeightsError as exc:
        if args.fid_weights:
            raise
        scorer, pd_note = None, ("not measured: the FID Inception weights are not on this machine and cannot be "
                                 "downloaded here, so the PD column says n/a; re-run with --fid-weights PATH "
                                 "where they are. The pixel metrics stand alone.")
        print(f"PD not measured: {exc}")
    results = run_quality(args.rows, args.photos, args.preset, base, scorer)
    images = results.pop("images")
    write_markdown(args.out, results, args.preset, base, args.photos, pd_note)
    args.out.with_suffix(".json").write_text(json.dumps({"preset": args.preset, **results}, indent=1))
    rows = list(results["rows"])
    sheet = [[images[r][name] for r in rows] for name in args.photos[:4]]
    save_image(args.out.with_suffix(".png"), contact_sheet(sheet, rows, tile=128))
    print(f"wrote {args.out} (+ .json, .png)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
