"""Which SDPA kernel is fastest at SD1.5's attention shapes? Each kernel FastPath.sdpa_backend can pin
(flash, efficient, cudnn, math), and torch's own choice (auto), timed on its own at every attention shape
the fused ControlNet+UNet step runs at one latent size: self-attention and cross-attention to the 77 text
tokens at head size 40, 80 and 160 (one per resolution level, 8 heads, CFG batch 2). A kernel that cannot
take a shape is recorded with torch's reason. The table names the fastest kernel per shape and per head
size, weighted by how often the step runs each shape: the data for pinning a kernel per head size (issue
#20) rather than one for all.

    python -m benchmarks.sdpa --device cuda --dtype fp16               # contest shape: 256x384 -> 32x48 latents
    python -m benchmarks.sdpa --device cpu --dtype fp32 --height 64 --width 64 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sdcn_trt.config import CONTEST_HEIGHT, CONTEST_WIDTH
from sdcn_trt.engines.fast_ops import SDPA_BACKENDS, sdpa_backend
from sdcn_trt.scoring.latency import measure

KERNELS = ("auto", *SDPA_BACKENDS)  # auto: torch picks, as the unpinned pipeline does
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
CALLS_PER_SAMPLE = 10  # calls between two synchronisations: a call is microseconds, a sync is not free
# SD1.5: 320 / 640 / 1280 channels at levels 0 / 1 / 2 and the middle block (level 3), 8 heads each.
# Transformer blocks per fused step: the UNet's 2 down + 3 up per level and 1 in the middle, the
# ControlNet's 2 down per level and 1 in the middle; each block runs one self- and one cross-attention.
LEVELS = ((0, 320, 5 + 2), (1, 640, 5 + 2), (2, 1280, 5 + 2), (3, 1280, 1 + 1))  # (level, channels, blocks)


@dataclass(frozen=True)
class AttentionShape:
    name: str
    batch: int
    heads: int
    q_len: int
    kv_len: int
    head_dim: int
    count: int  # calls per fused step


def sd15_attention_shapes(height: int = CONTEST_HEIGHT, width: int = CONTEST_WIDTH, batch: int = 2,
                          heads: int = 8, text_tokens: int = 77) -> list[AttentionShape]:
    """Every attention shape of one fused SD1.5 step at an image size (latents are 1/8 of it)."""
    h, w = height // 8, width // 8
    shapes = []
    for level, channels, blocks in LEVELS:
        tokens = (h >> level) * (w >> level)
        where = "middle" if level == 3 else f"level {level}"
        shapes += [AttentionShape(f"{where} self", batch, heads, tokens, tokens, channels // heads, blocks),
                   AttentionShape(f"{where} cross", batch, heads, tokens, text_tokens, channels // heads, blocks)]
    return shapes


def time_kernel(kernel: str, shape: AttentionShape, device: torch.device, dtype: torch.dtype,
                repeats: int) -> dict[str, Any]:
    """{"ms": latency statistics per call} of one kernel at one shape, or {"refused": torch's reason}."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(shape.batch, shape.heads, shape.q_len, shape.head_dim, generator=gen).to(device, dtype)
    k, v = (torch.randn(shape.batch, shape.heads, shape.kv_len, shape.head_dim, generator=gen).to(device, dtype)
            for _ in range(2))  # (B, heads, L, D)

    def call() -> torch.Tensor:
        if kernel == "auto":
            return F.scaled_dot_product_attention(q, k, v)
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(sdpa_backend(kernel)):
            return F.scaled_dot_product_attention(q, k, v)

    try:
        call()
    except RuntimeError as exc:  # "No available kernel", with torch's warnings saying why
        return {"refused": str(exc).strip().splitlines()[0]}
    def calls() -> None:
        for _ in range(CALLS_PER_SAMPLE):
            call()

    stats = measure(calls, repeats, warmup=2)
    return {"ms": {k: (v if k == "n" else v / CALLS_PER_SAMPLE) for k, v in stats.items()}}


def best(times: dict[str, dict[str, Any]]) -> str | None:
    """The pinnable kernel with the lowest median among those that took the shape (auto is not pinnable)."""
    measured = {k: t["ms"]["p50"] for k, t in times.items() if "ms" in t and k != "auto"}
    return min(measured, key=measured.__getitem__) if measured else None


def per_head_size(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Per head size: each kernel's time per fused step (median x calls, summed over that head size's
    shapes; only kernels that took all of them) and the fastest."""
    out: dict[int, dict[str, Any]] = {}
    for head_dim in sorted({r["shape"]["head_dim"] for r in rows}):
        group = [r for r in rows if r["shape"]["head_dim"] == head_dim]
        totals = {k: sum(r["times"][k]["ms"]["p50"] * r["shape"]["count"] for r in group)
                  for k in KERNELS if all("ms" in r["times"][k] for r in group)}
        pinnable = {k: t for k, t in totals.items() if k != "auto"}
        out[head_dim] = {"ms_per_step": totals, "best": min(pinnable, key=pinnable.__getitem__) if pinnable else None}
    return out


def run(device: str, dtype: str, height: int, width: int, repeats: int) -> dict[str, Any]:
    dev = torch.device(device)
    rows = []
    for shape in sd15_attention_shapes(height, width):
        times = {k: time_kernel(k, shape, dev, DTYPES[dtype], repeats) for k in KERNELS}
        rows.append({"shape": asdict(shape), "times": times, "best": best(times)})
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "device": device, "dtype": dtype, "height": height,
            "width": width, "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "rows": rows, "per_head_size": per_head_size(rows)}


def markdown(report: dict[str, Any]) -> str:
    def cell(t: dict[str, Any]) -> str:
        return f"{t['ms']['p50']:.4f}" if "ms" in t else "refused"

    lines = [f"# SDPA kernels at SD1.5's attention shapes ({report['date']})", "",
             f"{report['device']} ({report['gpu'] or 'CPU'}), {report['dtype']}, torch {report['torch']}; image "
             f"{report['height']}x{report['width']} (latents 1/8), CFG batch 2, 8 heads. Median ms per call.", "",
             "| shape | q x kv tokens | head size | calls / step | " + " | ".join(KERNELS) + " | fastest |",
             "|---|---|---:|---:|" + "---:|" * len(KERNELS) + "---|"]
    for r in report["rows"]:
        s = r["shape"]
        lines.append(f"| {s['name']} | {s['q_len']} x {s['kv_len']} | {s['head_dim']} | {s['count']} | "
                     + " | ".join(cell(r["times"][k]) for k in KERNELS) + f" | {r['best'] or '-'} |")
    lines += ["", "Per head size, ms per fused step (median x calls, summed; kernels that took every shape):", "",
              "| head size | " + " | ".join(KERNELS) + " | fastest pinnable |", "|---:|" + "---:|" * len(KERNELS) + "---|"]
    for head_dim, h in report["per_head_size"].items():
        lines.append(f"| {head_dim} | " + " | ".join(f"{h['ms_per_step'][k]:.3f}" if k in h["ms_per_step"] else "-"
                                                    for k in KERNELS) + f" | {h['best'] or '-'} |")
    refusals = sorted({f"{k}: {r['times'][k]['refused']}" for r in report["rows"] for k in KERNELS
                       if "refused" in r["times"][k]})
    if refusals:
        lines += ["", "Refused (torch's reason, first line):", ""] + [f"- {line[:200]}" for line in refusals]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="fp16", choices=tuple(DTYPES))
    parser.add_argument("--height", type=int, default=CONTEST_HEIGHT)
    parser.add_argument("--width", type=int, default=CONTEST_WIDTH)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", nargs="+", default=[str(Path(__file__).parent / "results")])
    args = parser.parse_args(argv)
    if args.height % 64 or args.width % 64:
        parser.error(f"--height and --width must be multiples of 64 (latents halve three times), "
                     f"got {args.height}x{args.width}")
    report = run(args.device, args.dtype, args.height, args.width, args.repeats)
    stem = f"sdpa-{args.device.split(':')[0]}-{args.dtype}-{time.strftime('%Y%m%d-%H%M')}"
    for folder in args.out:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{stem}.json").write_text(json.dumps(report, indent=1))
        (Path(folder) / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
