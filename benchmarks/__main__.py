"""Run the benchmark suite: each case in its own process, results as JSON + Markdown.

    python -m benchmarks                          # CPU: torch fp32, onnxruntime, diffusers; 2 steps
    python -m benchmarks --device cuda --steps 20 # GPU: adds fp16, CUDA graphs, TensorRT if present
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sdcn_trt.scoring.latency import measure

CPU_CASES = [("torch", "fp32", "off"), ("onnxruntime", "fp32", "off"), ("diffusers", "fp32", "off")]
GPU_CASES = [("torch", "fp32", "off"), ("torch", "fp16", "off"), ("torch", "fp16", "loop"),
             ("onnxruntime", "fp16", "off"), ("tensorrt", "fp16", "loop"), ("diffusers", "fp16", "off")]


def gemm_peak_tflops(device: str) -> float:
    """Measured matrix-multiply peak: fp32 2048^3 on the CPU, fp16 8192^3 on a GPU (best of 5)."""
    n, dtype = (2048, torch.float32) if device == "cpu" else (8192, torch.float16)
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    best_ms = measure(lambda: a @ b, repeats=5, warmup=2)["min"]
    return 2 * n**3 / (best_ms / 1000.0) / 1e12


def machine(device: str) -> dict[str, str]:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_threads": str(torch.get_num_threads())}
    if device != "cpu":
        info["gpu"] = torch.cuda.get_device_name()
    for package in ("onnxruntime", "diffusers", "transformers", "tensorrt"):
        try:
            info[package] = __import__(package).__version__
        except (ImportError, AttributeError):
            info[package] = "absent"
    return info


def markdown(report: dict) -> str:
    cases = report["cases"]
    ref = next((c for c in cases if c.get("backend") == "torch" and c.get("precision") == "fp32" and "error" not in c), None)
    base = next((c for c in cases if c.get("backend") == "diffusers" and "error" not in c), None)
    lines = [f"# Benchmark {report['date']} ({report['device']})", "",
             f"Workload: preset {report['preset']} ({'SD1.5-sized, ' if report['preset'] == 'sd15-random' else ''}"
             f"seeded random weights), 256x384, CFG batch 2, "
             f"**{report['steps']} DDIM steps** end to end, median of {report['repeats']} after 1 warm-up. "
             f"Measured GEMM peak: {report['gemm_peak_tflops']:.3f} TFLOP/s.", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in report["machine"].items()), "",
             "| backend | precision | CUDA graph | CLIP ms | fused step ms | VAE decode ms | end to end s | vs torch fp32 | "
             "vs diffusers | step TFLOP/s (% of GEMM peak) | outside steps | peak memory GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        if "error" in c:
            lines.append(f"| {c['backend']} | {c['precision']} | {c['cuda_graph']} | failed: {c['error'][:80]} |" + " |" * 8)
            continue
        e2e = c["end_to_end"]["median_s"]
        ms = lambda k: f"{1000 * c[k]['median_s']:.1f}" if k in c else "-"  # noqa: E731
        ratio = lambda other: f"{other['end_to_end']['median_s'] / e2e:.2f}x" if other else "-"  # noqa: E731
        achieved = c.get("fused_step_tflops_achieved")
        step = f"{achieved:.3f} ({100 * achieved / report['gemm_peak_tflops']:.0f}%)" if achieved else "-"
        outside = f"{100 * c['outside_steps_fraction']:.1f}%" if "outside_steps_fraction" in c else "-"
        memory = c.get("peak_gpu_memory_gib", c.get("peak_rss_gib"))
        lines.append(f"| {c['backend']} | {c['precision']} | {c['cuda_graph']} | {ms('text_encoder')} | {ms('fused_step')} | "
                     f"{ms('vae_decoder')} | {e2e:.2f} | {ratio(ref)} | {ratio(base)} | {step} | {outside} | "
                     f"{memory:.1f} |")
    lines += ["", "'outside steps': end-to-end time not spent in the fused ControlNet+UNet evaluations "
              "(text, canny, hint, DDIM arithmetic, VAE, Python). Speed-ups are ratios of medians from this run."]
    projected = [c for c in cases if "error" not in c and "fused_step" in c]
    if projected and report["steps"] != 20:
        lines += ["", f"Projected to the contest's 20 steps (end to end - {report['steps']} x step + 20 x step):"]
        for c in projected:
            step, e2e = c["fused_step"]["median_s"], c["end_to_end"]["median_s"]
            e2e20 = e2e + (20 - report["steps"]) * step
            outside = e2e - report["steps"] * step
            lines.append(f"- {c['backend']} {c['precision']}: {e2e20:.1f} s per image, {100 * outside / e2e20:.1f}% outside the steps")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="sd15-random")
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps end to end (CPU: a few; contest: 20)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cases", nargs="+", help="backend:precision:graph, e.g. torch:fp32:off onnxruntime:fp32:off")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per case")
    args = parser.parse_args()
    cases = ([tuple(c.split(":")) for c in args.cases] if args.cases
             else CPU_CASES if args.device == "cpu" else GPU_CASES)
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": args.device, "preset": args.preset,
              "steps": args.steps, "repeats": args.repeats, "machine": machine(args.device),
              "gemm_peak_tflops": gemm_peak_tflops(args.device), "cases": []}
    for backend, precision, graph in cases:
        print(f"case {backend} {precision} graph={graph} ...", flush=True)
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            cmd = [sys.executable, "-m", "benchmarks.case", "--backend", backend, "--precision", precision, "--device",
                   args.device, "--cuda-graph", graph, "--preset", args.preset, "--steps", str(args.steps),
                   "--repeats", str(args.repeats), "--out", tmp.name]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                if proc.returncode == 0:
                    report["cases"].append(json.loads(Path(tmp.name).read_text()))
                else:
                    tail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
                    report["cases"].append({"backend": backend, "precision": precision, "cuda_graph": graph, "error": tail})
            except subprocess.TimeoutExpired:
                report["cases"].append({"backend": backend, "precision": precision, "cuda_graph": graph,
                                        "error": f"timed out after {args.timeout} s"})
        print(json.dumps(report["cases"][-1])[:400], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{args.device.split(':')[0]}-{time.strftime('%Y%m%d-%H%M')}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (out / f"{stem}.md").write_text(table)
    (out / f"LATEST-{args.device.split(':')[0]}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
