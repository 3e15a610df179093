"""Why diffusers' fp16 pipeline lands far from torch fp32 on random weights: CLIP in fp16, measured.

    python -m benchmarks.parity_gap                      # sd15-random, CPU, 2 DDIM steps
    python -m benchmarks.parity_gap --preset tiny --steps 20

diffusers runs every network in fp16, CLIP included; sdcn_trt keeps CLIP in fp32 (`fp32_only`). This
measures, on the CPU, (1) the text encoder's hidden states in fp16 against fp32 for the contest's
prompts, layer by layer: the largest fp32 magnitude (fp16 ends at 65504), NaN/Inf in fp16, the largest
difference; (2) what the fp16 text embeddings alone do to the image: the torch fp32 pipeline run
twice, once on the fp32 CLIP output and once on the fp16 CLIP output (cast back to fp32), every other
network the same — the image difference is CLIP fp16's share of the gap.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

FP16_MAX = float(torch.finfo(torch.float16).max)


def clip_fp16_vs_fp32(components: Any, prompts: list[str]) -> dict[str, Any]:
    """Per hidden state of the text encoder (embeddings, each layer, final norm): fp32 max |h|, fp16
    NaN/Inf count, max |fp16 - fp32| and its ratio to the fp32 state's largest magnitude."""
    from sdcn_trt.models.tokenizer import tokenize

    ids = tokenize(components.tokenizer, prompts)  # (P, 77)
    states = {}
    for dtype in (torch.float32, torch.float16):
        encoder = copy.deepcopy(components.text_encoder).to(dtype)
        with torch.inference_mode():
            out = encoder(ids, output_hidden_states=True)
        states[dtype] = [*out.hidden_states, out.last_hidden_state]  # (P, 77, D) each
    layers = []
    for i, (h32, h16) in enumerate(zip(states[torch.float32], states[torch.float16], strict=True)):
        name = "embeddings" if i == 0 else "final_layer_norm" if i == len(states[torch.float32]) - 1 else f"layer {i}"
        finite = torch.isfinite(h16)
        diff = (h16.float() - h32).abs()[finite]
        peak = float(h32.abs().max())
        layers.append({"state": name, "fp32_max_abs": peak, "fp16_nonfinite": int((~finite).sum()),
                       "max_abs_diff": float(diff.max()) if diff.numel() else float("nan"),
                       "max_diff_over_peak": float(diff.max()) / peak if diff.numel() and peak else float("nan")})
    return {"layers": layers, "embeddings_fp16": states[torch.float16][-1].float()}


def image_effect(components: Any, embeddings_fp16: torch.Tensor, steps: int) -> dict[str, Any]:
    """The torch fp32 pipeline on the contest's cat with fp32 CLIP, then with fp16 CLIP's output:
    mean / max |difference| of the uint8 images."""
    from sdcn_trt import BackendConfig, ControlNetPipeline, GenerationConfig
    from sdcn_trt.images import sample_photos

    pipe = ControlNetPipeline(components, BackendConfig(backend="torch", device="cpu", precision="fp32"))
    photo = sample_photos(["chelsea"])["chelsea"]
    config = GenerationConfig(ddim_steps=steps)
    reference = pipe.run(photo, config).images[0]
    key = (config.positive_prompt, config.n_prompt)
    assert key in pipe._text_cache, "the pipeline caches CLIP per (positive, negative) prompt pair"
    pipe._text_cache[key] = embeddings_fp16  # rows [negative, positive], as encode_prompts orders them
    swapped = pipe.run(photo, config).images[0]
    diff = np.abs(reference.astype(np.int16) - swapped.astype(np.int16))
    return {"steps": steps, "mean": float(diff.mean()), "max": int(diff.max())}


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# CLIP in fp16 against fp32 ({report['preset']}, CPU), {report['date']}", "",
             "The contest's prompts [negative, positive] through the text encoder in each precision "
             f"(torch {report['torch']}, transformers {report['transformers']}). fp16 ends at {FP16_MAX:.0f}.", "",
             "| hidden state | fp32 max abs | fp16 NaN/Inf | max abs diff | max diff / fp32 max |", "|---|---|---|---|---|"]
    lines += [f"| {r['state']} | {r['fp32_max_abs']:.4g} | {r['fp16_nonfinite']} | {r['max_abs_diff']:.4g} | "
              f"{r['max_diff_over_peak']:.3g} |" for r in report["clip"]]
    effect = report.get("image")
    if effect:
        lines += ["", f"Image effect (torch fp32 pipeline, everything else fixed, {effect['steps']} DDIM steps): fp16 "
                  f"CLIP's embeddings move the image by **{effect['mean']:.2f} levels mean, {effect['max']} max** "
                  "from the fp32 CLIP image."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="sd15-random")
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps of the image comparison (0: skip it)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    import transformers

    from sdcn_trt import GenerationConfig
    from sdcn_trt.models.presets import load_preset

    components = load_preset(args.preset, seed=0)
    config = GenerationConfig()
    clip = clip_fp16_vs_fp32(components, [config.n_prompt, config.positive_prompt])
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "preset": args.preset, "torch": torch.__version__,
                              "transformers": transformers.__version__, "clip": clip["layers"]}
    if args.steps:
        report["image"] = image_effect(components, clip["embeddings_fp16"], args.steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"parity-gap-{args.preset}-cpu"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
