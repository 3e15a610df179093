"""Compare sdcn_trt's torch backend with the original lllyasviel/ControlNet code, image for image.

The original code is not part of this project. Point this script at a checkout of it and at a
Python environment that can run it (torch, pytorch-lightning 1.9, omegaconf, einops,
transformers < 5, open_clip_torch, opencv); the script then:
  1. writes a preset (--preset: tiny, or tiny-trained, the small model trained here) as an
     ldm-layout checkpoint + cldm-style YAML + CLIP folder,
  2. runs the original canny2image steps (their resize_image/HWC3/Canny, seed_everything,
     get_learned_conditioning, control_scales, DDIMSampler.sample, decode_first_stage) on the CPU
     in that environment,
  3. loads the same checkpoint with `ControlNetPipeline.from_single_file` and runs `process()`,
  4. writes per-case differences (uint8 levels) to JSON and Markdown.

    python scripts/reference_parity.py --controlnet-repo /path/to/ControlNet \
        --reference-python /path/to/refenv/bin/python --out benchmarks/results/reference_parity
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CASES = [
    dict(name="contest", sample="astronaut", prompt="a bird", guess_mode=False, strength=1.0, scale=9.0,
         seed=2946901, eta=0.0, ddim_steps=20),
    dict(name="guess_mode", sample="chelsea", prompt="a cat", guess_mode=True, strength=1.0, scale=9.0,
         seed=12345, eta=0.0, ddim_steps=20),
    dict(name="eta_0.5", sample="coffee", prompt="a cup of coffee", guess_mode=False, strength=0.8, scale=7.5,
         seed=777, eta=0.5, ddim_steps=20),
    dict(name="guess_eta_7steps", sample="rocket", prompt="a rocket", guess_mode=True, strength=1.2, scale=5.0,
         seed=42, eta=1.0, ddim_steps=7),
    dict(name="scale_1", sample="astronaut", prompt="a person", guess_mode=False, strength=1.0, scale=1.0,
         seed=2946901, eta=0.0, ddim_steps=10),
]
COMMON = dict(a_prompt="best quality, extremely detailed",
              n_prompt="longbody, lowres, bad anatomy, bad hands, missing fingers",
              num_samples=1, image_resolution=256, low_threshold=100, high_threshold=200)


def run_reference(work: Path) -> None:
    """Worker mode, inside the reference environment: the original code's canny2image steps."""
    import einops
    import torch
    from annotator.canny import CannyDetector
    from annotator.util import HWC3, resize_image
    from cldm.ddim_hacked import DDIMSampler
    from cldm.model import create_model, load_state_dict
    from pytorch_lightning import seed_everything

    def register_buffer_cpu(self, name, attr):  # the original moves every table to "cuda"
        setattr(self, name, attr)

    DDIMSampler.register_buffer = register_buffer_cpu
    model = create_model(str(work / "model.yaml")).cpu()
    result = model.load_state_dict(load_state_dict(str(work / "model.safetensors"), location="cpu"), strict=False)
    schedule = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "logvar",
                "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                "posterior_mean_coef1", "posterior_mean_coef2"}  # buffers the model computes itself
    assert not result.unexpected_keys and set(result.missing_keys) <= schedule, result
    model.cond_stage_model.device = "cpu"
    model.eval()
    sampler = DDIMSampler(model)
    images = np.load(work / "inputs.npz")
    cases = json.loads((work / "cases.json").read_text())
    results = {}
    for case in cases:
        c = {**COMMON, **case}
        with torch.no_grad():
            img = resize_image(HWC3(images[c["sample"]]), c["image_resolution"])
            H, W, _ = img.shape
            detected_map = HWC3(CannyDetector()(img, c["low_threshold"], c["high_threshold"]))
            control = torch.from_numpy(detected_map.copy()).float() / 255.0
            control = torch.stack([control for _ in range(c["num_samples"])], dim=0)
            control = einops.rearrange(control, "b h w c -> b c h w").clone()
            seed_everything(c["seed"])
            cond = {"c_concat": [control], "c_crossattn": [
                model.get_learned_conditioning([c["prompt"] + ", " + c["a_prompt"]] * c["num_samples"])]}
            un_cond = {"c_concat": None if c["guess_mode"] else [control],
                       "c_crossattn": [model.get_learned_conditioning([c["n_prompt"]] * c["num_samples"])]}
            model.control_scales = ([c["strength"] * (0.825 ** float(12 - i)) for i in range(13)]
                                    if c["guess_mode"] else [c["strength"]] * 13)
            t0 = time.perf_counter()
            samples, _ = sampler.sample(c["ddim_steps"], c["num_samples"], (4, H // 8, W // 8), cond, verbose=False,
                                        eta=c["eta"], unconditional_guidance_scale=c["scale"],
                                        unconditional_conditioning=un_cond)
            x = model.decode_first_stage(samples)
            x = (einops.rearrange(x, "b c h w -> b h w c") * 127.5 + 127.5).cpu().numpy().clip(0, 255).astype(np.uint8)
            results[case["name"]] = x[0]
            results[case["name"] + "__map"] = 255 - detected_map
            results[case["name"] + "__seconds"] = np.array(time.perf_counter() - t0)
    np.savez(work / "reference.npz", **results)


def prepare(work: Path, preset: str) -> None:
    """Driver: write the preset in ldm layout, its YAML, a CLIP folder, inputs and cases."""
    import skimage.data
    import yaml

    from sdcn_trt.models.ldm_layout import original_config_for, save_single_file
    from sdcn_trt.models.presets import load_preset
    from sdcn_trt.models.tokenizer import write_clip_tokenizer_files

    components = load_preset(preset)
    clip_dir = work / "clip"
    write_clip_tokenizer_files(clip_dir)  # plain vocab.json + merges.txt: every transformers version reads them
    components.text_encoder.config.to_json_file(str(clip_dir / "config.json"))
    # transformers 4 (the reference's) loads weights from the folder before the checkpoint overrides them
    from safetensors.torch import save_file

    save_file({"text_model." + k: v.contiguous() for k, v in components.text_encoder.state_dict().items()},
              str(clip_dir / "model.safetensors"))
    save_single_file(components, work / "model.safetensors")
    config = original_config_for(components, clip_version=str(clip_dir))
    (work / "model.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    samples = {c["sample"] for c in CASES}
    np.savez(work / "inputs.npz", **{s: getattr(skimage.data, s)()[:, :, :3] for s in samples})
    (work / "cases.json").write_text(json.dumps(CASES))


def compare(work: Path) -> list[dict]:
    from sdcn_trt import ControlNetPipeline

    pipe = ControlNetPipeline.from_single_file(work / "model.safetensors", original_config=work / "model.yaml")
    reference = np.load(work / "reference.npz")
    inputs = np.load(work / "inputs.npz")
    rows = []
    for case in CASES:
        c = {**COMMON, **case}
        t0 = time.perf_counter()
        out = pipe.process(inputs[c["sample"]], c["prompt"], c["a_prompt"], c["n_prompt"], c["num_samples"],
                           c["image_resolution"], c["ddim_steps"], c["guess_mode"], c["strength"], c["scale"],
                           c["seed"], c["eta"], c["low_threshold"], c["high_threshold"])
        seconds = time.perf_counter() - t0
        ref = reference[case["name"]].astype(np.int16)
        diff = np.abs(out[1].astype(np.int16) - ref)
        rows.append(dict(
            case=case["name"], shape=list(ref.shape), max_abs_diff=int(diff.max()), mean_abs_diff=float(diff.mean()),
            pixels_differing=float((diff > 0).mean()), canny_map_equal=bool(np.array_equal(out[0], reference[case["name"] + "__map"])),
            image_std=float(ref.std()), reference_seconds=float(reference[case["name"] + "__seconds"]),
            sdcn_seconds=seconds, settings={k: c[k] for k in ("guess_mode", "strength", "scale", "seed", "eta", "ddim_steps")},
        ))
    return rows


def write_report(rows: list[dict], out: Path, preset: str) -> None:
    import platform

    import torch

    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(date=time.strftime("%Y-%m-%d"), machine=platform.platform(), processor=platform.processor(),
                torch=torch.__version__, model=f"{preset} preset{' (seed 0)' if preset == 'tiny' else ''}, fp32, CPU")
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "cases": rows}, indent=1))
    lines = [f"# sdcn_trt torch backend vs the original ControlNet code ({meta['date']})", "",
             f"{meta['model']}; torch {meta['torch']}; {meta['machine']}", "",
             "| case | settings | max abs diff | mean abs diff | pixels differing | canny map equal |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        s = r["settings"]
        lines.append(f"| {r['case']} | guess={s['guess_mode']} strength={s['strength']} scale={s['scale']} "
                     f"eta={s['eta']} steps={s['ddim_steps']} seed={s['seed']} | {r['max_abs_diff']} | "
                     f"{r['mean_abs_diff']:.4f} | {100 * r['pixels_differing']:.2f}% | {r['canny_map_equal']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--controlnet-repo", required=True, help="checkout of lllyasviel/ControlNet")
    parser.add_argument("--reference-python", default=sys.executable, help="python that can run the original code")
    parser.add_argument("--out", default="benchmarks/results/reference_parity", help="report path, no suffix")
    parser.add_argument("--preset", default="tiny", help="tiny (random weights) or tiny-trained (trained here)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sys.path.insert(0, args.controlnet_repo)
        run_reference(Path(args.worker))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, args.preset)
        env = {**os.environ, "PYTHONPATH": args.controlnet_repo}
        subprocess.run([args.reference_python, __file__, "--controlnet-repo", args.controlnet_repo,
                        "--worker", str(work)], check=True, env=env, cwd=args.controlnet_repo)
        rows = compare(work)
    write_report(rows, Path(args.out), args.preset)
    for r in rows:
        print(f"{r['case']:>18}: max |diff| {r['max_abs_diff']} levels, mean {r['mean_abs_diff']:.4f}, "
              f"{100 * r['pixels_differing']:.2f}% pixels differ, canny equal: {r['canny_map_equal']}")
    return 0 if all(r["max_abs_diff"] <= 1 and r["canny_map_equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
