"""The fast torch path, one switch at a time: one full denoising step (fused ControlNet+UNet, guidance,
DDIM update) with each FastPath switch added on its own to the default, timed inside a CUDA graph (where
the host no longer hides the GPU's cost) and eagerly, with each variant's difference from the plain
module (the data behind FastPath's defaults). `--inductor` adds the compiled steps, compile time included:
the inductor backend's without and with max_autotune, and the CUDA fp16 default under torch.compile
(default and max-autotune-no-cudagraphs modes, NCHW for comparison, its blocks compiled apart, and each
diffusion-fast inductor setting of config.COMPILE_FLAGS alone, then all three).

    python -m benchmarks.fast_path --device cuda --precision fp16      # sd15-random, contest shape
    python -m benchmarks.fast_path --device cuda --sdpa-table benchmarks/results/sdpa-cuda-fp16-....json
    python -m benchmarks.fast_path --device cpu --preset tiny --precision fp32 --height 64 --width 64
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.profile import step_function
from sdcn_trt.config import COMPILE_FLAGS
from sdcn_trt.engines.torch import FastPath
from sdcn_trt.errors import InputError
from sdcn_trt.export.descriptors import ShapeSpec
from sdcn_trt.scoring.latency import measure, synchronize

DEFAULT = FastPath(sdpa=True, fuse_qkv=True)  # the base each switch is added to (the CUDA fp16 default before 3869be8)
CUDA_DEFAULT = FastPath.default_for(torch.device("cuda"), torch.float16)  # today's: + channels_last + gn_silu
VARIANTS = {
    "plain": FastPath(),
    "default (sdpa+fuse_qkv)": DEFAULT,
    "+channels_last": dataclasses.replace(DEFAULT, channels_last=True),
    "+gn_silu": dataclasses.replace(DEFAULT, gn_silu=True),
    "+cudnn_benchmark": dataclasses.replace(DEFAULT, cudnn_benchmark=True),
    "+sdpa_backend=flash": dataclasses.replace(DEFAULT, sdpa_backend="flash"),
    "+sdpa_backend=efficient": dataclasses.replace(DEFAULT, sdpa_backend="efficient"),
    "+sdpa_backend=cudnn": dataclasses.replace(DEFAULT, sdpa_backend="cudnn"),
    "+fp16_accumulation": dataclasses.replace(DEFAULT, fp16_accumulation=True),
    "+cross_kv": dataclasses.replace(DEFAULT, cross_kv=True),  # the text's K/V projected once per image
    "+channels_last+gn_silu+cudnn_benchmark": dataclasses.replace(DEFAULT, channels_last=True, gn_silu=True,
                                                                  cudnn_benchmark=True),
}
# not FastPath switches: the loop's guidance + DDIM update compiled into one kernel (a measured candidate)
UPDATE_VARIANTS = {"+fused_update": DEFAULT}
INDUCTOR = {"inductor": {"max_autotune": False}, "inductor max_autotune": {"max_autotune": True}}
# the default under torch.compile (JIT inductor: no package to load), compiled at the first call
# torch.compile over today's CUDA fp16 default (channels_last, NHWC GroupNorms), over NCHW, in both modes; then
# diffusers' diffusion-fast inductor settings (config.COMPILE_FLAGS), each alone over the default mode, then all
COMPILED = {"torch.compile": {"fast": CUDA_DEFAULT, "compile": "default"},
            "torch.compile NCHW (sdpa+fuse_qkv)": {"fast": DEFAULT, "compile": "default"},
            "torch.compile blocks": {"fast": CUDA_DEFAULT, "compile": "default", "compile_scope": "blocks"},
            "torch.compile max-autotune-no-cudagraphs": {"fast": CUDA_DEFAULT, "compile": "max-autotune-no-cudagraphs"}}
COMPILED.update({f"torch.compile +{flag}": {"fast": CUDA_DEFAULT, "compile": "default", "compile_flags": (flag,)}
                 for flag in COMPILE_FLAGS})
COMPILED["torch.compile +diffusion-fast (all three)"] = {"fast": CUDA_DEFAULT, "compile": "default",
                                                         "compile_flags": tuple(COMPILE_FLAGS)}


def per_head_size_variant(table: str | Path, precision: str, device: str) -> tuple[str, FastPath]:
    """The default with attention pinned, per head size, to the kernel a benchmarks.sdpa report (its JSON)
    found fastest there: the one-kernel-for-all variants' rival, measured in the same run."""
    try:
        report = json.loads(Path(table).read_text())
        fastest = {int(size): row["best"] for size, row in report["per_head_size"].items() if row["best"]}
        dtype, timed_on = report["dtype"], str(report["device"]).split(":")[0]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"--sdpa-table {table}: not a benchmarks.sdpa report ({type(exc).__name__}: {exc})") from exc
    if timed_on != device.split(":")[0]:
        raise InputError(f"--sdpa-table {table} timed the kernels on {timed_on}; this run is on {device}: the fastest "
                         f"kernel differs by device, run `python -m benchmarks.sdpa --device {device}` first")
    if dtype != precision:
        raise InputError(f"--sdpa-table {table} timed the kernels in {dtype}; this run is {precision}: "
                         f"run `python -m benchmarks.sdpa --dtype {precision}` first")
    if not fastest:
        raise InputError(f"--sdpa-table {table}: every pinnable kernel refused some shape at every head size; "
                         "nothing to pin")
    spelling = ",".join(f"{size}={kernel}" for size, kernel in sorted(fastest.items()))
    return f"+sdpa_backend={spelling}", dataclasses.replace(DEFAULT, sdpa_backend=spelling)


def time_step(step: Any, device: torch.device, repeats: int) -> dict[str, Any]:
    """Eager and (CUDA) graph-replay latency statistics (ms) of one step, and its output latents."""
    clock = time.perf_counter()
    out = step().x.detach().clone()  # (B, 4, h, w); the first call: torch.compile compiles here
    synchronize()  # the GPU's queued kernels finish inside the first call's time
    first_call_s = time.perf_counter() - clock
    row: dict[str, Any] = {"first_call_s": first_call_s, "eager_ms": measure(step, repeats, warmup=2)}
    if device.type == "cuda":
        from sdcn_trt.pipeline.loop import capture

        graph = capture(step, device, "the benchmarked step")
        row["graph_ms"] = measure(graph.replay, repeats, warmup=2)
    return {**row, "out": out}


def run(components: Any, device: str, precision: str, repeats: int, spec: ShapeSpec = ShapeSpec(),
        variants: dict[str, FastPath] = VARIANTS, inductor: bool = False, compiled: list[str] | None = None,
        extra_compiled: dict[str, dict[str, Any]] | None = None,
        after_each: Callable[[dict[str, Any]], None] = lambda results: None) -> dict[str, Any]:
    """Per variant: step latency (ms; inside a graph on CUDA), setup seconds and max |difference| of the
    step's latents from the plain variant's; a variant the device cannot run records why. `after_each`
    gets the results so far after every variant (a run stopped by a time limit keeps them). `inductor` adds
    the compiled steps: those named in `compiled` (INDUCTOR and COMPILED names), else all, and `extra_compiled`."""
    from sdcn_trt.engines.torch import resolve_device

    dev = resolve_device(device)
    jobs: list[tuple[str, str, dict[str, Any]]] = [
        (n, "torch", {"fast": f, "fused_update": n in UPDATE_VARIANTS}) for n, f in variants.items()]
    if inductor:
        jobs += [(n, "inductor", o) for n, o in INDUCTOR.items() if compiled is None or n in compiled]
        jobs += [(n, "torch", o) for n, o in COMPILED.items() if compiled is None or n in compiled]
        jobs += [(n, "torch", o) for n, o in (extra_compiled or {}).items()]
    results: dict[str, Any] = {}
    plain: torch.Tensor | None = None
    for name, backend, options in jobs:
        try:
            step, info = step_function(backend, components, dev, precision, spec, options)
            row = time_step(step, dev, repeats)
        except (InputError, RuntimeError) as exc:  # a CUDA-only switch on the CPU, a kernel that cannot run
            results[name] = {"refused": f"{type(exc).__name__}: {exc}"[:300]}
            after_each(results)
            continue
        out = row.pop("out")
        plain = out if plain is None else plain
        results[name] = {**row, "setup_s": info["setup_s"], "max_abs_vs_plain": float((out - plain).abs().max())}
        after_each(results)
        del step
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return results


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Fast path, one full step ({report['preset']}, {report['device']} {report['precision']}, "
             f"{report['height']}x{report['width']}, CFG batch 2), {report['date']}", "",
             f"torch {report['torch']}" + (f", {report['gpu']}" if report["gpu"] else "") + ". Each switch is added "
             "on its own to the default (SDPA + fused QKV); 'graph': the step captured in a CUDA graph and replayed "
             "(the GPU's cost), 'eager': called from Python (host-bound on a GPU).", "",
             "| variant | graph p50 ms | graph min ms | eager p50 ms | setup s | first call s | max abs diff vs plain "
             "(latents) |", "|---|---|---|---|---|---|---|"]
    for name, v in report["variants"].items():
        if "refused" in v:
            lines.append(f"| {name} | refused: {v['refused'][:120]} | | | | | |")
            continue
        graph = v.get("graph_ms")
        lines.append(f"| {name} | {graph['p50']:.2f} | {graph['min']:.2f} | " if graph else f"| {name} | - | - | ")
        lines[-1] += (f"{v['eager_ms']['p50']:.2f} | {v['setup_s']:.1f} | {v.get('first_call_s', float('nan')):.1f} | "
                      f"{v['max_abs_vs_plain']:.3g} |")
    lines += ["", "Setup: module preparation (inductor: the AOTInductor compile, max_autotune's autotuning included). "
              "First call: the step's first run (torch.compile: its compile)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--preset", default="sd15-random")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--height", type=int, default=ShapeSpec().height)
    parser.add_argument("--width", type=int, default=ShapeSpec().width)
    parser.add_argument("--variants", nargs="+", choices=[*VARIANTS, *UPDATE_VARIANTS], help="default: all")
    parser.add_argument("--inductor", action="store_true", help="also the compiled steps (minutes on a GPU): AOTInductor "
                        "without / with max_autotune, torch.compile default / max-autotune-no-cudagraphs / NCHW / "
                        "each diffusion-fast inductor setting")
    parser.add_argument("--compiled", nargs="+", choices=[*INDUCTOR, *COMPILED], metavar="NAME",
                        help=f"with --inductor: only these compiled steps (default: all): {', '.join([*INDUCTOR, *COMPILED])}")
    parser.add_argument("--sdpa-table", metavar="JSON", help="a benchmarks.sdpa report: adds the variant pinning "
                        "each head size to the kernel it found fastest there")
    parser.add_argument("--out", nargs="+", default=[str(Path(__file__).parent / "results")])
    args = parser.parse_args(argv)
    from sdcn_trt.models.presets import load_preset

    every = {**VARIANTS, **UPDATE_VARIANTS}
    variants = {n: every[n] for n in (args.variants or every)}
    if args.sdpa_table:
        try:
            name, fast = per_head_size_variant(args.sdpa_table, args.precision, args.device)
        except InputError as exc:
            parser.error(str(exc))
        variants[name] = fast
        # the compiled step with the same per-head-size kernels, over today's CUDA default
        extra = {f"torch.compile {name}": {"fast": dataclasses.replace(CUDA_DEFAULT, sdpa_backend=fast.sdpa_backend),
                                           "compile": "default"}}
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "device": args.device, "precision": args.precision,
        "preset": args.preset, "torch": torch.__version__, "height": args.height, "width": args.width,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") and torch.cuda.is_available() else None,
        "variants": {}}
    stem = f"fastpath-{args.device.split(':')[0]}-{args.preset}-{time.strftime('%Y%m%d-%H%M')}"

    def write(results: dict[str, Any]) -> None:
        report["variants"] = results
        for folder in args.out:
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / f"{stem}.json").write_text(json.dumps(report, indent=1))
            (Path(folder) / f"{stem}.md").write_text(markdown(report))

    write(run(load_preset(args.preset), args.device, args.precision, args.repeats,
              ShapeSpec(1, args.height, args.width), variants, args.inductor, args.compiled,
              extra if args.sdpa_table else None, write))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
