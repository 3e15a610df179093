"""Run the benchmark suite: each case in its own process, results as JSON + Markdown.

    python -m benchmarks                          # CPU: torch fp32, onnxruntime, diffusers; 2 steps
    python -m benchmarks --device cuda --steps 20 # GPU: torch fp32/fp16, CUDA graphs, inductor, diffusers fp16
    python -m benchmarks --batch-sizes 1 2 4      # also B photos per call: images/s, ms/image, memory per B
    python -m benchmarks --device cuda --cases diffusers:fp16:off:reduce-overhead  # diffusers under torch.compile
    python -m benchmarks --device cuda --cases inductor:fp16:loop:compiled_networks=fused_step  # compile the step only
    python -m benchmarks --device cuda --cases torch:fp16:loop:compile=default:compiled_networks=fused_step  # torch.compile
    python -m benchmarks --device cuda --steps 10 --sampler unipc  # another sampler (every case, diffusers' included)

Every case's image is compared with the torch fp32 case's (the contest's reference) on the same
weights: mean and max |difference| in uint8 levels, and the NaN/Inf values each network produced.
The report is rewritten after every case, so a run stopped by a time limit keeps what finished.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.batched import batched_markdown, run_batched_case
from benchmarks.case import sampler_words
from sdcn_trt.engines.inductor.child import python_command, run_child
from sdcn_trt.errors import InputError
from sdcn_trt.samplers import SAMPLER_NAMES
from sdcn_trt.scoring.latency import measure

# A case is backend:precision:graph[:option...]; an option is compile=MODE (torch.compile's mode for the
# diffusers baseline or the torch backend, benchmarks.baseline_diffusers.COMPILE_MODES; also a bare fourth
# field) or compiled_networks=NAME[,NAME...] (tensorrt/inductor build only those networks, torch with
# compile= compiles only those; the others run on eager torch).
CPU_CASES = ["torch:fp32:off", "onnxruntime:fp32:off", "diffusers:fp32:off"]
# In order of value, for runs cut short by a time limit: the reference first, then the fastest candidates.
# onnxruntime:fp16:off and tensorrt:fp16:loop run when asked for with --cases (and installed). The torch.compile
# and inductor cases compile only the fused ControlNet+UNet step (20 per image; CLIP and the VAE run once, on
# eager torch fp16): each SD1.5-sized compile takes minutes on a GPU. torch.compile (JIT inductor, nothing
# loaded from a package) is the route around AOTInductor's package-load crash of the first GPU run.
GPU_CASES = ["torch:fp32:off", "torch:fp16:loop", "diffusers:fp16:off",
             "torch:fp16:loop:compile=default:compiled_networks=fused_step",
             "inductor:fp16:loop:compiled_networks=fused_step", "diffusers:fp16:off:max-autotune-no-cudagraphs",
             "diffusers:fp16:off:reduce-overhead",
             "torch:fp16:off"]
CASE_OPTIONS = ("compile", "compiled_networks", "compile_scope")


def parse_case(text: str) -> dict[str, Any]:
    """'backend:precision:graph[:option...]' -> the case's settings (InputError saying what is wrong):
    backend, precision, cuda_graph, compile ("off" unless given) and compiled_networks (only when given)."""
    fields = text.split(":")
    if len(fields) < 3:
        raise InputError(f"case {text!r}: expected backend:precision:graph[:option...], e.g. torch:fp16:loop or "
                         "inductor:fp16:loop:compiled_networks=fused_step")
    case: dict[str, Any] = {"backend": fields[0], "precision": fields[1], "cuda_graph": fields[2], "compile": "off"}
    for k, option in enumerate(fields[3:]):
        name, equals, value = option.partition("=")
        if not equals and k == 0:  # the bare fourth field: the diffusers baseline's compile mode
            name, value = "compile", option
        if name not in CASE_OPTIONS or not value:
            raise InputError(f"case {text!r}: bad option {option!r}; options: compile=MODE, "
                             "compiled_networks=NAME[,NAME...], compile_scope=whole|blocks")
        case[name] = value.split(",") if name == "compiled_networks" else value
    return case


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
    for package in ("onnxruntime", "diffusers", "transformers", "tensorrt", "triton"):
        try:
            info[package] = __import__(package).__version__
        except (ImportError, AttributeError):
            info[package] = "absent"
    return info


def markdown(report: dict) -> str:
    cases = report["cases"]
    ref = next((c for c in cases if c.get("backend") == "torch" and c.get("precision") == "fp32" and "error" not in c), None)
    base = next((c for c in cases if c.get("backend") == "diffusers" and c.get("compile", "off") == "off"
                 and "error" not in c), None)
    lines = [f"# Benchmark {report['date']} ({report['device']})", "",
             f"Workload: preset {report['preset']} ({'SD1.5-sized, ' if report['preset'] == 'sd15-random' else ''}"
             f"seeded random weights), 256x384, CFG batch 2, "
             f"**{report['steps']} {sampler_words(report)} steps** end to end, median of {report['repeats']} after 1 "
             "warm-up. "
             f"Measured GEMM peak: {report['gemm_peak_tflops']:.3f} TFLOP/s.", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in report["machine"].items()), "",
             "| backend | precision | CUDA graph | ms/image | vs torch fp32 | vs diffusers | CLIP ms | fused step ms | "
             "VAE decode ms | step TFLOP/s (% of GEMM peak) | outside steps | peak memory GiB | "
             "vs torch fp32: mean / max abs diff (uint8) | NaN/Inf | build s / package MiB (networks built) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        if "error" in c:
            error = c["error"].splitlines()[0][:240].replace("|", "/")  # the whole stack is in the JSON and the log
            lines.append(f"| {label(c)} | {c['precision']} | {c['cuda_graph']} | failed: {error} |" + " |" * 11)
            continue
        e2e = c["end_to_end"]["median_s"]
        ms = lambda k: f"{1000 * c[k]['median_s']:.1f}" if k in c else "-"  # noqa: E731
        ratio = lambda other: f"{other['end_to_end']['median_s'] / e2e:.2f}x" if other else "-"  # noqa: E731
        achieved = c.get("fused_step_tflops_achieved")
        step = f"{achieved:.3f} ({100 * achieved / report['gemm_peak_tflops']:.0f}%)" if achieved else "-"
        outside = f"{100 * c['outside_steps_fraction']:.1f}%" if "outside_steps_fraction" in c else "-"
        memory = c.get("peak_gpu_memory_gib", c.get("peak_rss_gib"))
        parity = c.get("parity")
        parity_text = (f"{parity['mean']:.2f} / {parity['max']}" if parity else "-")
        bad = c.get("nonfinite")
        bad_text = "-" if bad is None else str(sum(bad.values())) + (
            " (" + ", ".join(f"{n} {v}" for n, v in bad.items() if v) + ")" if any(bad.values()) else "")
        packages = c.get("packages")
        build = (f"{sum(p['build_s'] for p in packages.values()):.0f} / {sum(p['size_mib'] for p in packages.values()):.0f}"
                 f" ({', '.join(packages)})" if packages  # the networks built: the others ran on torch
                 else f"{c['compile_s']:.0f} / -" if c.get("compile", "off") != "off" else "-")
        lines.append(f"| {label(c)} | {c['precision']} | {c['cuda_graph']} | {1000 * e2e:.0f} | {ratio(ref)} | "
                     f"{ratio(base)} | {ms('text_encoder')} | {ms('fused_step')} | {ms('vae_decoder')} | {step} | "
                     f"{outside} | {memory:.1f} | {parity_text} | {bad_text} | {build} |")
    lines += ["", "'outside steps': end-to-end time not spent in the fused ControlNet+UNet evaluations "
              f"(text, canny, hint, {sampler_words(report)} arithmetic, VAE, Python). Speed-ups are ratios of medians "
              "from this run. "
              "Parity: the case's image against the torch fp32 case's, same weights, inputs and seed. "
              "NaN/Inf: values the networks output over one image (an fp16 overflow shows here). "
              "Build: AOTInductor compile time and package size of the networks the case built (named; with "
              "'builds ...' in the backend column the other networks ran on torch, same device and precision); "
              "under torch.compile (mode in brackets; diffusers: UNet and ControlNet; torch: the networks named, "
              "else all), the first calls' time beyond a timed call."]
    overflowed = [f"{c['backend']} {c['precision']}" for c in cases if "error" not in c and any(c.get("nonfinite", {}).values())]
    if overflowed:
        lines += ["", f"**fp16 overflow**: {', '.join(overflowed)} produced NaN/Inf on these weights "
                  f"(preset {report['preset']}): their images and parity are not meaningful here; "
                  "see the tiny preset's parity for fp16."]
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
    parser.add_argument("--steps", type=int, default=2, help="sampler steps end to end (CPU: a few; contest: 20)")
    parser.add_argument("--sampler", default="ddim", choices=SAMPLER_NAMES,
                        help="the sampler every case runs (the diffusers baseline: its scheduler); default: ddim, "
                             "the contest's")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cases", nargs="+", help="backend:precision:graph[:option...]; options: compile=MODE "
                        "(diffusers or torch; also a bare fourth field), compiled_networks=NAME[,NAME...] "
                        "(tensorrt/inductor build, torch with compile= compiles only these), "
                        "e.g. torch:fp32:off diffusers:fp16:off:reduce-overhead "
                        "torch:fp16:loop:compile=default:compiled_networks=fused_step "
                        "inductor:fp16:loop:compiled_networks=fused_step")
    parser.add_argument("--out", nargs="+", default=[str(Path(__file__).parent / "results")],
                        help="folders the report is written to (after every case)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per case")
    parser.add_argument("--deadline", type=float, default=0.0,
                        help="seconds for the whole run (0: none); a case gets what is left, none starts with < 30 s")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[],
                        help="after the cases, each case (but diffusers) with B photos per call for every B given")
    args = parser.parse_args()
    started = time.monotonic()
    try:
        cases = [parse_case(c) for c in args.cases or (CPU_CASES if args.device == "cpu" else GPU_CASES)]
    except InputError as exc:
        parser.error(str(exc))
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": args.device, "preset": args.preset,
              "steps": args.steps, "sampler": args.sampler, "repeats": args.repeats, "machine": machine(args.device),
              "gemm_peak_tflops": gemm_peak_tflops(args.device), "cases": []}
    stem = f"bench-{report_name(args)}-{time.strftime('%Y%m%d-%H%M')}"
    images = Path(tempfile.mkdtemp(prefix="sdcn_bench_images."))
    reference: np.ndarray | None = None
    for case in cases:
        backend, precision, graph = case["backend"], case["precision"], case["cuda_graph"]
        timeout = args.timeout
        if args.deadline:
            timeout = min(timeout, int(args.deadline - (time.monotonic() - started)))
        if timeout < 30:
            result: dict = {**case, "error": f"skipped: the run's {args.deadline:.0f} s were spent"}
        else:
            print(f"case {label(case)} {precision} graph={graph} (limit {timeout} s) ...", flush=True)
            result = run_one(case, args, timeout, images / f"{len(report['cases'])}.npy")
        image = result.pop("image", None)
        if image is not None and backend == "torch" and precision == "fp32" and reference is None:
            reference = image
        if image is not None and reference is not None:
            diff = np.abs(image.astype(np.int16) - reference.astype(np.int16))
            result["parity"] = {"mean": float(diff.mean()), "max": int(diff.max()), "against": "torch fp32"}
        report["cases"].append(result)
        print(json.dumps(result)[:400], flush=True)
        write_report(report, args, stem)
    for full, batch in ((c, b) for c in cases if c["backend"] != "diffusers" for b in args.batch_sizes):
        timeout = min(args.timeout, int(args.deadline - (time.monotonic() - started))) if args.deadline else args.timeout
        # batched cases run uncompiled: the torch.compile cases' networks then run eagerly, all of them
        case = {k: v for k, v in full.items() if k != "compile" and not (k == "compiled_networks"
                                                                          and full.get("compile", "off") != "off")}
        print(f"batched {label(case)} {case['precision']} graph={case['cuda_graph']} B={batch} (limit {timeout} s) ...",
              flush=True)
        result = (run_batched_case(case, batch, args, timeout) if timeout >= 30 else
                  {**case, "batch_size": batch, "error": f"skipped: the run's {args.deadline:.0f} s were spent"})
        report.setdefault("batched", []).append(result)
        print(json.dumps(result)[:400], flush=True)
        write_report(report, args, stem)
    shutil.rmtree(images, ignore_errors=True)
    print(write_report(report, args, stem))
    return 0


def label(case: dict) -> str:
    """The backend column: the backend, with the diffusers baseline's torch.compile mode when it has one,
    or the networks a built backend was told to build (the others ran on torch); then the sampler when it
    is not ddim."""
    compiled, built = case.get("compile", "off"), case.get("compiled_networks")
    sampler = f" [{case['sampler']}]" if case.get("sampler", "ddim") != "ddim" else ""
    if compiled != "off":  # diffusers (UNet and ControlNet) or torch (its compiled_networks, else every network)
        scope = ", blocks" if case.get("compile_scope", "whole") == "blocks" else ""
        return (f"{case['backend']} (torch.compile {compiled}{scope}" + (f": {', '.join(built)})" if built else ")")
                + sampler)
    return (f"{case['backend']} (builds {', '.join(built)})" if built else case["backend"]) + sampler


def report_name(args: argparse.Namespace) -> str:
    """cpu / cuda, with the preset when it is not the default sd15-random and the sampler when it is not ddim."""
    name = args.device.split(":")[0]
    if args.preset != "sd15-random":
        name += f"-{args.preset}"
    return name if args.sampler == "ddim" else f"{name}-{args.sampler}"


def case_command(case: dict[str, Any], args: argparse.Namespace, out: str, image_path: Path) -> list[str]:
    """The command running one case: `python -X faulthandler -m benchmarks.case ...` (a crash prints
    the Python stack of every thread before the process dies)."""
    built = case.get("compiled_networks")
    return python_command("benchmarks.case", "--backend", case["backend"], "--precision", case["precision"],
                          "--device", args.device, "--cuda-graph", case["cuda_graph"], "--preset", args.preset,
                          "--steps", str(args.steps), "--sampler", args.sampler, "--repeats", str(args.repeats),
                          "--out", out,
                          "--image-out", str(image_path), "--compile", case.get("compile", "off"),
                          *(["--compiled-networks", *built] if built else []),
                          *(["--compile-scope", case["compile_scope"]] if "compile_scope" in case else []))


def run_one(case: dict[str, Any], args: argparse.Namespace, timeout: int, image_path: Path) -> dict:
    """One case in its own process (and process group: a timeout also ends the compile workers
    inductor starts): its result (with its image, when it made one), or the error in words — the
    signal that killed it and where ('killed by SIGSEGV (segmentation fault) at ...'), or its Python
    error — with the faulthandler stack or stderr's end in "crash" and on this process's stderr."""
    with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
        outcome = run_child(case_command(case, args, tmp.name, image_path), timeout)
        if not outcome.ok:
            how = outcome.how()
            label = f"{case['backend']} {case['precision']} graph={case['cuda_graph']}"
            sys.stderr.write(f"case {label} failed: {how}\n{outcome.details()}\n")
            return {**case, "error": how, "crash": {"how": how, "details": outcome.details()}}
        result = json.loads(Path(tmp.name).read_text())
    if image_path.exists():
        result["image"] = np.load(image_path)
    return result


def write_report(report: dict, args: argparse.Namespace, stem: str) -> str:
    """JSON + Markdown into every --out folder; returns the Markdown."""
    table = markdown(report) + batched_markdown(report)
    for folder in args.out:
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
        (out / f"{stem}.md").write_text(table)
        (out / f"LATEST-{report_name(args)}.md").write_text(table)
    return table


if __name__ == "__main__":
    sys.exit(main())
