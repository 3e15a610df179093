"""Schedules' cost: network evaluations and end-to-end latency per image, per schedule, on one backend.

    python -m benchmarks.schedules                        # sd15-random, torch fp32, CPU, 20 steps
    python -m benchmarks.schedules --device cuda --precision fp16 --cuda-graph loop

Latency is the scoring harness's (wall clock around one `run`, synchronised, after a warm-up) on the
contest's workload (scikit-image's cat resized to 256x384, the contest's prompts and seed). Each
step kind's network cost is measured too, so the table shows where a schedule's time goes. Quality
needs a model that denoises: the table shows beside each schedule its tiny-trained SSIM / PSNR against
full fp32, read from `python -m benchmarks.quality`'s JSON files (--quality), where they hold it.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from benchmarks.case import timings
from sdcn_trt import BackendConfig, ControlNetPipeline, GenerationConfig
from sdcn_trt.export.descriptors import ShapeSpec
from sdcn_trt.images import sample_photos
from sdcn_trt.models.presets import load_preset
from sdcn_trt.pipeline.loop import networks_for
from sdcn_trt.scoring.tune import evaluations

SCHEDULES = ("full", "steps=10", "eps=10", "full@19,18,17,16,15,14,13,11,8,4", "control=10", "control=7",
             "deepcache=2", "deepcache=3", "deepcache=5")
# The GPU table's (scripts/gpu_check.sh): the reference, the three reuse families, and the contest's two
# top skip patterns: the 186 ms entry's eps list, and xiatwhu/trt2023's final rule (ControlNet at ldm index
# > 12 or even, UNet input half at > 10 or even) in our step kinds: c where only the ControlNet is skipped,
# s (our DeepCache shallow step: an approximation of reusing the UNet's input half) where both are.
WINNER_EPS = "full@19,18,17,16,15,14,13,11,8,4"
WINNER_SPLIT = "kinds=ffffffffcfsfsfsfsfsf"
GPU_SCHEDULES = ("full", "eps=10", "control=10", "deepcache=3", WINNER_EPS, WINNER_SPLIT)
NETWORKS = ("fused_step", "controlnet", "unet", "unet_deep", "unet_shallow")
RESULTS = Path(__file__).parent / "results"
QUALITY = (RESULTS / "quality-tiny-trained.json", RESULTS / "quality-tiny-trained-winners.json")


def load_quality(paths: list[Path]) -> dict[str, dict]:
    """fp32 rows of benchmarks.quality's JSON files by canonical schedule spelling (missing files skipped)."""
    rows: dict[str, dict] = {}
    for path in paths:
        if Path(path).exists():
            data = json.loads(Path(path).read_text())
            rows.update({r["schedule"]: {**r, "preset": data["preset"], "file": Path(path).name}
                         for r in data["rows"].values() if r["precision"] == "fp32"})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="sd15-random")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--cuda-graph", default="off")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (0 is fine on a CPU: nothing compiles)")
    parser.add_argument("--schedules", nargs="+", help="default: the CPU list; on CUDA the GPU table's "
                        "(full, eps=10, control=10, deepcache=3, the contest winners' patterns)")
    parser.add_argument("--quality", nargs="*", default=[str(p) for p in QUALITY],
                        help="benchmarks.quality JSON files whose fp32 rows fill the quality columns")
    parser.add_argument("--out", nargs="+", default=[str(RESULTS)])
    args = parser.parse_args()

    components = load_preset(args.preset, seed=0)
    backend = BackendConfig(backend=args.backend, device=args.device, precision=args.precision,
                            cuda_graph=args.cuda_graph)
    pipe = ControlNetPipeline(components, backend)
    photo = sample_photos(["chelsea"])["chelsea"]  # 300 x 451 -> 256 x 384, the contest's shape
    spec = ShapeSpec()
    schedules = args.schedules or list(GPU_SCHEDULES if args.device.startswith("cuda") else SCHEDULES)
    quality = load_quality([Path(p) for p in args.quality])
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "preset": args.preset, "backend": vars(args),
              "machine": {"platform": platform.platform(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(),
                          "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None},
              "networks": {}, "schedules": []}
    for name in NETWORKS:  # one evaluation of each network a step kind runs
        runner = pipe.runner(name)
        feed = {k: v.to(runner.device) for k, v in runner.descriptor.sample_inputs(spec).items()}
        report["networks"][name] = timings(lambda r=runner, f=feed: r.infer(f), args.repeats, max(args.warmup, 1))
        print(f"{name}: {report['networks'][name]['median_s']:.3f} s", flush=True)
    stem = f"schedules-{args.preset}-{args.device.split(':')[0]}-{time.strftime('%Y%m%d-%H%M')}"
    for schedule in schedules:
        config = GenerationConfig(ddim_steps=args.steps, schedule=schedule)
        steps, kinds = config.step_kinds()
        measured = timings(lambda c=config: pipe.run(photo, c), args.repeats, args.warmup)
        row = {"schedule": config.schedule, "steps": steps, "evaluations": evaluations(kinds),
               "networks": list(networks_for(kinds)), "end_to_end": measured}
        if config.schedule in quality:
            row["quality"] = {k: quality[config.schedule][k] for k in ("preset", "file", "ssim_mean", "ssim_min",
                                                                        "psnr_mean", "mean_abs_diff")}
        report["schedules"].append(row)
        print(json.dumps(row), flush=True)
        for folder in args.out:  # after every schedule: a run stopped by a time limit keeps what finished
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / f"{stem}.json").write_text(json.dumps(report, indent=1))
            (Path(folder) / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    b = report["backend"]
    full = next((r for r in report["schedules"] if r["schedule"] == "full"), None)
    nets = report["networks"]
    lines = [f"# Schedules {report['date']}: {report['preset']}, {b['backend']} {b['precision']} on {b['device']} "
             f"(CUDA graph {b['cuda_graph']})", "",
             f"Contest workload: 256x384, CFG batch 2, {b['steps']} DDIM steps configured; median of {b['repeats']} "
             f"after {b.get('warmup', 1)} warm-up run(s) (networks alone: after 1); machine: {report['machine']['platform']}, torch {report['machine']['torch']}, "
             f"{report['machine']['threads']} threads" + (f", {report['machine']['gpu']}" if report['machine']['gpu'] else "")
             + ".", "",
             "One evaluation of each network (s): " + ", ".join(f"{n} {v['median_s']:.3f}" for n, v in nets.items()), "",
             "| schedule | steps | ControlNet evals | UNet evals | shallow evals | ms/image | vs full | "
             "tiny-trained SSIM mean (min) | PSNR dB mean |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["schedules"]:
        e, s = r["evaluations"], r["end_to_end"]["median_s"]
        ratio = f"{full['end_to_end']['median_s'] / s:.2f}x" if full else "-"
        q = r.get("quality")
        quality = (f"{q['ssim_mean']:.4f} ({q['ssim_min']:.4f}) | "
                   + ("identical" if q["psnr_mean"] == float("inf") else f"{q['psnr_mean']:.2f}")) if q else "- | -"
        lines.append(f"| {r['schedule']} | {r['steps']} | {e['controlnet']} | {e['unet']} | {e['shallow']} | "
                     f"{1000 * s:.1f} | {ratio} | {quality} |")
    files = sorted({r["quality"]["file"] for r in report["schedules"] if "quality" in r})
    lines += ["", "Evaluations count networks run per image (each on the CFG batch of 2). Latency on this preset's "
              "weights; quality beside it: SSIM / PSNR against the full fp32 schedule on the tiny-trained preset "
              f"(measured on the CPU, {', '.join(files) or 'no quality file given'}; '-': not measured there)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
