"""The operators of one call, counted on any device: how many run, which copy data, and which change memory
layout or would on CUDA — the CPU's proxy for a GPU step's kernel count and its layout-copy kernels.

    python -m benchmarks.op_census                      # the tiny fused step, NCHW and channels_last
    python -m benchmarks.op_census --preset sd15-random --height 256 --width 384

A TorchDispatchMode sees every aten operator the call dispatches (under inference mode, composite ones such
as linear and group_norm arrive whole, as a kernel launch would). Counted:
- operators: every operator that is not a view (a proxy for kernels per step); a module named in
  `one_kernel` (FastGroupNorm: one compiled kernel on CUDA, several aten operators in eager) counts once;
- copies: a data-moving operator (contiguous, clone, copy_, to, reshape, repeat, ...) whose result has
  storage of its own: memory traffic spent on moving bytes;
- cuda_layout: what turns into a layout copy on CUDA though not here: a GroupNorm given a channels_last
  input (CUDA's native GroupNorm copies it to NCHW and returns NCHW, and the convolution after it converts
  back) and a convolution given an input that is not channels_last (cuDNN's fp16 kernels are NHWC: it
  converts the input and the output, the H200 profile's nchwToNhwcKernel, 147 calls in an NCHW step);
- sites: each copy and layout change with the line of diffusers or sdcn_trt that asked for it.
"""
from __future__ import annotations

import argparse
import json
import traceback
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

# operators that only move or re-lay data: a copy when their result does not share its input's storage
MOVERS = {"contiguous", "clone", "copy_", "to", "_to_copy", "reshape", "flatten", "repeat", "repeat_interleave",
          "expand_as", "expand", "narrow", "index_select", "permute", "transpose", "view", "unflatten"}


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _site() -> str:
    """The innermost line of diffusers or sdcn_trt on the stack: who asked for the operator."""
    frames = [f for f in traceback.extract_stack() if "diffusers" in f.filename or "sdcn_trt" in f.filename]
    if not frames:
        return "?"
    f = frames[-1]
    return f"{Path(f.filename).name}:{f.lineno} {(f.line or '').strip()}"


def _nhwc(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def census(fn: Callable[[], Any], one_kernel: Iterable[nn.Module] = ()) -> dict[str, Any]:
    """Run `fn` once under a counting dispatch mode; the counts above and the sites of copies and layout
    changes ({'kind op @ file:line code': calls}). A call of a module in `one_kernel` is one operator, and
    what runs inside it is not counted apart."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    counts: Counter[str] = Counter()
    sites: Counter[str] = Counter()
    inside = [0]  # depth of one_kernel module calls

    def enter(module: nn.Module, args: Any) -> None:
        inside[0] += 1

    def leave(module: nn.Module, args: Any, out: Any) -> None:
        inside[0] -= 1
        if not inside[0]:
            counts["operators"] += 1

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            if inside[0]:
                return out
            name = func.overloadpacket.__name__
            ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            if not func.is_view:
                counts["operators"] += 1
            kind = ""
            if name in MOVERS and outs and any(_storage(o) not in {_storage(i) for i in ins} for o in outs):
                kind = "copies"
            elif name == "group_norm" and ins and _nhwc(ins[0]):
                kind = "cuda_layout"
            elif name in ("conv2d", "convolution") and not ins[0].is_contiguous(memory_format=torch.channels_last):
                kind = "cuda_layout"
            if kind:
                counts[kind] += 1
                sites[f"{kind} {name} @ {_site()}"] += 1
            return out

    hooks = [h for m in one_kernel for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with Count():
            fn()
    finally:
        for hook in hooks:
            hook.remove()
    return {"operators": counts["operators"], "copies": counts["copies"], "cuda_layout": counts["cuda_layout"],
            "sites": dict(sites.most_common())}


def fused_step_census(components: Any, fast: Any, spec: Any) -> dict[str, Any]:
    """The census of one fused ControlNet+UNet call on the CPU in fp32 with FastPath `fast` (after a first
    call, so nothing lazy is counted; the image's constants prepared first, as the loop does once per image);
    each FastGroupNorm counts as the one kernel it compiles to on CUDA."""
    from sdcn_trt.engines.fast_ops import FastGroupNorm
    from sdcn_trt.engines.torch import TorchRunner
    from sdcn_trt.export.descriptors import get_descriptor

    desc = get_descriptor("fused_step", components)
    runner = TorchRunner(desc, "cpu", "fp32", fast=fast)
    feed = desc.sample_inputs(spec, "cpu")
    with runner, torch.inference_mode():
        runner.prepare({n: t for n, t in feed.items() if n not in ("latents", "timestep")})  # the image's constants
        runner.infer(feed)
        norms = [m for m in runner.module.modules() if isinstance(m, FastGroupNorm)]
        return census(lambda: runner.infer(feed), one_kernel=norms)


def main(argv: list[str] | None = None) -> int:
    from sdcn_trt.engines.torch import FastPath
    from sdcn_trt.export.descriptors import ShapeSpec
    from sdcn_trt.models.presets import load_preset

    parser = argparse.ArgumentParser(prog="python -m benchmarks.op_census", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None, help="write the census as JSON here")
    args = parser.parse_args(argv)
    components = load_preset(args.preset, seed=0)
    spec = ShapeSpec(1, args.height, args.width)
    variants = {"NCHW (sdpa+fuse_qkv+gn_silu)": FastPath(sdpa=True, fuse_qkv=True, gn_silu=True),
                "channels_last (CUDA fp16's default)": FastPath(sdpa=True, fuse_qkv=True, channels_last=True,
                                                                gn_silu=True),
                "channels_last + cross_kv": FastPath(sdpa=True, fuse_qkv=True, channels_last=True, gn_silu=True,
                                                     cross_kv=True)}
    report = {"preset": args.preset, "shape": [1, args.height, args.width], "torch": torch.__version__,
              "variants": {label: fused_step_census(components, fast, spec) for label, fast in variants.items()}}
    for label, row in report["variants"].items():
        print(f"{label}: {row['operators']} operators, {row['copies']} copies, {row['cuda_layout']} CUDA layout changes")
        for site, calls in row["sites"].items():
            print(f"    {calls:>3}  {site}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
