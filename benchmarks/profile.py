"""Where a denoising step's time goes: the kernel table of one full step (fused ControlNet+UNet, guidance,
DDIM update) per backend, from torch.profiler.

    python -m benchmarks.profile --device cuda                  # torch fp16 and inductor fp16, sd15-random
    python -m benchmarks.profile --device cpu --preset tiny     # the same table from a CPU trace

On CUDA the step is captured in a CUDA graph (as it runs inside the whole-loop graph: the same kernels)
and its replays are traced with CUPTI; if the trace shows no kernels inside the replays, the step runs
over the same static buffers without the graph and the table says so. On the CPU the step runs
eagerly and each innermost aten operator counts as a kernel. Per backend: kernels per step, time by
kind (convolution, GEMM, attention, normalisation, elementwise, copies/layout), the top 15 kernels,
and the bytes the step's operators read and write against the measured device-to-device copy rate.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from sdcn_trt.scoring.latency import measure

# (kind, pattern) in the order they are tried: a kernel takes the first kind whose pattern its
# lower-cased name matches. Inductor's Triton kernels are named after the ops they fuse
# (triton_poi_fused_add_convolution_0: a bias add, not a convolution), so they are sorted apart.
KINDS = ("convolution", "GEMM", "attention", "normalisation", "elementwise", "copies/layout", "other")
PATTERNS = (
    ("attention", r"flash|fmha|attention|sdpa|softmax|attn"),
    ("normalisation", r"norm|welford"),
    ("copies/layout", r"copy|memcpy|memset|transpose|permute|nchwtonhwc|nhwctonchw|layout|contiguous|"
                      r"aten::cat$|catarraybatched|cat_|clone|to_copy|constant_pad|reflection_pad"),
    ("convolution", r"conv|fprop|dgrad|wgrad|implicit_gemm|winograd|cudnn"),
    ("GEMM", r"gemm|matmul|aten::mm$|aten::addmm$|aten::bmm$|aten::baddbmm$|aten::linear$|cublas|cutlass|nvjet|"
             r"xmma|triton_tem"),
    ("elementwise", r"elementwise|vectorized|unrolled|triton_|aten::|reduce|fill"),
)
# aten operators that move no data or only dispatch to others: never a kernel in a CPU trace
CPU_WRAPPERS = {"empty", "empty_strided", "empty_like", "view", "as_strided", "as_strided_", "resolve_conj",
                "resolve_neg", "resize_", "_unsafe_view", "_reshape_alias", "reshape", "expand", "t", "transpose",
                "permute", "slice", "select", "unsqueeze", "squeeze", "detach", "alias", "lift_fresh", "dropout",
                "to", "_to_copy", "contiguous", "chunk", "split", "split_with_sizes", "unbind", "narrow",
                "conv2d", "convolution", "_convolution", "linear", "matmul", "group_norm", "layer_norm",
                "scaled_dot_product_attention", "numpy_t", "result_type", "item", "_local_scalar_dense"}
TOP = 15


@dataclass(frozen=True)
class Kernel:
    """One kernel launch (or, in a CPU trace, one innermost aten operator) and its duration."""

    name: str
    us: float


def categorise(name: str) -> str:
    """The kind of a kernel from its name (cuDNN / cuBLAS / flash / Triton / aten names)."""
    low = name.lower()
    if low.startswith("triton_") and not low.startswith("triton_tem"):
        return "normalisation" if re.search(r"norm|welford", low) else "elementwise"
    return next((kind for kind, pattern in PATTERNS if re.search(pattern, low)), "other")


def kernels_from(events: Iterable[Any], device: str) -> list[Kernel]:
    """The kernels of a torch.profiler trace (`prof.events()`): on CUDA, the GPU activities (kernels,
    memcpy, memset); on the CPU, each aten operator that is neither a wrapper nor has a non-wrapper
    operator below it, timed with what it calls."""
    events = list(events)
    if device == "cuda":
        return [Kernel(e.name, e.time_range.elapsed_us()) for e in events if e.device_type.name == "CUDA"]

    def work(e: Any) -> bool:
        return e.name.startswith("aten::") and e.name[6:] not in CPU_WRAPPERS

    def innermost(e: Any) -> bool:
        stack = list(e.cpu_children)
        while stack:
            child = stack.pop()
            if work(child):
                return False
            stack.extend(child.cpu_children)
        return True

    return [Kernel(e.name, e.cpu_time_total) for e in events
            if e.device_type.name == "CPU" and work(e) and innermost(e)]


def kernel_table(kernels: list[Kernel], steps: int, top: int = TOP) -> dict[str, Any]:
    """Per step: kernel count and busy time, the same by kind, and the `top` kernels by time."""
    total_us = sum(k.us for k in kernels)
    kinds: dict[str, dict[str, float]] = {kind: {"kernels": 0.0, "ms": 0.0} for kind in KINDS}
    names: dict[str, dict[str, Any]] = defaultdict(lambda: {"calls": 0, "us": 0.0})
    for k in kernels:
        kind = categorise(k.name)
        kinds[kind]["kernels"] += 1 / steps
        kinds[kind]["ms"] += k.us / 1000 / steps
        names[k.name]["calls"] += 1
        names[k.name]["us"] += k.us
    for row in kinds.values():
        row["share"] = row["ms"] / (total_us / 1000 / steps) if total_us else 0.0
    ranked = sorted(names.items(), key=lambda item: -item[1]["us"])[:top]
    return {"kernels_per_step": len(kernels) / steps, "busy_ms_per_step": total_us / 1000 / steps, "kinds": kinds,
            "top": [{"name": n, "kind": categorise(n), "calls_per_step": v["calls"] / steps,
                     "ms_per_step": v["us"] / 1000 / steps, "share": v["us"] / total_us if total_us else 0.0}
                    for n, v in ranked]}


def step_bytes(fn: Callable[[], Any]) -> int:
    """Bytes the operators of one call of `fn` read and write (every tensor argument and result of
    each aten op that is not a view): the traffic of the step if nothing stayed in cache."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            if not func.is_view:
                Count.total += sum(t.numel() * t.element_size()
                                   for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor))
            return out

    with Count():
        fn()
    return Count.total


def copy_rate_gbps(device: torch.device, mib: int = 512) -> float:
    """Device-to-device copy rate (bytes read + written per second, GB/s), best of 5."""
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best_ms = measure(lambda: dst.copy_(src), repeats=5, warmup=2)["min"]
    return 2 * src.numel() / (best_ms / 1000) / 1e9


def guide_and_update(noise_pred: torch.Tensor, x: torch.Tensor, scale: float, ddim: Any) -> torch.Tensor:
    """Classifier-free guidance then the DDIM update, as `Denoiser.step` runs them (same ops, same order):
    (2B, 4, h, w) [uncond, cond] noise prediction and (B, 4, h, w) latents -> (B, 4, h, w) x_{t-1}."""
    from sdcn_trt.pipeline.scheduler import classifier_free_guidance, ddim_update

    eps_uncond, eps_cond = noise_pred.float().chunk(2)
    return ddim_update(x, classifier_free_guidance(eps_uncond, eps_cond, scale), ddim, None)


def step_function(backend: str, components: Any, device: torch.device, precision: str, spec: Any,
                  options: dict[str, Any]) -> tuple[Callable[[], Any], dict[str, Any]]:
    """One full denoising step of the contest loop on `backend` (fixed inputs, a step's DDIM constants):
    the fused ControlNet+UNet, classifier-free guidance and the DDIM update, as `Denoiser.step` runs them."""
    from sdcn_trt import BackendConfig
    from sdcn_trt.engines import create_runner
    from sdcn_trt.export.descriptors import get_descriptor
    from sdcn_trt.pipeline.loop import Denoiser, StepState
    from sdcn_trt.pipeline.scheduler import make_ddim_schedule
    from sdcn_trt.schedule import FULL

    desc = get_descriptor("fused_step", components)
    config = BackendConfig(backend=backend, device=str(device), precision=precision,
                           compile=options.get("compile", "off"))
    if backend == "torch" and "fast" in options:
        from sdcn_trt.engines.torch import TorchRunner

        runner = TorchRunner(desc, device, precision, fast=options["fast"], compile=options.get("compile", "off"),
                             compile_flags=options.get("compile_flags", ()),
                             compile_scope=options.get("compile_scope", "whole"))
    elif backend == "inductor":
        from sdcn_trt.engines.inductor.runner import InductorRunner
        from sdcn_trt.engines.inductor.plan import InductorSettings
        from sdcn_trt.export.descriptors import ShapeRange

        settings = InductorSettings(ShapeRange.static(spec), max_autotune=options.get("max_autotune", False))
        runner = InductorRunner(desc, config, settings)
    else:
        runner = create_runner(desc, config)
    clock = time.perf_counter()
    runner.activate()
    setup_s = time.perf_counter() - clock
    feed = desc.sample_inputs(spec, device)
    hints = {n: feed[n] for n in desc.input_names if n.startswith("hint")}
    denoiser = Denoiser({"fused_step": runner}, (FULL,), 9.0, feed["text_embeddings"], hints, feed["control_scales"])
    ddim = make_ddim_schedule(20).steps[0]
    state = StepState(feed["latents"])
    info = {"setup_s": setup_s, "fast": repr(getattr(runner, "fast", None))}
    if options.get("fused_update"):  # the candidate: guidance + DDIM update as one compiled kernel (CUDA)
        update = torch.compile(guide_and_update) if device.type == "cuda" else guide_and_update
        return (lambda: StepState(update(runner.infer(feed)["noise_pred"], state.x, 9.0, ddim))), info
    return (lambda: denoiser.step(state, FULL, ddim, feed["timestep"], None)), info


def profile_step(step: Callable[[], Any], device: torch.device, repeats: int) -> dict[str, Any]:
    """The step's kernel table over `repeats` calls: replays of a CUDA graph of it on CUDA (static
    buffers without the graph when CUPTI shows no kernels in replays), eager calls on the CPU."""
    from torch.profiler import ProfilerActivity, profile

    step()  # warm: kernels chosen, caches filled
    run, mode = step, "eager (CPU trace: innermost aten operators)"
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        from sdcn_trt.pipeline.loop import capture

        graph = capture(step, device, "the profiled step")
        run, mode = graph.replay, "CUDA graph replay"
        activities.append(ProfilerActivity.CUDA)
    wall = measure(run, repeats, warmup=1)
    for attempt in ("graph", "static"):
        with profile(activities=activities) as prof:
            for _ in range(repeats):
                run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        kernels = kernels_from(prof.events(), device.type)
        if kernels or device.type != "cuda" or attempt == "static":
            break
        run, mode = step, "static buffers without the graph (CUPTI showed no kernels inside graph replays)"
        wall = measure(run, repeats, warmup=1)
    table = kernel_table(kernels, repeats)
    return {"mode": mode, "repeats": repeats, "wall_ms_per_step": wall["p50"], **table}


def run(backends: list[tuple[str, str, dict[str, Any]]], preset: str, device: str, repeats: int,
        spec: Any = None) -> dict[str, Any]:
    """The report: per (label, backend, options) its step table, traffic and bandwidth."""
    from sdcn_trt.engines.torch import resolve_device
    from sdcn_trt.export.descriptors import ShapeSpec
    from sdcn_trt.models.presets import load_preset

    dev = resolve_device(device)
    spec = spec or ShapeSpec()
    components = load_preset(preset, seed=0)
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "preset": preset, "device": dev.type,
                              "shape": [spec.batch, spec.height, spec.width, spec.cfg], "torch": torch.__version__,
                              "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                              "copy_gbps": copy_rate_gbps(dev), "backends": {}}
    for label, backend, options in backends:
        precision = options.get("precision", "fp16" if dev.type == "cuda" else "fp32")
        try:
            step, info = step_function(backend, components, dev, precision, spec, options)
            row = {"backend": backend, "precision": precision, **info, **profile_step(step, dev, repeats)}
            try:  # best effort: a compiled kernel may refuse to run under the counting dispatch mode
                row["bytes_per_step"] = step_bytes(step)
                row["achieved_gbps"] = row["bytes_per_step"] / (row["busy_ms_per_step"] / 1000) / 1e9
            except Exception as exc:
                row["bytes_error"] = f"{type(exc).__name__}: {exc}"[:200]
        except Exception as exc:  # one backend's failure (a compile crash) must not lose the others' tables
            row = {"backend": backend, "precision": precision, "error": f"{type(exc).__name__}: {exc}"[:400]}
        report["backends"][label] = row
        print(f"{label}: {json.dumps({k: v for k, v in row.items() if k not in ('kinds', 'top')})}", flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return report


def markdown(report: dict[str, Any]) -> str:
    b, h, w, cfg = report["shape"]
    lines = [f"# Where a step's time goes: {report['preset']} on {report['gpu'] or report['device']}, {report['date']}", "",
             f"One full step (fused ControlNet+UNet, guidance, DDIM update) at {h}x{w}, batch {b}, CFG x{cfg}; "
             f"torch {report['torch']}. Measured copy rate (device to device, read + write): "
             f"{report['copy_gbps']:.0f} GB/s.", ""]
    for label, r in report["backends"].items():
        if "error" in r:
            lines += [f"## {label}: failed", "", f"`{r['error']}`", ""]
            continue
        lines += [f"## {label} ({r['mode']}, {r['repeats']} steps traced)", "",
                  f"**{r['kernels_per_step']:.0f} kernels per step**, busy {r['busy_ms_per_step']:.2f} ms per step "
                  f"(wall {r['wall_ms_per_step']:.2f} ms); " + (
                      f"operators' traffic {r['bytes_per_step'] / 1e9:.2f} GB per step = {r['achieved_gbps']:.0f} GB/s "
                      f"over the busy time, {100 * r['achieved_gbps'] / report['copy_gbps']:.0f}% of the copy rate."
                      if "bytes_per_step" in r else f"traffic not counted ({r.get('bytes_error')})."), "",
                  "| kind | kernels / step | ms / step | share |", "|---|---:|---:|---:|"]
        lines += [f"| {kind} | {v['kernels']:.0f} | {v['ms']:.3f} | {100 * v['share']:.1f}% |"
                  for kind, v in r["kinds"].items() if v["kernels"]]
        lines += ["", "| top kernel | kind | calls / step | ms / step | share |", "|---|---|---:|---:|---:|"]
        lines += [f"| `{t['name'][:100]}` | {t['kind']} | {t['calls_per_step']:.0f} | {t['ms_per_step']:.3f} | "
                  f"{100 * t['share']:.1f}% |" for t in r["top"]]
        lines.append("")
    lines += ["Kinds from kernel names (benchmarks/profile.py: `categorise`). Traffic: every tensor each aten "
              "operator of the eager step reads and writes (an upper bound of DRAM traffic when operators fuse). "
              "Busy: the sum of kernel durations."]
    return "\n".join(lines) + "\n"


BACKENDS = {  # label -> (backend, options)
    "torch fp16": ("torch", {}),  # FastPath.default_for(cuda, fp16): sdpa, fuse_qkv, channels_last, gn_silu
    "torch fp16 sdpa + fuse_qkv only": ("torch", {"fast": "sdpa+fuse_qkv"}),  # the default before 2026-12-05
    "inductor fp16": ("inductor", {}),
    "torch fp16 + torch.compile": ("torch", {"compile": "default"}),
    "torch fp16 + torch.compile max-autotune": ("torch", {"compile": "max-autotune-no-cudagraphs"}),
    "torch fp32": ("torch", {"precision": "fp32"}),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="sd15-random")
    parser.add_argument("--repeats", type=int, default=5, help="steps traced (and timed) per backend")
    parser.add_argument("--backends", nargs="+", choices=list(BACKENDS),
                        help="default: torch fp16 and inductor fp16 on CUDA, torch fp32 on the CPU")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--out", nargs="+", default=[str(Path(__file__).parent / "results")])
    args = parser.parse_args(argv)
    from sdcn_trt.engines.torch import FastPath
    from sdcn_trt.export.descriptors import ShapeSpec

    labels = args.backends or (["torch fp16", "inductor fp16"] if args.device.startswith("cuda") else ["torch fp32"])
    earlier = FastPath(sdpa=True, fuse_qkv=True)
    chosen = [(label, BACKENDS[label][0],
               {k: earlier if v == "sdpa+fuse_qkv" else v for k, v in BACKENDS[label][1].items()})
              for label in labels]
    report = run(chosen, args.preset, args.device, args.repeats, ShapeSpec(1, args.height, args.width))
    stem = f"profile-{report['device']}-{args.preset}-{time.strftime('%Y%m%d-%H%M')}"
    for folder in args.out:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
        (Path(folder) / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
