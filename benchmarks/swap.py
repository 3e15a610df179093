"""New weights on onnxruntime: re-export + session (what a LoRA or another ControlNet cost before)
against a session on the cached export with swapped initializers.

    python -m benchmarks.swap                     # sd15-random fused step, fp32, CPU: heavy (~10 GB disk, minutes)
    python -m benchmarks.swap --preset tiny       # the same on the tiny preset, in a minute

Every phase runs in its own process (an SD1.5-sized export needs most of the memory), times
`OnnxRuntimeRunner.activate()` as the pipeline calls it, checks one small inference against torch,
and the swap against the fresh export bit for bit. Results: benchmarks/results/swap-<preset>.json/.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
NETWORK = "fused_step"
PHASES = {  # phase -> (weights, cache it activates on, what it measures)
    "base": ("base", "cache-base", "export of the preset's own weights (no check): the cache a user has"),
    "cached": ("base", "cache-base", "the same weights again: session on the cached export"),
    "reexport": ("lora", "cache-new", "LoRA merged, nothing cached for them: export + torch check + session"),
    "swap-lora": ("lora", "cache-base", "LoRA merged: cached export + swapped initializers + session"),
    "swap-controlnet": ("controlnet", "cache-base", "another ControlNet (seed 1): cached export + swap + session"),
}
LORA_RANK = 8
LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
                "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")  # kohya's usual UNet targets


def make_lora(unet, path: Path) -> int:
    """A seeded rank-8 kohya LoRA on the UNet's attention, feed-forward and projection layers."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, module in unet.named_modules():
        if not name.endswith(LORA_TARGETS) or not hasattr(module, "weight"):
            continue
        out_ch, in_ch, *kernel = module.weight.shape
        base = "lora_unet_" + name.replace(".", "_")
        state[base + ".lora_down.weight"] = torch.randn((LORA_RANK, in_ch, *kernel), generator=gen) * 0.02
        state[base + ".lora_up.weight"] = torch.randn((out_ch, LORA_RANK, *([1] * len(kernel))), generator=gen) * 0.02
        state[base + ".alpha"] = torch.tensor(float(LORA_RANK))
    if not path.exists():
        save_file(state, str(path))
    return len(state) // 3


def run_phase(phase: str, preset: str, work: Path) -> dict:
    """One phase in this process: load the weights, time the runner's activation, run once at 64x64."""
    import numpy as np
    import torch

    from sdcn_trt.engines import BackendConfig
    from sdcn_trt.engines.onnxruntime import OnnxRuntimeRunner
    from sdcn_trt.export.descriptors import ShapeSpec, get_descriptor
    from sdcn_trt.export.onnx_export import ExportSettings, export_onnx
    from sdcn_trt.models.lora import apply_loras
    from sdcn_trt.models.presets import PRESETS, load_preset

    weights, cache, _ = PHASES[phase]
    components = load_preset(preset, seed=0)
    info: dict = {}
    if weights == "lora":
        info["lora_modules"] = make_lora(components.unet, work / "lora.safetensors")
        apply_loras(components, [(work / "lora.safetensors", 1.0)])
    elif weights == "controlnet":  # the preset's ControlNet architecture with other weights (zero convs drawn too)
        from diffusers import ControlNetModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            other = ControlNetModel(**PRESETS[preset]()["controlnet"])
            for conv in [*other.controlnet_down_blocks, other.controlnet_mid_block,
                         other.controlnet_cond_embedding.conv_out]:
                conv.reset_parameters()
        components.controlnet = other.eval().requires_grad_(False)
    descriptor = get_descriptor(NETWORK, components)
    clock = time.perf_counter()
    if phase == "base":
        result = export_onnx(descriptor, work / cache, ExportSettings(), check=False)
        info.update(seconds=time.perf_counter() - clock, export_seconds=result.seconds)
        return info
    runner = OnnxRuntimeRunner(descriptor, BackendConfig("onnxruntime", cache_dir=str(work / cache)))
    runner.activate()
    info["seconds"] = time.perf_counter() - clock
    assert runner.export is not None
    info.update(export_seconds=runner.export.seconds, swapped_initializers=len(runner.swapped),
                cached=runner.export.cached)
    feed = descriptor.sample_inputs(ShapeSpec(1, 64, 64))
    out = runner.infer(feed)["noise_pred"].numpy()
    np.save(work / f"{phase}.npy", out)
    with torch.inference_mode():
        expected = descriptor.build_module()(*feed.values()).numpy()
    info["max_abs_vs_torch"] = float(np.abs(out - expected).max())
    info["onnx_bytes"] = sum(f.stat().st_size for f in runner.export.path.parent.iterdir())
    return info


def markdown(report: dict) -> str:
    phases = report["phases"]
    lines = [f"# Weights swap vs re-export ({report['date']}, {report['device']})", "",
             f"Network: {NETWORK} (ControlNet + UNet) of preset **{report['preset']}** (seeded random weights), fp32, "
             f"onnxruntime CPU; ONNX {phases['base'].get('onnx_gb', 0):.2f} GB. Each phase in its own process; "
             "times are `OnnxRuntimeRunner.activate()` (what the pipeline pays when weights change), one run each.", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in report["machine"].items())
             + (f"; load average at the end {report['load_average_at_end'][0]:.1f} (a shared machine: seconds are "
                "noisy, the ratio is the point)" if "load_average_at_end" in report else ""), "",
             "| phase | what | activate s | of which export s | initializers swapped | max abs vs torch | peak RSS GiB |",
             "|---|---|---|---|---|---|---|"]
    for name, p in phases.items():
        if "error" in p:
            lines.append(f"| {name} | {PHASES[name][2]} | failed: {p['error'][:80]} | | | | |")
            continue
        lines.append(f"| {name} | {PHASES[name][2]} | {p['seconds']:.1f} | {p.get('export_seconds', 0):.1f} | "
                     f"{p.get('swapped_initializers', '')} | {format(p['max_abs_vs_torch'], '.2e') if 'max_abs_vs_torch' in p else ''} | "
                     f"{p['peak_rss_gib']:.1f} |")
    saved = report.get("speedup")
    if saved:
        lines += ["", f"**LoRA: {saved['reexport_s']:.1f} s re-export + session -> {saved['swap_s']:.1f} s swap "
                      f"({saved['times']:.1f}x faster, {saved['reexport_s'] - saved['swap_s']:.1f} s saved per weight "
                      f"change).** Swap output vs fresh export output: max abs difference "
                      f"{report.get('swap_vs_fresh_max_abs', float('nan')):.1e}."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sd15-random")
    parser.add_argument("--work", help="scratch folder (default: a temporary one, deleted at the end)")
    parser.add_argument("--phase", choices=list(PHASES), help=argparse.SUPPRESS)  # internal: one phase
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if args.phase:
        start = time.perf_counter()
        info = run_phase(args.phase, args.preset, Path(args.work))
        info["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        info["process_seconds"] = time.perf_counter() - start
        (Path(args.work) / f"{args.phase}.json").write_text(json.dumps(info))
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="sdcn-swap-"))
    work.mkdir(parents=True, exist_ok=True)
    import numpy as np
    import torch

    phases: dict[str, dict] = {}
    try:
        for phase in PHASES:
            print(f"[swap benchmark] {phase}: {PHASES[phase][2]}", flush=True)
            proc = subprocess.run([sys.executable, "-m", "benchmarks.swap", "--phase", phase, "--preset", args.preset,
                                   "--work", str(work)], capture_output=True, text=True)
            if proc.returncode != 0:
                phases[phase] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
                print(proc.stderr[-3000:], file=sys.stderr)
                continue
            phases[phase] = json.loads((work / f"{phase}.json").read_text())
            print(f"  {phases[phase]}", flush=True)
        base_files = list((work / "cache-base" / "onnx").glob(f"{NETWORK}-*"))
        if base_files:
            phases["base"]["onnx_gb"] = sum(f.stat().st_size for f in base_files[0].iterdir()) / 1e9
        report = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": "cpu", "preset": args.preset, "phases": phases,
                  "load_average_at_end": list(os.getloadavg()),
                  "machine": {"platform": platform.platform(), "python": platform.python_version(),
                              "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
                              "cpu_threads": str(torch.get_num_threads())}}
        if all("error" not in phases.get(p, {"error": 1}) for p in ("reexport", "swap-lora")):
            report["speedup"] = {"reexport_s": phases["reexport"]["seconds"], "swap_s": phases["swap-lora"]["seconds"],
                                 "times": phases["reexport"]["seconds"] / phases["swap-lora"]["seconds"]}
            fresh, swapped = np.load(work / "reexport.npy"), np.load(work / "swap-lora.npy")
            report["swap_vs_fresh_max_abs"] = float(np.abs(fresh - swapped).max())
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"swap-{args.preset}.json").write_text(json.dumps(report, indent=1))
    (out / f"swap-{args.preset}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
