"""The fast torch path, one switch at a time: fused-step milliseconds of eager torch with SDPA attention,
fused QKV projections and channels_last added in turn, and each variant's difference from the plain
module (the data behind FastPath's defaults).

    python -m benchmarks.fast_path --device cuda --precision fp16      # sd15-random, contest shape
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sdcn_trt.engines.torch import FastPath, TorchRunner
from sdcn_trt.export.descriptors import ShapeSpec, get_descriptor
from sdcn_trt.scoring.latency import measure

VARIANTS = {
    "plain": FastPath(),
    "sdpa": FastPath(sdpa=True),
    "sdpa+fuse_qkv": FastPath(sdpa=True, fuse_qkv=True),
    "sdpa+fuse_qkv+channels_last": FastPath(sdpa=True, fuse_qkv=True, channels_last=True),
}


def run(components: Any, device: str, precision: str, repeats: int, spec: ShapeSpec = ShapeSpec()) -> dict[str, Any]:
    """Per variant: fused-step latency statistics (ms) and max |difference| from the plain variant."""
    desc = get_descriptor("fused_step", components)
    feed = desc.sample_inputs(spec, device)
    results: dict[str, Any] = {}
    plain: torch.Tensor | None = None
    for name, fast in VARIANTS.items():
        runner = TorchRunner(desc, device, precision, fast=fast)
        runner.activate()
        out = runner.infer(feed)["noise_pred"].clone()
        plain = out if plain is None else plain
        results[name] = {"ms": measure(lambda r=runner: r.infer(feed), repeats, warmup=2),
                         "max_abs_vs_plain": float((out - plain).abs().max())}
        runner.deactivate()
        del runner
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--preset", default="sd15-random")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--height", type=int, default=ShapeSpec().height)
    parser.add_argument("--width", type=int, default=ShapeSpec().width)
    parser.add_argument("--out", nargs="+", default=[str(Path(__file__).parent / "results")])
    args = parser.parse_args(argv)
    from sdcn_trt.models.presets import load_preset

    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": args.device, "precision": args.precision,
              "preset": args.preset, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
              "variants": run(load_preset(args.preset), args.device, args.precision, args.repeats,
                              ShapeSpec(1, args.height, args.width))}
    lines = [f"# Fast path, fused step ({args.preset}, {args.device} {args.precision}, {args.height}x{args.width}, "
             "CFG batch 2), "
             f"{report['date']}", "", "| variant | p50 ms | min ms | max abs diff vs plain |", "|---|---|---|---|"]
    lines += [f"| {n} | {v['ms']['p50']:.2f} | {v['ms']['min']:.2f} | {v['max_abs_vs_plain']:.3g} |"
              for n, v in report["variants"].items()]
    stem = f"fastpath-{args.device.split(':')[0]}-{args.preset}-{time.strftime('%Y%m%d-%H%M')}"
    for folder in args.out:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{stem}.json").write_text(json.dumps(report, indent=1))
        (Path(folder) / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
