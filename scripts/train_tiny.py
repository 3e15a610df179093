"""Train the `tiny-trained` preset on the CPU: a small model with SD1.5 + ControlNet's structure that
really denoises, trained on scikit-image's photos and drawn scenes (not SD1.5; it knows only these).

    python scripts/train_tiny.py             # the shipped model's recipe, seeded: 70 min on 2 shared cores
                                             # (data + VAE 26, UNet + ControlNet 43)
    python scripts/train_tiny.py --vae-from sdcn_trt/models/tiny_trained   # reuse the shipped VAE: ~45 min
    python scripts/train_tiny.py --init-from DIR --max-minutes 45          # fine-tune a preset, stop at 45 min
    python scripts/train_tiny.py --smoke     # a few-minute run into the temp folder that checks the plumbing

In order:
  0. the data (benchmarks/tiny_data.py): variants of scikit-image's photos (resized as the reference
     resizes, at resolution 256 or 320, mirrored, colours jittered; two photos held out) and drawn
     scenes (shapes, lines, words in named colours) whose captions name their colours;
  1. an AutoencoderKL (f = 8, 4 latent channels) on random 64-pixel crops of the photo variants and
     of as many scenes: L1 + a tiny KL term, the
     posterior starting nearly deterministic (log-variance bias -10); then
     its latent scale is folded into its weights so SD1.5's scaling factor 0.18215 gives unit-variance
     latents, and its weights are rounded to fp16 (what the preset file stores);
  2. a UNet2DConditionModel + ControlNetModel on the frozen VAE's latents (half of each batch whole
     scenes, half photo crops), with the canny maps (the reference's preprocessing) as control and the captions encoded by the tiny
     preset's frozen random CLIP: DDPM epsilon objective on the reference's scaled_linear schedule
     (0.00085..0.012, 1000 steps), loss weights min(1 + 1/SNR, 20) (x0 errors count at high noise),
     half of each batch at t >= 500 (where only the control and caption tell the picture), captions
     dropped to "" or the default negative prompt 15 % of the time (classifier-free guidance),
     control dropped 10 % (guess mode's unconditional half), EMA weights; the ControlNet's hint
     encoder initialised on training controls (LSUV: with PyTorch's default init the canny map
     reaches the network ~1000x weaker than the latents, and training learns to ignore it);
     first 128-pixel crops (16x16 latents), then a few 256-pixel crops;
  3. the preset (fp16 safetensors + config.json) into sdcn_trt/models/tiny_trained/, the same model
     as an ldm single file + YAML into --ldm-dir, sample sheets, and a Markdown log.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# OpenMP threads that spin while they wait run ~5x slower when the cores are shared with other
# work (measured here); they must sleep instead. Set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdcn_trt import preprocess  # noqa: E402
from sdcn_trt.models.components import SD15_SCALING_FACTOR, Components  # noqa: E402
from sdcn_trt.config import GenerationConfig  # noqa: E402
from sdcn_trt.images import PHOTO_PROMPTS, contact_sheet, sample_photos, save_image  # noqa: E402
from sdcn_trt.models.presets import (  # noqa: E402
    TRAINED_PRESETS, build_from_configs, load_preset, load_trained_preset, save_trained_preset, trained_configs,
)
from benchmarks.tiny_data import (  # noqa: E402
    HELD_OUT_PHOTOS, TRAINING_PHOTOS, Picture, photo_pictures, scene_pictures, training_scene_seeds,
)

A_PROMPT, N_PROMPT = GenerationConfig.a_prompt, GenerationConfig.n_prompt
RESOLUTIONS = (256, 320)  # short side after resize_image, as the pipeline resizes at these resolutions
CANNY = (100, 200)  # the contest's thresholds


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def round_to_fp16(module: torch.nn.Module) -> None:
    """What the preset file stores: train later phases against exactly the shipped weights."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())


class LossLog:
    """Mean loss per window of steps: printed, and kept for the Markdown log."""

    def __init__(self, phase: str, every: int):
        self.phase, self.every, self.window, self.rows = phase, every, [], []
        self.stopped_at: int | None = None  # the step a wall-clock budget stopped the phase at
        self.clock = time.perf_counter()

    def add(self, step: int, loss: float, bar: tqdm) -> None:
        self.window.append(loss)
        bar.set_postfix(loss=f"{np.mean(self.window[-20:]):.4f}")
        if (step + 1) % self.every == 0:
            self.rows.append((step + 1, float(np.mean(self.window))))
            seconds = (time.perf_counter() - self.clock) / len(self.window)
            tqdm.write(f"[{self.phase}] step {step + 1}: loss {self.rows[-1][1]:.4f} ({seconds:.2f} s/step)")
            self.window, self.clock = [], time.perf_counter()


# -- 1. VAE ------------------------------------------------------------------------------------------
def pixel_crops(variants: list[Picture], rng: np.random.Generator, size: int, batch: int) -> torch.Tensor:
    crops = []
    for _ in range(batch):
        v = variants[rng.integers(len(variants))]
        y, x = rng.integers(v.image.shape[0] - size + 1), rng.integers(v.image.shape[1] - size + 1)
        crops.append(v.image[y:y + size, x:x + size])
    pixels = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, S, S)
    return pixels.contiguous()


def train_vae(vae: torch.nn.Module, variants: list[Picture], rng: np.random.Generator, args) -> LossLog:
    vae.train().requires_grad_(True)
    with torch.no_grad():  # start nearly deterministic: early reconstructions are not drowned in sampling noise
        vae.quant_conv.bias[vae.config.latent_channels:] = -10.0
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    log = LossLog("vae", args.log_every)
    bar = tqdm(range(args.vae_steps), desc="1/2 VAE", unit="step", dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.vae_steps, args.vae_lr, 50)
        x = pixel_crops(variants, rng, args.vae_crop, args.vae_batch)  # (B, 3, S, S) in [-1, 1]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = (recon - x).abs().mean() + args.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        log.add(step, float(loss), bar)
    vae.eval().requires_grad_(False)
    return log


def to_pixels(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1.0  # (1, 3, H, W)


@torch.no_grad()
def fold_latent_scale(vae: torch.nn.Module, variants: list[Picture]) -> float:
    """Scale the posterior so that latents * 0.18215 have unit variance over the training pictures:
    quant_conv's mean rows (and the log-variance bias) up, post_quant_conv's inputs down by the same."""
    means = [vae.encode(to_pixels(v.image)).latent_dist.mean for v in variants]
    raw_std = float(torch.cat([m.flatten() for m in means]).std())
    c = 1.0 / (SD15_SCALING_FACTOR * raw_std)
    channels = vae.config.latent_channels
    vae.quant_conv.weight[:channels] *= c
    vae.quant_conv.bias[:channels] *= c
    vae.quant_conv.bias[channels:] += 2 * math.log(c)
    vae.post_quant_conv.weight /= c  # (out, in, 1, 1): every input channel
    return raw_std


# -- 2. UNet + ControlNet ------------------------------------------------------------------------------
@torch.no_grad()
def encode_texts(components: Components, captions: list[str]) -> dict[str, torch.Tensor]:
    """The frozen CLIP's hidden states (77, D) of "", the default negative prompt, and each caption
    alone and with the default added prompt, as the pipeline builds them."""
    from sdcn_trt.models.tokenizer import tokenize

    prompts = ["", N_PROMPT] + [p for c in dict.fromkeys(captions) for p in (c, f"{c}, {A_PROMPT}")]
    states = []
    for i in range(0, len(prompts), 64):
        chunk = prompts[i:i + 64]
        states.append(components.text_encoder(tokenize(components.tokenizer, chunk)).last_hidden_state)  # (n, 77, D)
    return dict(zip(prompts, torch.cat(states)))


@dataclass
class LatentPicture:
    mean: torch.Tensor  # (4, h, w), already times the scaling factor
    std: torch.Tensor  # (4, h, w)
    control: torch.Tensor  # (1, 8h, 8w) uint8: the canny map (its three channels are equal)
    caption: str
    scene: bool


@torch.no_grad()
def encode_pictures(vae: torch.nn.Module, pictures: list[Picture], scene: bool, desc: str) -> list[LatentPicture]:
    """The VAE posterior of each picture, encoded 16 at a time among pictures of one size."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, v in enumerate(pictures):
        by_shape.setdefault(v.image.shape, []).append(i)
    chunks = [ids[k:k + 16] for ids in by_shape.values() for k in range(0, len(ids), 16)]
    out: list[LatentPicture | None] = [None] * len(pictures)
    with tqdm(total=len(pictures), desc=f"encode {desc}", unit="picture", dynamic_ncols=True) as bar:
        for ids in chunks:
            dist = vae.encode(torch.cat([to_pixels(pictures[i].image) for i in ids])).latent_dist  # (n, 4, h, w)
            for k, i in enumerate(ids):
                v = pictures[i]
                control = torch.from_numpy(np.ascontiguousarray(v.control[None, :, :, 0]))  # (1, H, W) uint8
                out[i] = LatentPicture(dist.mean[k] * SD15_SCALING_FACTOR, dist.std[k] * SD15_SCALING_FACTOR,
                                       control, v.caption, scene)
            bar.update(len(ids))
    return [p for p in out if p is not None]


@torch.no_grad()
def wake_control_path(controlnet: torch.nn.Module, control: torch.Tensor, latents: torch.Tensor) -> list[float]:
    """Data-dependent initialisation of the ControlNet's hint encoder (LSUV, Mishkin & Matas 2016).

    With PyTorch's default init every conv of the hint encoder shrinks its input's spread ~2x, and a
    canny map is mostly zeros: the embedding that is added to conv_in(latents) varies ~1e-3 between
    control images while conv_in(latents) varies ~0.5, so the control is invisible to the network and
    training learns to ignore it. Each conv in turn is rescaled so that its output has unit spread on
    training controls, and the last one so that the embedding spreads like conv_in(latents).
    control (B, 3, 8h, 8w) in [0, 1]; latents (B, 4, h, w). Returns the spreads before rescaling."""
    embedding = controlnet.controlnet_cond_embedding
    convs = [embedding.conv_in, *embedding.blocks, embedding.conv_out]
    target = float(controlnet.conv_in(latents).std())
    before = []
    for k, conv in enumerate(convs):
        seen: list[torch.Tensor] = []
        hook = conv.register_forward_hook(lambda _m, _i, out: seen.append(out))
        embedding(control)
        hook.remove()
        spread = float(seen[0].std())
        before.append(spread)
        conv.weight.mul_((target if k == len(convs) - 1 else 1.0) / spread)
        conv.bias.mul_((target if k == len(convs) - 1 else 1.0) / spread)
    return before


def diffusion_batch(pictures: list[LatentPicture], texts: dict[str, torch.Tensor], rng: np.random.Generator,
                    crop: int, batch: int, args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents (B, 4, c, c), control (B, 3, 8c, 8c), text (B, 77, D), keep_control (B,)).
    A share args.p_scene of the batch are whole drawn scenes of the crop's size (their captions name
    what is drawn, so they are never cropped), the rest random crops of photo variants."""
    photos = [p for p in pictures if not p.scene and min(p.mean.shape[1:]) >= crop]
    scenes = [p for p in pictures if p.scene and p.mean.shape[1:] == (crop, crop)]
    latents, controls, states, keep = [], [], [], []
    for _ in range(batch):
        pool = scenes if scenes and (not photos or rng.random() < args.p_scene) else photos
        p = pool[rng.integers(len(pool))]
        y, x = rng.integers(p.mean.shape[1] - crop + 1), rng.integers(p.mean.shape[2] - crop + 1)
        window = (slice(None), slice(y, y + crop), slice(x, x + crop))
        latents.append(p.mean[window] + p.std[window] * torch.randn(p.std[window].shape))
        control = p.control[:, 8 * y:8 * (y + crop), 8 * x:8 * (x + crop)].float() / 255.0  # (1, 8c, 8c)
        controls.append(control.expand(3, -1, -1))
        caption = p.caption
        if rng.random() < args.p_uncond:
            prompt = ("", N_PROMPT)[rng.integers(2)]
        else:
            prompt = (caption, f"{caption}, {A_PROMPT}")[rng.integers(2)]
        states.append(texts[prompt])
        keep.append(float(rng.random() >= args.p_no_control))
    return torch.stack(latents), torch.stack(controls), torch.stack(states), torch.tensor(keep)


def train_diffusion(components: Components, pictures: list[LatentPicture], texts: dict[str, torch.Tensor],
                    rng: np.random.Generator, args, on_phase_end) -> list[LossLog]:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    alphas_cumprod = scheduler.alphas_cumprod  # (1000,)
    unet, controlnet = components.unet, components.controlnet
    params = [*unet.parameters(), *controlnet.parameters()]
    for module in (unet, controlnet):
        module.train().requires_grad_(True)
    if args.control_init == "lsuv" and not args.init_from:
        z0, control, _, _ = diffusion_batch(pictures, texts, rng, 16, 32, args)
        spreads = wake_control_path(controlnet, control, z0)
        tqdm.write("hint encoder: conv output spreads before rescaling " + ", ".join(f"{x:.2f}" for x in spreads))
    ema = [p.detach().clone() for p in params]
    # the ControlNet learns faster than the UNet: it must carry the layout before the UNet settles on texture
    groups = [{"params": list(unet.parameters()), "scale": 1.0},
              {"params": list(controlnet.parameters()), "scale": args.controlnet_lr_scale}]
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.01)
    phases = [("2a UNet+CN 128px", args.steps_128, args.batch_128, 16),
              ("2b UNet+CN 256px", args.steps_256, args.batch_256, 32)]
    total, step, logs = args.steps_128 + args.steps_256, 0, []
    # a wall-clock budget (--max-minutes) is shared by the phases in proportion to their pixels per
    # step x steps; the learning rate follows whichever of steps and time is further along, so a run
    # cut short by the clock still ends its cosine decay
    cost = [steps * batch * crop * crop for _, steps, batch, crop in phases]
    budgets = [args.max_minutes * 60 * c / max(1, sum(cost)) if args.max_minutes else math.inf for c in cost]
    for (desc, steps, batch, crop), budget in zip(phases, budgets):
        if steps == 0:
            continue
        log = LossLog(desc.split()[0], args.log_every)
        bar = tqdm(range(steps), desc=desc, unit="step", dynamic_ncols=True)
        phase_start, phase_first = time.perf_counter(), step
        for i in bar:
            elapsed = time.perf_counter() - phase_start
            if elapsed >= budget:
                tqdm.write(f"[{desc.split()[0]}] wall-clock budget {budget / 60:.1f} min reached after {i} of {steps} steps")
                log.stopped_at = i
                break
            # progress through this phase by steps or by time, whichever is further
            done = max((step - phase_first) / steps, elapsed / budget)
            virtual = int(phase_first + done * steps)
            for group in opt.param_groups:
                group["lr"] = lr_at(virtual, total, args.lr, 100) * group["scale"]
            z0, control, text, keep = diffusion_batch(pictures, texts, rng, crop, batch, args)
            noise = torch.randn_like(z0)
            # a share of the batch at high noise, where only the control and the caption tell the picture
            high = int(round(batch * args.p_high_noise))
            t = torch.cat([torch.randint(args.high_noise_from, 1000, (high,)), torch.randint(0, 1000, (batch - high,))])
            zt = scheduler.add_noise(z0, noise, t)  # sqrt(a_t) z0 + sqrt(1 - a_t) eps
            down, mid = controlnet(zt, t, encoder_hidden_states=text, controlnet_cond=control, return_dict=False)
            mask = keep[:, None, None, None]  # 0: no control, as guess mode's unconditional half
            pred = unet(zt, t, encoder_hidden_states=text, down_block_additional_residuals=[d * mask for d in down],
                        mid_block_additional_residual=mid * mask).sample
            # Epsilon MSE weighted by 1 + 1/SNR (what v-prediction's loss weighs; x0 errors count as much
            # as noise errors), capped: plain epsilon MSE at high noise is ~0.01 however wrong the
            # predicted picture is, so without it the network learns texture and ignores the control.
            snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
            weight = (1 + 1 / snr).clamp(max=args.weight_cap)
            loss = (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            decay = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
            log.add(i, float(loss.detach()), bar)
            step += 1
        logs.append(log)
        with torch.no_grad():  # sample with the EMA weights, then go on training the live ones
            live = [p.detach().clone() for p in params]
            torch._foreach_copy_(params, ema)
            on_phase_end(desc.split()[0])
            torch._foreach_copy_(params, live)
    with torch.no_grad():
        torch._foreach_copy_(params, ema)
    for module in (unet, controlnet):
        module.eval().requires_grad_(False)
    return logs


def steps_run(logs: list[LossLog], index: int, planned: int) -> int:
    """Steps a phase ran: all planned, or where a wall-clock budget stopped it."""
    if index >= len(logs) or logs[index].stopped_at is None:
        return planned
    return logs[index].stopped_at


def reused_vae_record(folder: Path) -> dict:
    """How the VAE of an earlier preset was trained, from its config.json (what this run's log repeats)."""
    import json

    training = json.loads((Path(folder) / "config.json").read_text()).get("training", {})
    return training.get("vae") or {"steps": training.get("steps", {}).get("vae"),
                                   "final_loss": training.get("final_losses", {}).get("vae")}


# -- 3. samples, files, log ----------------------------------------------------------------------------
def sample_sheet(components: Components, path: Path, names: list[str], steps: int,
                 scenes: list[Picture] = ()) -> Path:
    """input | canny | generated (the contest call with the caption) per photo, then per drawn scene."""
    from sdcn_trt import ControlNetPipeline

    for module in components.modules().values():
        module.eval()
    pipe = ControlNetPipeline(components, "torch")
    rows = []
    inputs = [(photo, PHOTO_PROMPTS[name]) for name, photo in sample_photos(names).items()]
    for photo, caption in inputs + [(s.image, s.caption) for s in scenes]:
        out = pipe.run(photo, GenerationConfig(prompt=caption, ddim_steps=steps))
        rows.append([preprocess.resize_image(photo, 256), 255 - out.control, out.images[0]])
    pipe.close()
    return save_image(path, contact_sheet(rows, ["input", "canny", "tiny-trained"], tile=160))


@torch.no_grad()
def recon_sheet(vae: torch.nn.Module, variants: list[Picture], path: Path) -> tuple[Path, float]:
    """input | VAE reconstruction for about 8 of the pictures; returns the mean |error| in levels."""
    rows, errors = [], []
    for v in variants[:: max(1, len(variants) // 8)]:  # about 8, photos then scenes
        recon = vae.decode(vae.encode(to_pixels(v.image)).latent_dist.mean).sample
        recon = ((recon[0].permute(1, 2, 0) * 127.5 + 127.5).clamp(0, 255)).numpy().astype(np.uint8)
        errors.append(np.abs(recon.astype(int) - v.image).mean())
        rows.append([v.image, recon])
    return save_image(path, contact_sheet(rows, ["input", "VAE reconstruction"], tile=160)), float(np.mean(errors))


def write_summary(path: Path, args, logs: list[LossLog], times: dict[str, float], extra: dict) -> None:
    lines = ["# tiny-trained: training log", "",
             "A small model with SD1.5 + ControlNet's structure trained on this machine's CPU on scikit-image's "
             f"photos and on drawn scenes — **not SD1.5**; it knows only these.", "",
             f"Command: `{' '.join(['python', 'scripts/train_tiny.py', *sys.argv[1:]])}`  ",
             f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
             f"{args.threads} threads (the cores were shared with other work, so wall times are upper bounds)  ",
             "Wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()), ""]
    lines += [f"- {k}: {v}" for k, v in extra.items()]
    for log in logs:
        lines += ["", f"## {log.phase}", "", "| step | mean loss over the last steps |", "|---:|---:|"]
        lines += [f"| {s} | {loss:.4f} |" for s, loss in log.rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=TRAINED_PRESETS["tiny-trained"], help="preset folder to write")
    p.add_argument("--ldm-dir", type=Path, default=ROOT / "build" / "tiny_trained_ldm",
                   help="where the ldm single file + YAML and the sample sheets go")
    p.add_argument("--summary", type=Path, default=ROOT / "benchmarks" / "results" / "train-tiny.md")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--vae-batch", type=int, default=4)
    p.add_argument("--vae-crop", type=int, default=64)
    p.add_argument("--vae-lr", type=float, default=5e-4)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--steps-128", type=int, default=3000, help="UNet+ControlNet steps on 128-pixel crops")
    p.add_argument("--batch-128", type=int, default=8)
    p.add_argument("--steps-256", type=int, default=200, help="then steps on 256-pixel crops")
    p.add_argument("--batch-256", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--weight-cap", type=float, default=20.0, help="cap of the 1 + 1/SNR loss weights")
    p.add_argument("--p-high-noise", type=float, default=0.5, help="share of each batch at high noise")
    p.add_argument("--high-noise-from", type=int, default=500, help="high noise: t in [this, 1000)")
    p.add_argument("--controlnet-lr-scale", type=float, default=1.0, help="ControlNet's learning rate / the UNet's")
    p.add_argument("--control-init", choices=("lsuv", "default"), default="lsuv",
                   help="the ControlNet hint encoder's init: rescaled on training controls (lsuv), or PyTorch's")
    p.add_argument("--vae-from", type=Path, help="a preset folder whose VAE to reuse (skips phase 1)")
    p.add_argument("--p-uncond", type=float, default=0.15, help="caption dropout (classifier-free guidance)")
    p.add_argument("--p-no-control", type=float, default=0.1, help="control dropout (guess mode)")
    p.add_argument("--init-from", type=Path,
                   help="a preset folder whose UNet + ControlNet to start from (fine-tuning; no LSUV init)")
    p.add_argument("--max-minutes", type=float,
                   help="wall-clock budget of the UNet+ControlNet phases: stop there and still write everything")
    p.add_argument("--per-photo", type=int, default=8, help="jittered variants of each training photo")
    p.add_argument("--scenes-128", type=int, default=2000, help="drawn 128-pixel scenes (phase 2a)")
    p.add_argument("--scenes-256", type=int, default=200, help="drawn 256-pixel scenes (phase 2b)")
    p.add_argument("--p-scene", type=float, default=0.5, help="share of each batch that are drawn scenes")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--sample-steps", type=int, default=20, help="DDIM steps of the sample sheets")
    p.add_argument("--smoke", action="store_true", help="a few steps of everything into $TMPDIR/tiny_trained_smoke")
    args = p.parse_args(argv)
    if args.smoke:
        smoke = Path(tempfile.gettempdir()) / "tiny_trained_smoke"
        args.out, args.ldm_dir, args.summary = smoke / "preset", smoke / "ldm", smoke / "train-tiny.md"
        args.vae_steps, args.steps_128, args.steps_256, args.log_every, args.sample_steps = 6, 6, 4, 2, 2
        args.per_photo, args.scenes_128, args.scenes_256 = 1, 8, 4
    return args


def main(argv: list[str] | None = None) -> int:
    from sdcn_trt.models.ldm_layout import save_single_file

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    args.ldm_dir.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    start = time.perf_counter()

    configs = trained_configs()
    tiny = load_preset("tiny", seed=0)
    components = build_from_configs(configs, args.seed, tiny.tokenizer, source="training")
    components.text_encoder = tiny.text_encoder  # the tiny preset's random CLIP, frozen
    round_to_fp16(components.text_encoder)
    # the data of both phases (benchmarks/tiny_data.py): photo variants and drawn scenes with captions
    photos = photo_pictures(TRAINING_PHOTOS, args.per_photo, args.seed + 2)
    scenes = scene_pictures(training_scene_seeds(args.scenes_128), 128, 128)
    scenes += scene_pictures(training_scene_seeds(args.scenes_256, offset=args.scenes_128), 256, 256)
    # the VAE learns from both (a VAE trained on a few photos alone turns drawn colours sepia: issue #24)
    variants = photos + scenes[::max(1, len(scenes) // len(photos))]
    print(f"{len(photos)} photo variants of {len(TRAINING_PHOTOS)} photos (held out: {', '.join(HELD_OUT_PHOTOS)}), "
          f"{len(scenes)} drawn scenes; parameters: "
          + ", ".join(f"{n} {sum(p.numel() for p in m.parameters()) / 1e6:.2f} M" for n, m in components.modules().items()))

    clock = time.perf_counter()
    if args.vae_from:  # phase 1 done before: its fp16 VAE, latent scale already folded in, loaded as it is
        components.vae.load_state_dict(load_trained_preset(args.vae_from).vae.state_dict())
        vae_record = dict(reused_vae_record(args.vae_from), reused_from=str(args.vae_from))
        vae_log = LossLog("vae", args.log_every)
        vae_log.rows = [tuple(row) for row in vae_record.get("loss_rows", [])]
    else:
        vae_clock = time.perf_counter()
        vae_log = train_vae(components.vae, variants, rng, args)
        raw_std = fold_latent_scale(components.vae, variants)
        round_to_fp16(components.vae)
        vae_record = {"steps": args.vae_steps, "batch": args.vae_batch, "crop": args.vae_crop,
                      "final_loss": vae_log.rows[-1][1] if vae_log.rows else None,
                      "latent_std_before_folding": round(raw_std, 4),
                      "wall_min": round((time.perf_counter() - vae_clock) / 60, 1), "loss_rows": vae_log.rows}
    _, recon_error = recon_sheet(components.vae, variants, args.ldm_dir / "vae_reconstructions.png")
    times["VAE" + (" (reused: loaded)" if args.vae_from else "")] = time.perf_counter() - clock
    print(("VAE reused from " + str(args.vae_from) if args.vae_from else
           f"VAE: latent std {vae_record['latent_std_before_folding']:.3f} folded into the weights")
          + f"; mean |reconstruction error| {recon_error:.1f} levels")

    clock = time.perf_counter()
    torch.manual_seed(args.seed + 1)  # phase 2 seeded on its own: the same with a reused VAE
    rng = np.random.default_rng(args.seed + 1)
    if args.init_from:
        start_from = load_trained_preset(args.init_from)
        components.unet.load_state_dict(start_from.unet.state_dict())
        components.controlnet.load_state_dict(start_from.controlnet.state_dict())
        init_record = json.loads((Path(args.init_from) / "config.json").read_text())
        print(f"UNet + ControlNet start from {args.init_from} (sha256 {init_record['sha256'][:12]})")
    pictures = encode_pictures(components.vae, photos, False, "photos") + encode_pictures(components.vae, scenes, True, "scenes")
    texts = encode_texts(components, [p.caption for p in pictures])
    print(f"{len(pictures)} pictures and {len(texts)} prompts encoded in {(time.perf_counter() - clock) / 60:.1f} min")
    std = float(torch.cat([p.mean.flatten() for p in pictures if not p.scene]).std())
    sample_names = list(PHOTO_PROMPTS)[:1 if args.smoke else 4]
    sample_scenes = [scenes[0]] if args.smoke else [scenes[-1], scenes[-2]]

    def on_phase_end(phase: str) -> None:
        sheet = sample_sheet(components, args.ldm_dir / f"samples_{phase}.png", sample_names, args.sample_steps,
                             sample_scenes)
        tqdm.write(f"[{phase}] samples (EMA weights): {sheet}")

    logs = train_diffusion(components, pictures, texts, rng, args, on_phase_end)
    times["UNet+ControlNet"] = time.perf_counter() - clock
    for module in (components.unet, components.controlnet):
        round_to_fp16(module)

    meta = {"command": "python scripts/train_tiny.py " + " ".join(sys.argv[1:]), "seed": args.seed,
            "photos": TRAINING_PHOTOS, "held_out_photos": HELD_OUT_PHOTOS, "resolutions": list(RESOLUTIONS),
            "data": {"photo_variants_per_photo": args.per_photo, "scenes_128px": args.scenes_128,
                     "scenes_256px": args.scenes_256, "p_scene": args.p_scene,
                     "scene_seeds": f"0..{args.scenes_128 + args.scenes_256 - 1} (benchmarks/tiny_data.py)"},
            "init_from": (f"{args.init_from} (sha256 {init_record['sha256']})" if args.init_from else None),
            "max_minutes": args.max_minutes,
            "steps": {"vae": args.vae_steps, "unet_controlnet_128px": steps_run(logs, 0, args.steps_128),
                      "unet_controlnet_256px": steps_run(logs, 1, args.steps_256)},
            "final_losses": {log.phase: log.rows[-1][1] if log.rows else None for log in [vae_log, *logs]},
            "vae": vae_record,
            "diffusion": {"lr": args.lr, "controlnet_lr_scale": args.controlnet_lr_scale, "ema": args.ema,
                          "weight_cap": args.weight_cap, "p_high_noise": args.p_high_noise,
                          "p_uncond": args.p_uncond, "p_no_control": args.p_no_control,
                          "batches": {"128px": args.batch_128, "256px": args.batch_256}},
            "note": "trained here on scikit-image's photos and drawn scenes; not SD1.5"}
    weights = save_trained_preset(components, args.out, configs, meta)
    ldm = save_single_file(components, args.ldm_dir / "tiny_trained.safetensors", args.ldm_dir / "tiny_trained.yaml")
    sheet = sample_sheet(components, args.ldm_dir / "samples_final.png",
                         sample_names if args.smoke else list(PHOTO_PROMPTS), args.sample_steps, sample_scenes)
    times["total"] = time.perf_counter() - start
    extra = {"preset": f"`{weights.relative_to(ROOT) if weights.is_relative_to(ROOT) else weights}` "
                       f"({weights.stat().st_size / 1e6:.1f} MB, fp16)",
             "ldm single file + YAML": f"`{ldm.name}`, `tiny_trained.yaml` (in --ldm-dir, not committed)",
             "VAE": (f"reused from `{args.vae_from}`, trained by " + vae_record.get("source", "an earlier run") + "; "
                     if args.vae_from else "")
                    + f"{vae_record.get('steps')} steps x {vae_record.get('batch')} crops of {vae_record.get('crop')} "
                      f"px ({vae_record.get('wall_min')} min); latent std {vae_record.get('latent_std_before_folding')} "
                      f"before folding, {std:.3f} after x 0.18215; mean |reconstruction error| {recon_error:.1f} uint8 "
                      "levels on about 8 training pictures (photos, then scenes)",
             "data": f"{len(photos)} variants of {len(TRAINING_PHOTOS)} scikit-image photos ({args.per_photo} each: "
                     f"resolution {' or '.join(map(str, RESOLUTIONS))}, mirrored half the time, colours jittered but the "
                     f"first; held out: {', '.join(HELD_OUT_PHOTOS)}) and {args.scenes_128} drawn 128-px + "
                     f"{args.scenes_256} 256-px scenes with captions naming their colours (benchmarks/tiny_data.py, "
                     f"seeds 0..{args.scenes_128 + args.scenes_256 - 1}); {args.p_scene:.0%} of each batch are scenes",
             "start": (f"UNet + ControlNet from `{args.init_from}` (sha256 {init_record['sha256'][:12]})"
                       if args.init_from else "UNet + ControlNet from seeded random weights"),
             "UNet+ControlNet": f"{steps_run(logs, 0, args.steps_128)} steps x {args.batch_128} crops of 128 px, then "
                                f"{steps_run(logs, 1, args.steps_256)} x {args.batch_256} of 256 px"
                                + (f" (of {args.steps_128} + {args.steps_256} planned; wall-clock budget "
                                   f"{args.max_minutes} min)" if args.max_minutes else "")
                                + f"; lr {args.lr} (ControlNet x {args.controlnet_lr_scale}), "
                                f"EMA {args.ema}; {args.p_high_noise:.0%} of each batch at t in [500, 1000), the rest "
                                f"uniform; loss weight min(1 + 1/SNR, {args.weight_cap}); caption dropout "
                                f"{args.p_uncond:.0%}, control dropout {args.p_no_control:.0%}; ControlNet hint encoder init: "
                                + ("none (fine-tuned)" if args.init_from else args.control_init),
             "parameters": ", ".join(f"{n} {sum(p.numel() for p in m.parameters()) / 1e6:.2f} M"
                                     for n, m in components.modules().items())}
    write_summary(args.summary, args, [vae_log, *logs], times, extra)
    print(f"wrote {weights}, {ldm}, {sheet}, {args.summary}; total {times['total'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
