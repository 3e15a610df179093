"""Quality per network evaluation: every sampler at 4-30 steps against a converged reference of the same seed.

    python -m benchmarks.samplers                                   # tiny-trained, CPU, the committed table
    python -m benchmarks.samplers --preset sd15-random --device cuda --precision fp16 --cuda-graph loop \\
        --images 1 --steps 10 20 --warmup --repeats 3               # timings (random weights: no quality)

Inputs: held-out drawn scenes (benchmarks/tiny_data.draw_scene, seeds never trained on) and the two
held-out photos, with their captions as prompts, at 256x256 (photos: short side 256). Each image is
generated with every sampler at every step count, and scored against the converged reference of the
same seed and prompt: SSIM and PSNR (sdcn_trt.scoring.metrics) and edge F1 (the output's canny map
against the reference output's, within 2 px: benchmarks.held_out.edge_f1), plus seconds per image
(--warmup: after one untimed run of the same sampler, steps and image, so a CUDA graph's capture is not
timed; --repeats: the median of that many timed runs). The speed line puts each sampler at 10 steps
against ddim at 20 (issue #32's GPU goal: <= 0.55x).

The converged reference is dpmpp_2m at 200 steps: every deterministic sampler here (ddim at eta 0,
dpmpp_2m(_karras), unipc, euler) integrates the same probability-flow ODE, and a second-order solver at
200 steps is far closer to its solution than any entry of the table; `ddim` at 200 steps is measured
against it too (the "floor" line: how much two converged solvers still differ). The stochastic samplers
(euler_a, lcm) draw fresh noise every step and converge to other pictures of the same seed: their
rows measure closeness to the ODE's picture, not their own quality (noted in the table).
Results: benchmarks/results/samplers-<preset>-<device>.{md,json,png}.
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

from benchmarks.held_out import edge_f1, output_edges  # noqa: E402
from benchmarks.tiny_data import HELD_OUT_PHOTOS, HELD_OUT_SEED_START, draw_scene, load_photo  # noqa: E402
from sdcn_trt import BackendConfig, ControlNetPipeline, GenerationConfig  # noqa: E402
from sdcn_trt.models.presets import load_preset  # noqa: E402
from sdcn_trt.samplers import SAMPLER_NAMES, SAMPLERS  # noqa: E402
from sdcn_trt.schedule import num_steps  # noqa: E402
from sdcn_trt.scoring.metrics import image_metrics  # noqa: E402

RESULTS = Path(__file__).parent / "results"
STEPS = (4, 6, 8, 10, 15, 20, 30)
REFERENCE = ("dpmpp_2m", 200)  # (sampler, steps); --reference-steps changes the steps (of the floor's too)
FLOOR_SAMPLER = "ddim"
SEED = 12345


def inputs(count: int) -> list[tuple[str, np.ndarray, str]]:
    """(name, RGB photo, prompt): held-out scenes first, then the held-out photos, `count` in all."""
    scenes = [draw_scene(HELD_OUT_SEED_START + 700 + k) for k in range(max(0, count - len(HELD_OUT_PHOTOS)))]
    out = [(f"scene{HELD_OUT_SEED_START + 700 + k}", s.image, s.caption()) for k, s in enumerate(scenes)]
    out += [(name, load_photo(name), caption) for name, caption in HELD_OUT_PHOTOS.items()]
    return out[:count]


def generate(pipe: ControlNetPipeline, image: np.ndarray, prompt: str, sampler: str, steps: int,
             resolution: int) -> tuple[np.ndarray, float]:
    config = GenerationConfig(prompt=prompt, image_resolution=resolution, ddim_steps=steps, sampler=sampler, seed=SEED)
    if pipe.backend.device.startswith("cuda"):
        torch.cuda.synchronize()
    clock = time.perf_counter()
    out = pipe.run(image, config).images[0]
    if pipe.backend.device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - clock


def scores(reference: np.ndarray, image: np.ndarray) -> dict[str, float]:
    metrics = image_metrics(reference, image)
    return {"ssim": metrics["ssim"], "psnr": metrics["psnr"],
            "edge_f1": edge_f1(output_edges(image), output_edges(reference))}


def measure(pipe: ControlNetPipeline, samplers: list[str], steps: list[int], count: int, resolution: int,
            quality: bool, reference_steps: int = REFERENCE[1], log=print, warmup: bool = False,
            repeats: int = 1) -> dict:
    rows: dict[str, dict[str, list]] = {}  # "sampler@steps" -> metric -> per image
    pictures = inputs(count)
    generate(pipe, pictures[0][1], pictures[0][2], "ddim", 2, resolution)  # a warm-up: first-call costs untimed
    for name, image, prompt in pictures:
        reference = generate(pipe, image, prompt, REFERENCE[0], reference_steps, resolution)[0] if quality else None
        runs = [(s, n) for s in samplers for n in steps] + ([(FLOOR_SAMPLER, reference_steps)] if quality else [])
        for sampler, n in runs:
            if warmup:  # untimed: builds (and captures) this sampler's loop at this step count and image size
                generate(pipe, image, prompt, sampler, n, resolution)
            timed = [generate(pipe, image, prompt, sampler, n, resolution) for _ in range(repeats)]
            out = timed[-1][0]
            row = rows.setdefault(f"{sampler}@{n}", {"seconds": []})
            row["seconds"].append(float(np.median([seconds for _, seconds in timed])))
            if reference is not None:
                for metric, value in scores(reference, out).items():
                    row.setdefault(metric, []).append(value)
        log(f"{name}: {len(runs)} runs", flush=True)
    table = []
    for key, values in rows.items():
        sampler, n = key.split("@")
        entry = {"sampler": sampler, "steps": int(n), **{m: float(np.mean(v)) for m, v in values.items()}}
        if "ssim" in values:
            entry["ssim_min"] = float(np.min(values["ssim"]))
        table.append(entry)
    return {"rows": table, "reference": [REFERENCE[0], reference_steps] if quality else None}


def _floor(report: dict) -> tuple[str, int] | None:
    return (FLOOR_SAMPLER, report["reference"][1]) if report.get("reference") else None


def markdown(report: dict) -> str:
    m = report["machine"]
    quality = report["quality"]
    lines = [f"# Samplers: {report['preset']}, torch {report['precision']} on {report['device']} "
             f"(CUDA graph {report['cuda_graph']}), {report['date']}", "",
             f"{report['images']} held-out images ({', '.join(report['inputs'])}), resolution {report['resolution']}, "
             f"seed {SEED}; machine: {m['platform']}, torch {m['torch']}, {m['threads']} threads"
             + (f", {m['gpu']}" if m["gpu"] else "") + "." + timing_words(report), ""]
    if quality:
        ref = report["reference"]
        lines += [f"Reference: {ref[0]} at {ref[1]} steps (the converged ODE picture of each seed); "
                  f"SSIM / PSNR / edge F1 against it, means over the images (SSIM min in brackets). "
                  f"Floor ({FLOOR_SAMPLER} at {ref[1]} steps against it): " + floor_line(report) + ".", ""]
    by = {(r["sampler"], r["steps"]): r for r in report["rows"]}
    floor = _floor(report)
    samplers = list(dict.fromkeys(r["sampler"] for r in report["rows"] if (r["sampler"], r["steps"]) != floor))
    steps = sorted({r["steps"] for r in report["rows"] if (r["sampler"], r["steps"]) != floor})
    header = "| sampler | " + " | ".join(f"{n} steps" for n in steps) + " |"
    lines += ["SSIM (mean) per step count:" if quality else "Seconds per image:", "", header,
              "|---|" + "---|" * len(steps)]
    for sampler in samplers:
        cells = []
        for n in steps:
            r = by.get((sampler, n))
            cells.append("-" if r is None else f"{r['ssim']:.4f}" if quality else f"{r['seconds']:.3f}")
        note = " (stochastic)" if SAMPLERS[sampler].stochastic else ""
        lines.append(f"| {sampler}{note} | " + " | ".join(cells) + " |")
    if quality:
        lines += ["", "All columns (mean over images):", "",
                  "| sampler | steps | SSIM | SSIM min | PSNR dB | edge F1 | s/image |", "|---|---|---|---|---|---|---|"]
        for r in report["rows"]:
            lines.append(f"| {r['sampler']} | {r['steps']} | {r['ssim']:.4f} | {r['ssim_min']:.4f} | {r['psnr']:.2f} | "
                         f"{r['edge_f1']:.3f} | {r['seconds']:.3f} |")
        odd = sorted({r["steps"] for r in report["rows"] if r["sampler"] == "ddim" and num_steps(r["steps"]) != r["steps"]})
        if odd:
            lines += ["", "ddim's step counts are ldm's uniform discretisation's: asked for "
                      + ", ".join(f"{n} it runs {num_steps(n)}" for n in odd) + " (as the original sampler does)."]
        lines += ["", "Half the steps: " + half_steps_line(report) + "."]
    speed = speed_line(report)
    if speed:
        lines += ["", speed]
    return "\n".join(lines) + "\n"


def timing_words(report: dict) -> str:
    """How the seconds were taken (reports from before --warmup/--repeats: one run, nothing untimed)."""
    warm, repeats = report.get("warmup", False), report.get("repeats", 1)
    if not warm and repeats == 1:
        return ""
    return (" Seconds: " + ("after one untimed run of the same sampler, steps and image, " if warm else "")
            + f"the median of {repeats} timed run{'s' if repeats > 1 else ''} per image.")


def speed_line(report: dict) -> str:
    """Each sampler at 10 steps against ddim at 20, in time per image (issue #32's GPU goal: <= 0.55x);
    empty when the table lacks either."""
    by = {(r["sampler"], r["steps"]): r for r in report["rows"]}
    ddim = by.get(("ddim", 20))
    tens = [(s, r) for (s, n), r in by.items() if n == 10 and s != "ddim"]
    if ddim is None or not tens:
        return ""
    ratios = ", ".join(f"{s} {r['seconds'] / ddim['seconds']:.2f}x" for s, r in tens)
    return (f"Speed: a 10-step image against ddim's 20-step image ({1000 * ddim['seconds']:.1f} ms): {ratios} "
            "(goal <= 0.55x).")


def floor_line(report: dict) -> str:
    r = next((r for r in report["rows"] if (r["sampler"], r["steps"]) == _floor(report)), None)
    return "-" if r is None else f"SSIM {r['ssim']:.4f}, PSNR {r['psnr']:.2f} dB, edge F1 {r['edge_f1']:.3f}"


def half_steps_line(report: dict) -> str:
    """The goal's check: which samplers at 10 steps are as close to the reference as ddim at 20."""
    by = {(r["sampler"], r["steps"]): r for r in report["rows"]}
    ddim = by.get(("ddim", 20))
    tens = [r for (s, n), r in by.items() if n == 10 and s != "ddim"]
    if ddim is None or not tens:
        return "not measured (needs ddim at 20 and others at 10 steps)"
    good = [r["sampler"] for r in tens if r["ssim"] >= ddim["ssim"]]
    best = max(tens, key=lambda r: r["ssim"])
    if good:
        return (f"at 10 steps {', '.join(good)} {'is' if len(good) == 1 else 'are'} as close to the reference as "
                f"ddim at 20 (SSIM {ddim['ssim']:.4f}; best {best['sampler']} {best['ssim']:.4f})")
    return (f"no sampler at 10 steps reaches ddim at 20 (SSIM {ddim['ssim']:.4f}); the closest is "
            f"{best['sampler']} at {best['ssim']:.4f}")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    rows = [r for r in report["rows"] if (r["sampler"], r["steps"]) != _floor(report)]
    for metric, ax in zip(("ssim", "edge_f1"), axes, strict=True):
        for sampler in dict.fromkeys(r["sampler"] for r in rows):
            mine = sorted((r for r in rows if r["sampler"] == sampler), key=lambda r: r["steps"])
            style = "--" if SAMPLERS[sampler].stochastic else "-"
            ax.plot([r["steps"] for r in mine], [r[metric] for r in mine], style, marker="o", label=sampler)
        ax.set_xlabel("steps (one ControlNet + UNet evaluation each, CFG-batched)")
        ax.set_ylabel(f"{metric} against {report['reference'][0]}@{report['reference'][1]}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{report['preset']}: quality against steps, per sampler (dashed: stochastic)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny-trained")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--cuda-graph", default="off")
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLER_NAMES), choices=SAMPLER_NAMES)
    parser.add_argument("--steps", nargs="+", type=int, default=list(STEPS))
    parser.add_argument("--images", type=int, default=4, help="held-out scenes and photos (the photos last)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--reference-steps", type=int, default=REFERENCE[1], help=f"{REFERENCE[0]}'s steps for the "
                        f"converged reference (default {REFERENCE[1]}; ddim's floor line runs as many)")
    parser.add_argument("--warmup", action="store_true", help="one untimed run of every sampler and step count "
                        "per image before its timed runs (a CUDA graph's capture and first calls stay out of the time)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per sampler, step count and image (median)")
    parser.add_argument("--no-quality", action="store_true",
                        help="timings only (the default for presets with random weights: no picture to converge to)")
    parser.add_argument("--out", nargs="+", default=[str(RESULTS)])
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    quality = not args.no_quality and args.preset.endswith("trained")
    pipe = ControlNetPipeline(load_preset(args.preset, seed=0), BackendConfig(
        device=args.device, precision=args.precision, cuda_graph=args.cuda_graph))
    result = measure(pipe, args.samplers, args.steps, args.images, args.resolution, quality, args.reference_steps,
                     warmup=args.warmup, repeats=args.repeats)
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "preset": args.preset, "device": args.device,
              "precision": args.precision, "cuda_graph": args.cuda_graph, "resolution": args.resolution,
              "images": args.images, "inputs": [name for name, _, _ in inputs(args.images)], "quality": quality,
              "warmup": args.warmup, "repeats": args.repeats,
              "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None},
              **result}
    stem = f"samplers-{args.preset}-{args.device.split(':')[0]}"
    for folder in args.out:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{stem}.json").write_text(json.dumps(report, indent=1))
        (Path(folder) / f"{stem}.md").write_text(markdown(report))
        if quality:
            plot(report, Path(folder) / f"{stem}.png")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
