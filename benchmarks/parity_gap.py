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


def levels(image: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """Mean / max |difference| of two uint8 images in levels."""
    diff = np.abs(image.astype(np.int16) - reference.astype(np.int16))
    return {"mean": float(diff.mean()), "max": int(diff.max())}


def image_effects(components: Any, embeddings_fp16: torch.Tensor, steps: int, diffusers_fp16: bool,
                  device: str = "cpu") -> dict[str, Any]:
    """Images on the contest's cat against the torch fp32 pipeline's (levels): ours with fp16 CLIP's
    output, diffusers fp32, diffusers fp16 and diffusers fp16 given fp32 CLIP's output (prompt_embeds)."""
    from benchmarks.baseline_diffusers import build_diffusers, diffusers_image
    from sdcn_trt import BackendConfig, ControlNetPipeline, GenerationConfig
    from sdcn_trt.images import sample_photos

    pipe = ControlNetPipeline(components, BackendConfig(backend="torch", device=device, precision="fp32"))
    photo = sample_photos(["chelsea"])["chelsea"]
    config = GenerationConfig(ddim_steps=steps)
    reference = pipe.run(photo, config).images[0]
    key = (config.positive_prompt, config.n_prompt)
    assert key in pipe._text_cache, "the pipeline caches CLIP per (positive, negative) prompt pair"
    embeddings_fp32 = pipe._text_cache[key]  # (2, 77, D) [negative, positive]
    pipe._text_cache[key] = embeddings_fp16.to(embeddings_fp32.device)
    rows = {"ours, CLIP fp16": levels(pipe.run(photo, config).images[0], reference)}

    def uint8(floats: np.ndarray) -> np.ndarray:
        return (np.nan_to_num(floats, nan=0.0).clip(0, 1) * 255).astype(np.uint8)  # truncation, as ours

    for dtype in (torch.float32, torch.float16) if diffusers_fp16 else (torch.float32,):
        name = "fp32" if dtype == torch.float32 else "fp16"
        theirs = build_diffusers(components, device, dtype)
        rows[f"diffusers {name}"] = levels(uint8(diffusers_image(theirs, photo, config)), reference)
        if dtype == torch.float16:
            given = {"negative_prompt_embeds": embeddings_fp32[:1].to(dtype), "prompt_embeds": embeddings_fp32[1:].to(dtype)}
            rows["diffusers fp16, CLIP fp32"] = levels(uint8(diffusers_image(theirs, photo, config, **given)), reference)
        del theirs
    return {"steps": steps, "against": "sdcn_trt torch fp32", "rows": rows}


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# The diffusers fp16 parity gap: CLIP in fp16 against fp32 ({report['preset']}), {report['date']}", "",
             "The contest's prompts [negative, positive] through the text encoder in each precision "
             f"(torch {report['torch']}, transformers {report['transformers']}). fp16 ends at {FP16_MAX:.0f}.", "",
             "| hidden state | fp32 max abs | fp16 NaN/Inf | max abs diff | max diff / fp32 max |", "|---|---|---|---|---|"]
    lines += [f"| {r['state']} | {r['fp32_max_abs']:.4g} | {r['fp16_nonfinite']} | {r['max_abs_diff']:.4g} | "
              f"{r['max_diff_over_peak']:.3g} |" for r in report["clip"]]
    effect = report.get("image")
    if effect:
        lines += ["", f"Images ({report.get('device', 'cpu')}) against sdcn_trt's torch fp32 image (the contest's cat, {effect['steps']} DDIM steps, "
                  "same weights, seed and prompts; uint8 levels):", "", "| image | mean | max |", "|---|---|---|"]
        lines += [f"| {name} | {v['mean']:.2f} | {v['max']} |" for name, v in effect["rows"].items()]
        rows = effect["rows"]
        if "diffusers fp16" in rows and "diffusers fp16, CLIP fp32" in rows:
            whole, without = rows["diffusers fp16"]["mean"], rows["diffusers fp16, CLIP fp32"]["mean"]
            lines += ["", f"CLIP in fp16 accounts for {whole - without:.2f} of diffusers fp16's {whole:.2f} levels "
                      f"(mean); the other {without:.2f} come from its fp16 UNet / ControlNet / VAE / scheduler path "
                      f"(ours in fp16 keeps latents and the DDIM update in fp32)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="sd15-random")
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps of the image comparison (0: skip it)")
    parser.add_argument("--diffusers-fp16", action="store_true",
                        help="also diffusers in fp16 (on a CPU this takes very long: its fp16 kernels are slow)")
    parser.add_argument("--device", default="cpu", help="where the images are made (CLIP is compared on the CPU)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    import transformers

    from sdcn_trt import GenerationConfig
    from sdcn_trt.models.presets import load_preset

    components = load_preset(args.preset, seed=0)
    config = GenerationConfig()
    clip = clip_fp16_vs_fp32(components, [config.n_prompt, config.positive_prompt])
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "preset": args.preset, "device": args.device,
                              "torch": torch.__version__,
                              "transformers": transformers.__version__, "clip": clip["layers"]}
    if args.steps:
        report["image"] = image_effects(components, clip["embeddings_fp16"], args.steps, args.diffusers_fp16,
                                        args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"parity-gap-{args.preset}-{args.device.split(':')[0]}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
