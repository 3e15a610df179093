"""Quality against latency of denoising schedules, measured on a model that denoises: the
`tiny-trained` preset (a small model trained here on scikit-image's photos, not SD1.5). Every
schedule's images are compared with the full fp32 schedule's, photo by photo, through the public API.

    python -m benchmarks.quality        # writes benchmarks/results/quality-tiny-trained.{md,json,png}
    python -m benchmarks.quality --rows full eps=10 steps=10@fp16 --photos chelsea coffee

A row is a schedule as `sdcn-trt score` spells it (full, eps=N, steps=N), optionally @fp16.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared cores: sleeping OpenMP threads, not spinning ones

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sdcn_trt import BackendConfig, ControlNetPipeline, GenerationConfig  # noqa: E402
from sdcn_trt.errors import InputError  # noqa: E402
from sdcn_trt.images import PHOTO_PROMPTS, contact_sheet, sample_photos, save_image  # noqa: E402
from sdcn_trt.models import load_preset  # noqa: E402
from sdcn_trt.scoring import image_metrics  # noqa: E402
from sdcn_trt.scoring.latency import timed  # noqa: E402
from sdcn_trt.scoring.run import parse_schedule  # noqa: E402

DEFAULT_ROWS = ("full", "eps=14", "eps=10", "steps=10", "full@fp16")
RESULTS = Path(__file__).parent / "results"


def parse_row(text: str) -> tuple[dict[str, int], str]:
    """'eps=10@fp16' -> ({'eps_steps': 10}, 'fp16'); the precision defaults to fp32."""
    schedule, _, precision = text.partition("@")
    precision = precision or "fp32"
    if precision not in ("fp32", "fp16"):
        raise InputError(f"unknown precision {precision!r} in row {text!r}; use fp32 or fp16")
    return parse_schedule(schedule), precision


def evaluations(config: GenerationConfig) -> int:
    """ControlNet+UNet evaluations per image (each on the CFG batch of 2)."""
    return config.eps_steps if 0 < config.eps_steps < config.ddim_steps else config.ddim_steps


def run_quality(rows: list[str], photos: list[str], preset: str, base: GenerationConfig) -> dict:
    """Images, metrics against the full fp32 schedule, and latency (after one warm-up) per row and photo."""
    parsed = {row: parse_row(row) for row in rows}  # every row checked before any work
    components = load_preset(preset)
    inputs = sample_photos(photos)
    pipes: dict[str, ControlNetPipeline] = {}
    images: dict[str, dict[str, np.ndarray]] = {}
    results: dict = {"rows": {}, "per_image": []}
    for row in ["full", *[r for r in rows if r != "full"]]:  # the reference first
        fields, precision = parsed.get(row, ({}, "fp32"))
        if precision not in pipes:
            pipes[precision] = ControlNetPipeline(components, BackendConfig("torch", precision=precision))
        pipe, images[row], seconds = pipes[precision], {}, []
        for name, photo in inputs.items():
            config = base.replace(prompt=PHOTO_PROMPTS.get(name, base.prompt), **fields)
            if not seconds:
                pipe.run(photo, config)  # warm-up, untimed
            out, ms = timed(lambda: pipe.run(photo, config))
            images[row][name] = out.images[0]
            seconds.append(ms)
            metrics = image_metrics(images["full"][name], out.images[0])
            results["per_image"].append({"row": row, "photo": name, "ms": ms, **metrics})
            print(f"{row:>12} {name:>22}: {ms:7.0f} ms, mean |d| {metrics['mean_abs_diff']:.2f}, "
                  f"SSIM {metrics['ssim']:.4f}, PSNR {metrics['psnr']:.2f} dB", flush=True)
        mine = [r for r in results["per_image"] if r["row"] == row]
        results["rows"][row] = {
            "precision": precision, "ddim_steps": base.replace(**fields).ddim_steps,
            "evaluations": evaluations(base.replace(**fields)), "ms_per_image": float(np.mean(seconds)),
            "mean_abs_diff": float(np.mean([r["mean_abs_diff"] for r in mine])),
            "max_abs_diff": int(max(r["max_abs_diff"] for r in mine)),
            "ssim_mean": float(np.mean([r["ssim"] for r in mine])), "ssim_min": float(min(r["ssim"] for r in mine)),
            "psnr_mean": float(np.mean([r["psnr"] for r in mine])), "psnr_min": float(min(r["psnr"] for r in mine)),
        }
    for pipe in pipes.values():
        pipe.close()
    results["images"] = images
    return results


def write_markdown(path: Path, results: dict, preset: str, base: GenerationConfig, photos: list[str]) -> None:
    full_ms = results["rows"]["full"]["ms_per_image"]
    lines = [
        f"# Schedules on `{preset}`: quality against latency ({time.strftime('%Y-%m-%d')})", "",
        f"**Model: `{preset}`, a small model trained on this machine's CPU on {len(PHOTO_PROMPTS)} of scikit-image's "
        "photos (scripts/train_tiny.py) — not SD1.5.** It has SD1.5 + ControlNet's structure and code paths and it "
        "denoises, so unlike the random presets its trajectories converge; the numbers show how schedules trade "
        "quality for time on a denoising model, not what they do to SD1.5's images.", "",
        f"Every row against the full fp32 schedule ({base.ddim_steps} DDIM steps), same seed, per photo: "
        f"{', '.join(photos)} ({len(photos)} photos; prompt = the photo's caption + \", {base.a_prompt}\"; "
        f"resolution {base.image_resolution}, guidance {base.scale}, seed {base.seed}). Torch backend on the CPU "
        f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        "cores shared with other work, so latencies are upper bounds, comparable within this table). "
        "Latency: one `run()` per image after a warm-up, mean over the photos.", "",
        "| schedule | precision | UNet+ControlNet evaluations | ms / image | speed-up | mean abs diff | max abs diff | "
        "SSIM mean (min) | PSNR dB mean (min) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row, r in results["rows"].items():
        psnr = "identical" if not np.isfinite(r["psnr_mean"]) else f"{r['psnr_mean']:.2f} ({r['psnr_min']:.2f})"
        lines.append(f"| {row.split('@')[0]} | {r['precision']} | {r['evaluations']} | {r['ms_per_image']:.0f} | "
                     f"{full_ms / r['ms_per_image']:.2f}x | {r['mean_abs_diff']:.2f} | {r['max_abs_diff']} | "
                     f"{r['ssim_mean']:.4f} ({r['ssim_min']:.4f}) | {psnr} |")
    lines += ["", "Differences in uint8 levels. eps=N: the network runs at N of the steps and its guided noise "
              "prediction is reused at the others (the contest winner's trick); steps=N: N DDIM steps; fp16: the "
              "networks in half precision (CLIP stays fp32).",
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
    parser.add_argument("--out", type=Path, default=RESULTS / "quality-tiny-trained.md")
    args = parser.parse_args(argv)
    base = GenerationConfig(ddim_steps=args.ddim_steps, image_resolution=args.image_resolution)
    results = run_quality(args.rows, args.photos, args.preset, base)
    images = results.pop("images")
    write_markdown(args.out, results, args.preset, base, args.photos)
    args.out.with_suffix(".json").write_text(json.dumps({"preset": args.preset, **results}, indent=1))
    rows = list(results["rows"])
    sheet = [[images[r][name] for r in rows] for name in args.photos[:4]]
    save_image(args.out.with_suffix(".png"), contact_sheet(sheet, rows, tile=128))
    print(f"wrote {args.out} (+ .json, .png)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
