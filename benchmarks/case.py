"""One benchmark case in its own process: a backend's CLIP, fused step, VAE decode and end-to-end times.

    python -m benchmarks.case --backend torch --precision fp32 --device cpu --out case.json
    python -m benchmarks.case --backend torch --steps 10 --sampler unipc --out case.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import time
from typing import Any, Callable

import numpy as np
import torch

from benchmarks.baseline_diffusers import COMPILE_MODES, diffusers_end_to_end
from sdcn_trt.config import BUILT_BACKENDS, COMPILE_SCOPES
from sdcn_trt.errors import InputError
from sdcn_trt.samplers import SAMPLER_NAMES
from sdcn_trt.scoring.latency import measure, synchronize


def timings(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> dict[str, float]:
    """The scoring harness's measurement of `fn` (warm-up, synchronised wall time per call), in the
    benchmark's units: median and minimum in seconds."""
    return in_seconds(measure(fn, repeats, warmup), warmup)


def in_seconds(stats: dict[str, float], warmup: int) -> dict[str, float]:
    """`sdcn_trt.scoring.latency.summarize` statistics (ms) -> median_s / min_s / repeats / warmup."""
    return {"median_s": stats["p50"] / 1000.0, "min_s": stats["min"] / 1000.0, "repeats": int(stats["n"]),
            "warmup": warmup}


def fused_step_flops(components: Any, spec: Any) -> float:
    """FLOPs of one fused ControlNet+UNet evaluation (CFG batch), counted by torch's FlopCounterMode on fake
    tensors: shapes only, nothing computed (an SD1.5-sized step in fp32 on the CPU took seconds of a GPU run)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from sdcn_trt.export.descriptors import get_descriptor

    desc = get_descriptor("fused_step", components)
    module = desc.build_module()
    dtype = next(p.dtype for p in module.parameters() if p.is_floating_point())  # fp16 components: fp16 inputs
    args = [t.to(dtype) if t.is_floating_point() else t for t in desc.sample_inputs(spec).values()]
    counter = FlopCounterMode(display=False)
    with FakeTensorMode(allow_non_fake_inputs=True), counter, torch.no_grad():
        module(*args)
    return float(counter.get_total_flops())


def count_nonfinite(pipe: Any, photo: np.ndarray, config: Any) -> dict[str, int]:
    """NaN/Inf values each network outputs over one image, counted on an eager run of the same runners
    (a host sync per call: never inside the timed or captured runs)."""
    pipe.backend = dataclasses.replace(pipe.backend, cuda_graph="off")
    pipe._loops.clear()  # the next run builds an eager loop over the same runners
    pipe._text_cache.clear()  # and runs the text encoder again
    counts: dict[str, int] = {}
    for name, runner in list(pipe.runners.items()):
        real = runner.infer_impl

        def counting(feed: dict[str, torch.Tensor], real: Any = real, name: str = name) -> dict[str, torch.Tensor]:
            out = real(feed)
            bad = sum(int((~torch.isfinite(t)).sum()) for t in out.values() if t.is_floating_point())
            counts[name] = counts.get(name, 0) + bad
            return out

        runner.infer_impl = counting
    pipe.run(photo, config)
    return counts


def sampler_words(report: dict[str, Any]) -> str:
    """How a report names its sampler: "DDIM" (reports from before --sampler too), else the sampler's name."""
    sampler = report.get("sampler", "ddim")
    return "DDIM" if sampler == "ddim" else sampler


def run_case(args: argparse.Namespace) -> dict[str, Any]:
    from sdcn_trt import BackendConfig, ControlNetPipeline, GenerationConfig
    from sdcn_trt.images import sample_photos
    from sdcn_trt.export.descriptors import ShapeSpec
    from sdcn_trt.models.presets import load_preset

    if args.compile != "off" and args.backend not in ("diffusers", "torch"):
        raise InputError(f"--compile {args.compile} is for the diffusers baseline and the torch backend; backend "
                         f"{args.backend!r} compiles through its own settings (inductor)")
    compiled = getattr(args, "compiled_networks", None)
    if compiled is not None and args.backend not in BUILT_BACKENDS and not (args.backend == "torch"
                                                                          and args.compile != "off"):
        raise InputError(f"--compiled-networks is for the backends that build networks ({', '.join(BUILT_BACKENDS)}) "
                         f"and torch with --compile; backend {args.backend!r} builds none")
    backend = None if args.backend == "diffusers" else BackendConfig(  # settings checked before anything loads
        backend=args.backend, device=args.device, precision=args.precision, cuda_graph=args.cuda_graph,
        compiled_networks=compiled, compile=args.compile, compile_scope=args.compile_scope)
    config = GenerationConfig(ddim_steps=args.steps, sampler=args.sampler)  # checked before anything loads
    clock = time.perf_counter()
    # torch and inductor load the weights cache's entry in the case's precision (fp16: mapped as fp16, half the
    # bytes, no fp32 copy on the way to the GPU); the others convert on their own, from fp32
    components = load_preset(args.preset, seed=0,
                             precision=args.precision if args.backend in ("torch", "inductor") else "fp32")
    load_s = time.perf_counter() - clock
    spec = ShapeSpec(1, 256, 384)
    result: dict[str, Any] = {"backend": args.backend, "precision": args.precision, "device": args.device,
                              "cuda_graph": args.cuda_graph, "preset": args.preset, "load_s": load_s}
    photo = sample_photos(["chelsea"])["chelsea"]  # 300 x 451 -> 256 x 384, the contest's shape
    if args.backend == "diffusers":
        stats, floats = diffusers_end_to_end(components, photo, config, args)
        result["end_to_end"] = in_seconds(stats, 1)
        result["compile"] = args.compile
        # the first call's time beyond a timed call: torch.compile's compile time (when compiled)
        result["compile_s"] = max(0.0, stats["first_call_s"] - stats["p50"] / 1000.0)
        result["nonfinite"] = {"images": int((~np.isfinite(floats)).sum())}
        image = (np.nan_to_num(floats, nan=0.0).clip(0, 1) * 255).astype(np.uint8)  # truncation, as ours
    else:
        assert backend is not None
        # what this backend built and what ran on torch (compiled_networks None: everything it runs was built)
        result["compiled_networks"] = list(backend.compiled_networks) if backend.compiled_networks else None
        pipe = ControlNetPipeline(components, backend)
        clock = time.perf_counter()
        for runner in pipe.runners.values():
            runner.activate()  # exports / engine builds, timed apart
        result["setup_s"] = time.perf_counter() - clock
        packages = {n: r.package for n, r in pipe.runners.items() if getattr(r, "package", None) is not None}
        if packages:  # AOTInductor packages: compiled now or reused, with their build time and size
            result["packages"] = {n: {"cached": p.cached, "build_s": p.built_seconds, "size_mib": p.size_bytes / 2**20,
                                      "check": p.check} for n, p in packages.items()}
        if args.device.startswith("cuda"):
            result["setup_peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()  # the peak reported below is the run's, not the build's
        exports = {n: r.export for n, r in pipe.runners.items() if getattr(r, "export", None) is not None}
        if exports:  # ONNX exports made (or reused) for this backend, with their check against torch
            result["exports"] = {n: {"path": str(e.path), "cached": e.cached, "seconds": e.seconds, "check": e.check}
                                 for n, e in exports.items()}
        descs, runners = pipe.descriptors, pipe.runners
        feeds = {name: {k: v.to(runners[name].device) for k, v in descs[name].sample_inputs(spec).items()}
                 for name in descs}
        def first_call_s(name: str) -> float:  # torch.compile (--compile) compiles in a network's first call
            clock = time.perf_counter()
            runners[name].infer(feeds[name])
            synchronize()
            return time.perf_counter() - clock

        timed = ("text_encoder", "fused_step", "vae_decoder")
        first_calls = {name: first_call_s(name) for name in timed}
        medians = {}
        for name in timed:
            result[name] = timings(lambda n=name: runners[n].infer(feeds[n]), args.repeats, 1)
            medians[name] = result[name]["median_s"]
        if args.compile != "off":  # torch.compile: every compiled network's first call beyond a timed call
            for name in (n for n in runners if n not in timed and backend.compiles(n)):  # e.g. the hint encoder
                first_calls[name] = first_call_s(name)
                medians[name] = timings(lambda n=name: runners[n].infer(feeds[n]), 1, 0)["median_s"]
            result["compile"] = args.compile
            result["compile_s"] = sum(max(0.0, first_calls[n] - medians[n]) for n in first_calls)
        result["end_to_end"] = timings(lambda: pipe.run(photo, config), args.repeats, 1)
        e2e, step = result["end_to_end"]["median_s"], result["fused_step"]["median_s"]
        loop_steps = len(config.step_kinds()[1])  # the sampler's steps (ldm's DDIM may run one more)
        result["outside_steps_fraction"] = max(0.0, (e2e - loop_steps * step) / e2e)
        flops = fused_step_flops(components, spec)
        result["fused_step_tflop"] = flops / 1e12
        result["fused_step_tflops_achieved"] = flops / step / 1e12
        image = pipe.run(photo, config).images[0]  # as timed (a replay when graphed)
    result["steps"], result["sampler"] = args.steps, args.sampler
    if args.device.startswith("cuda"):
        result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if args.backend != "diffusers":
        result["nonfinite"] = count_nonfinite(pipe, photo, config)
    if args.image_out:
        np.save(args.image_out, image)
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def case_parser() -> argparse.ArgumentParser:
    """The arguments every benchmark child takes (this one and benchmarks.batched): the backend, the
    model, the workload and the JSON it writes."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", required=True)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cuda-graph", default="off")
    parser.add_argument("--compiled-networks", nargs="*", default=None, metavar="NETWORK",
                        help="tensorrt/inductor: build only these networks (torch with --compile: compile only "
                             "these), the others run on eager torch (default: all)")
    parser.add_argument("--preset", default="sd15-random")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="ddim", choices=SAMPLER_NAMES,
                        help="sdcn_trt.samplers; the diffusers baseline runs that sampler's scheduler")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", required=True)
    return parser


def main() -> None:
    parser = case_parser()
    parser.add_argument("--compile", default="off", choices=COMPILE_MODES,
                        help="the diffusers baseline's torch.compile mode of its UNet and ControlNet (CUDA), or the "
                             "torch backend's (BackendConfig.compile: --compiled-networks, or all)")
    parser.add_argument("--compile-scope", default="whole", choices=COMPILE_SCOPES,
                        help="the torch backend's torch.compile: each network whole, or its blocks apart")
    parser.add_argument("--image-out", help="save the case's uint8 image (.npy) for parity checks")
    args = parser.parse_args()
    with open(args.out, "w") as f:
        json.dump(run_case(args), f, indent=1, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))


if __name__ == "__main__":
    main()
