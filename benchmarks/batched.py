"""Batched generation: images/s, ms/image and peak memory at batch size B for one case, in its own process.

    python -m benchmarks.batched --backend torch --batch-size 4 --preset tiny --out b4.json

B different photos (own prompt, own seed) at 256x384 go through `run_batch` in one call per repeat;
each photo's batched image is compared with its single-call image (max |difference| in uint8 levels).
`python -m benchmarks --batch-sizes 1 2 4` runs this for every case and adds a table to the report.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from benchmarks.case import sampler_words
from sdcn_trt.scoring.latency import measure


def photos(count: int) -> list[np.ndarray]:
    """`count` different photos that all resize to 256x384: scikit-image's, shifted sideways on repeats."""
    from sdcn_trt.images import sample_photos

    base = [cv2.resize(p, (576, 384), interpolation=cv2.INTER_AREA) for p in sample_photos().values()]
    return [np.roll(base[i % len(base)], 37 * (i // len(base)), axis=1) for i in range(count)]


def run_batched(args: argparse.Namespace) -> dict[str, Any]:
    from sdcn_trt import BackendConfig, ControlNetPipeline, GenerationConfig
    from sdcn_trt.models.presets import load_preset
    from sdcn_trt.pipeline.batched import BatchItem

    batch = args.batch_size
    backend = BackendConfig(backend=args.backend, device=args.device, precision=args.precision,
                            cuda_graph=args.cuda_graph, max_batch=batch, compiled_networks=args.compiled_networks)
    pipe = ControlNetPipeline(load_preset(args.preset, seed=0), backend)
    config = GenerationConfig(ddim_steps=args.steps, sampler=args.sampler)
    items = [BatchItem(p, prompt=f"a photo, number {i}", seed=1000 + i) for i, p in enumerate(photos(batch))]
    run = lambda: pipe.run_batch(items, config, batch_size=batch)  # noqa: E731
    stats = measure(run, args.repeats, warmup=1)  # the warm-up builds (and captures) the loop for this B
    outputs = run()
    worst = 0
    for item, out in zip(items, outputs, strict=True):  # each photo's single call, its own seed and prompt
        single = pipe.run(item.image, config.replace(prompt=item.prompt, seed=item.seed)).images[0]
        worst = max(worst, int(np.abs(single.astype(np.int16) - out.images[0].astype(np.int16)).max()))
    seconds = stats["p50"] / 1000.0
    result = {"backend": args.backend, "precision": args.precision, "cuda_graph": args.cuda_graph,
              "batch_size": batch, "steps": args.steps, "sampler": args.sampler, "preset": args.preset,
              "median_s": seconds,
              "min_s": stats["min"] / 1000.0, "repeats": int(stats["n"]), "images_per_s": batch / seconds,
              "ms_per_image": 1000.0 * seconds / batch, "max_diff_vs_single": worst,
              "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              "compiled_networks": args.compiled_networks}
    if args.device.startswith("cuda"):
        result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def run_batched_case(case: dict[str, Any], batch_size: int, args: argparse.Namespace, timeout: int) -> dict[str, Any]:
    """One (case, B) in its own process (its own peak memory): the result, or the error."""
    with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
        cmd = [sys.executable, "-m", "benchmarks.batched", "--backend", case["backend"], "--precision",
               case["precision"], "--device", args.device, "--cuda-graph", case["cuda_graph"], "--preset", args.preset,
               "--steps", str(args.steps), "--sampler", args.sampler, "--repeats", str(args.repeats),
               "--batch-size", str(batch_size),
               "--out", tmp.name]
        if case.get("compiled_networks"):
            cmd += ["--compiled-networks", *case["compiled_networks"]]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return {**case, "batch_size": batch_size, "error": f"timed out after {timeout} s"}
        if proc.returncode != 0:
            tail = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit {proc.returncode}"
            return {**case, "batch_size": batch_size, "error": tail}
        return json.loads(Path(tmp.name).read_text())


def batched_markdown(report: dict[str, Any]) -> str:
    """The report's batched rows as a Markdown table (empty when there are none): per case and B,
    images/s, ms/image, the speed-up per image over B = 1 of the same case, peak memory, parity."""
    rows = report.get("batched", [])
    if not rows:
        return ""
    lines = ["", f"## Batched generation ({report['steps']} {sampler_words(report)} steps, B different photos per "
             "call, median of "
             f"{report['repeats']} after 1 warm-up)", "",
             "| backend | precision | CUDA graph | B | images/s | ms/image | per image vs B=1 | peak memory GiB | "
             "max diff vs single call (uint8) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        built = f" (builds {', '.join(r['compiled_networks'])})" if r.get("compiled_networks") else ""
        head = f"| {r['backend']}{built} | {r['precision']} | {r['cuda_graph']} | {r['batch_size']} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error'][:80]} |" + " |" * 4)
            continue
        one = next((o for o in rows if "error" not in o and o["batch_size"] == 1 and
                    all(o.get(k) == r.get(k) for k in ("backend", "precision", "cuda_graph", "compiled_networks"))),
                   None)
        speedup = f"{one['ms_per_image'] / r['ms_per_image']:.2f}x" if one else "-"
        memory = r.get("peak_gpu_memory_gib", r["peak_rss_gib"])
        lines.append(f"{head} {r['images_per_s']:.2f} | {r['ms_per_image']:.1f} | {speedup} | {memory:.2f} | "
                     f"{r['max_diff_vs_single']} |")
    lines += ["", "Peak memory: GPU memory allocated by torch on a GPU, the process's peak RSS on the CPU (model "
              "included). 'per image vs B=1': ms/image at B = 1 over ms/image at B, same case, this run."]
    return "\n".join(lines) + "\n"


def main() -> None:
    from benchmarks.case import case_parser

    parser = case_parser()
    parser.add_argument("--batch-size", type=int, required=True)
    args = parser.parse_args()
    Path(args.out).write_text(json.dumps(run_batched(args), indent=1))


if __name__ == "__main__":
    main()
