"""Train the `tiny-trained` preset on the CPU: a small model with SD1.5 + ControlNet's structure that
really denoises, trained on scikit-image's colour photos (not SD1.5; it knows only these photos).

    python scripts/train_tiny.py             # everything, seeded: VAE ~33 min + diffusion ~33 min on 2 shared cores
    python scripts/train_tiny.py --vae-from sdcn_trt/models/tiny_trained   # reuse the shipped VAE: ~33 min
    python scripts/train_tiny.py --smoke     # a one-minute run into /tmp that checks the plumbing

In order:
  1. an AutoencoderKL (f = 8, 4 latent channels) on random 64-pixel crops of the photos (resized
     as the reference resizes, at resolutions 256 and 320, and mirrored): L1 + a tiny KL term, the
     posterior starting nearly deterministic (log-variance bias -10); then
     its latent scale is folded into its weights so SD1.5's scaling factor 0.18215 gives unit-variance
     latents, and its weights are rounded to fp16 (what the preset file stores);
  2. a UNet2DConditionModel + ControlNetModel on the frozen VAE's latents, with the canny maps of the
     same crops (the reference's preprocessing) as control and short captions encoded by the tiny
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
import math
import os
import platform
import sys
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

A_PROMPT, N_PROMPT = GenerationConfig.a_prompt, GenerationConfig.n_prompt
RESOLUTIONS = (256, 320)  # short side after resize_image, as the pipeline resizes at these resolutions
CANNY = (100, 200)  # the contest's thresholds


@dataclass
class Variant:
    """One training picture: a photo resized (and maybe mirrored) and its canny map, both uint8 HxWx3."""

    name: str
    image: np.ndarray
    control: np.ndarray


def make_variants() -> list[Variant]:
    variants = []
    for name, photo in sample_photos(list(PHOTO_PROMPTS)).items():
        for resolution in RESOLUTIONS:
            resized, _ = preprocess.prepare(photo, resolution, *CANNY)
            for image in (resized, np.ascontiguousarray(resized[:, ::-1])):
                variants.append(Variant(name, image, preprocess.canny_map(image, *CANNY)))
    return variants


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
def pixel_crops(variants: list[Variant], rng: np.random.Generator, size: int, batch: int) -> torch.Tensor:
    crops = []
    for _ in range(batch):
        v = variants[rng.integers(len(variants))]
        y, x = rng.integers(v.image.shape[0] - size + 1), rng.integers(v.image.shape[1] - size + 1)
        crops.append(v.image[y:y + size, x:x + size])
    pixels = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, S, S)
    return pixels.contiguous()


def train_vae(vae: torch.nn.Module, variants: list[Variant], rng: np.random.Generator, args) -> LossLog:
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
def fold_latent_scale(vae: torch.nn.Module, variants: list[Variant]) -> float:
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
def encode_texts(components: Components) -> dict[str, torch.Tensor]:
    from sdcn_trt.models.tokenizer import tokenize

    prompts = ["", N_PROMPT] + [p for c in PHOTO_PROMPTS.values() for p in (c, f"{c}, {A_PROMPT}")]
    states = components.text_encoder(tokenize(components.tokenizer, prompts)).last_hidden_state  # (N, 77, D)
    return dict(zip(prompts, states))


@dataclass
class LatentPicture:
    mean: torch.Tensor  # (4, h, w), already times the scaling factor
    std: torch.Tensor  # (4, h, w)
    control: torch.Tensor  # (3, 8h, 8w) in [0, 1]
    name: str


@torch.no_grad()
def encode_pictures(vae: torch.nn.Module, variants: list[Variant]) -> list[LatentPicture]:
    out = []
    for v in variants:
        dist = vae.encode(to_pixels(v.image)).latent_dist
        out.append(LatentPicture(dist.mean[0] * SD15_SCALING_FACTOR, dist.std[0] * SD15_SCALING_FACTOR,
                                 preprocess.control_tensor(v.control, 1)[0], v.name))
    return out


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
    """(latents (B, 4, c, c), control (B, 3, 8c, 8c), text (B, 77, D), keep_control (B,))."""
    latents, controls, states, keep = [], [], [], []
    for _ in range(batch):
        p = pictures[rng.integers(len(pictures))]
        y, x = rng.integers(p.mean.shape[1] - crop + 1), rng.integers(p.mean.shape[2] - crop + 1)
        window = (slice(None), slice(y, y + crop), slice(x, x + crop))
        latents.append(p.mean[window] + p.std[window] * torch.randn(p.std[window].shape))
        controls.append(p.control[:, 8 * y:8 * (y + crop), 8 * x:8 * (x + crop)])
        caption = PHOTO_PROMPTS[p.name]
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
    if args.control_init == "lsuv":
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
    for desc, steps, batch, crop in phases:
        if steps == 0:
            continue
        log = LossLog(desc.split()[0], args.log_every)
        bar = tqdm(range(steps), desc=desc, unit="step", dynamic_ncols=True)
        for i in bar:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, args.lr, 100) * group["scale"]
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


def reused_vae_record(folder: Path) -> dict:
    """How the VAE of an earlier preset was trained, from its config.json (what this run's log repeats)."""
    import json

    training = json.loads((Path(folder) / "config.json").read_text()).get("training", {})
    return training.get("vae") or {"steps": training.get("steps", {}).get("vae"),
                                   "final_loss": training.get("final_losses", {}).get("vae")}


# -- 3. samples, files, log ----------------------------------------------------------------------------
def sample_sheet(components: Components, path: Path, names: list[str], steps: int) -> Path:
    """input | canny | generated (the contest call with the photo's caption) per photo."""
    from sdcn_trt import ControlNetPipeline

    for module in components.modules().values():
        module.eval()
    pipe = ControlNetPipeline(components, "torch")
    rows = []
    for name, photo in sample_photos(names).items():
        out = pipe.run(photo, GenerationConfig(prompt=PHOTO_PROMPTS[name], ddim_steps=steps))
        rows.append([preprocess.resize_image(photo, 256), 255 - out.control, out.images[0]])
    pipe.close()
    return save_image(path, contact_sheet(rows, ["input", "canny", "tiny-trained"], tile=160))


@torch.no_grad()
def recon_sheet(vae: torch.nn.Module, variants: list[Variant], path: Path) -> tuple[Path, float]:
    """input | VAE reconstruction for the 256-resolution pictures; returns the mean |error| in levels."""
    rows, errors = [], []
    for v in variants[:: 2 * len(RESOLUTIONS)]:
        recon = vae.decode(vae.encode(to_pixels(v.image)).latent_dist.mean).sample
        recon = ((recon[0].permute(1, 2, 0) * 127.5 + 127.5).clamp(0, 255)).numpy().astype(np.uint8)
        errors.append(np.abs(recon.astype(int) - v.image).mean())
        rows.append([v.image, recon])
    return save_image(path, contact_sheet(rows, ["input", "VAE reconstruction"], tile=160)), float(np.mean(errors))


def write_summary(path: Path, args, logs: list[LossLog], times: dict[str, float], extra: dict) -> None:
    lines = ["# tiny-trained: training log", "",
             "A small model with SD1.5 + ControlNet's structure trained on this machine's CPU on scikit-image's "
             f"{len(PHOTO_PROMPTS)} colour photos — **not SD1.5**; it knows only these photos.", "",
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
    p.add_argument("--vae-steps", type=int, default=2000)
    p.add_argument("--vae-batch", type=int, default=4)
    p.add_argument("--vae-crop", type=int, default=64)
    p.add_argument("--vae-lr", type=float, default=5e-4)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--steps-128", type=int, default=1800, help="UNet+ControlNet steps on 128-pixel crops")
    p.add_argument("--batch-128", type=int, default=8)
    p.add_argument("--steps-256", type=int, default=150, help="then steps on 256-pixel crops")
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
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--sample-steps", type=int, default=20, help="DDIM steps of the sample sheets")
    p.add_argument("--smoke", action="store_true", help="a few steps of everything into /tmp")
    args = p.parse_args(argv)
    if args.smoke:
        smoke = Path("/tmp/tiny_trained_smoke")
        args.out, args.ldm_dir, args.summary = smoke / "preset", smoke / "ldm", smoke / "train-tiny.md"
        args.vae_steps, args.steps_128, args.steps_256, args.log_every, args.sample_steps = 6, 6, 4, 2, 2
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
    variants = make_variants()
    print(f"{len(variants)} training pictures from {len(PHOTO_PROMPTS)} photos; parameters: "
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
    texts = encode_texts(components)
    pictures = encode_pictures(components.vae, variants)
    std = float(torch.cat([p.mean.flatten() for p in pictures]).std())
    sample_names = list(PHOTO_PROMPTS)[:1 if args.smoke else 4]

    def on_phase_end(phase: str) -> None:
        sheet = sample_sheet(components, args.ldm_dir / f"samples_{phase}.png", sample_names, args.sample_steps)
        tqdm.write(f"[{phase}] samples (EMA weights): {sheet}")

    logs = train_diffusion(components, pictures, texts, rng, args, on_phase_end)
    times["UNet+ControlNet"] = time.perf_counter() - clock
    for module in (components.unet, components.controlnet):
        round_to_fp16(module)

    meta = {"command": "python scripts/train_tiny.py " + " ".join(sys.argv[1:]), "seed": args.seed,
            "photos": PHOTO_PROMPTS, "resolutions": list(RESOLUTIONS),
            "steps": {"vae": args.vae_steps, "unet_controlnet_128px": args.steps_128,
                      "unet_controlnet_256px": args.steps_256},
            "final_losses": {log.phase: log.rows[-1][1] if log.rows else None for log in [vae_log, *logs]},
            "vae": vae_record,
            "diffusion": {"lr": args.lr, "controlnet_lr_scale": args.controlnet_lr_scale, "ema": args.ema,
                          "weight_cap": args.weight_cap, "p_high_noise": args.p_high_noise,
                          "p_uncond": args.p_uncond, "p_no_control": args.p_no_control,
                          "batches": {"128px": args.batch_128, "256px": args.batch_256}},
            "note": "trained here on a handful of scikit-image photos; not SD1.5"}
    weights = save_trained_preset(components, args.out, configs, meta)
    ldm = save_single_file(components, args.ldm_dir / "tiny_trained.safetensors", args.ldm_dir / "tiny_trained.yaml")
    sheet = sample_sheet(components, args.ldm_dir / "samples_final.png",
                         sample_names if args.smoke else list(PHOTO_PROMPTS), args.sample_steps)
    times["total"] = time.perf_counter() - start
    extra = {"preset": f"`{weights.relative_to(ROOT) if weights.is_relative_to(ROOT) else weights}` "
                       f"({weights.stat().st_size / 1e6:.1f} MB, fp16)",
             "ldm single file + YAML": f"`{ldm.name}`, `tiny_trained.yaml` (in --ldm-dir, not committed)",
             "VAE": (f"reused from `{args.vae_from}`, trained by " + vae_record.get("source", "an earlier run") + "; "
                     if args.vae_from else "")
                    + f"{vae_record.get('steps')} steps x {vae_record.get('batch')} crops of {vae_record.get('crop')} "
                      f"px ({vae_record.get('wall_min')} min); latent std {vae_record.get('latent_std_before_folding')} "
                      f"before folding, {std:.3f} after x 0.18215; mean |reconstruction error| {recon_error:.1f} uint8 "
                      "levels on the 256-resolution photos",
             "UNet+ControlNet": f"{args.steps_128} steps x {args.batch_128} crops of 128 px, then {args.steps_256} "
                                f"x {args.batch_256} of 256 px; lr {args.lr} (ControlNet x {args.controlnet_lr_scale}), "
                                f"EMA {args.ema}; {args.p_high_noise:.0%} of each batch at t in [500, 1000), the rest "
                                f"uniform; loss weight min(1 + 1/SNR, {args.weight_cap}); caption dropout "
                                f"{args.p_uncond:.0%}, control dropout {args.p_no_control:.0%}; ControlNet hint encoder init: "
                                f"{args.control_init}",
             "parameters": ", ".join(f"{n} {sum(p.numel() for p in m.parameters()) / 1e6:.2f} M"
                                     for n, m in components.modules().items())}
    write_summary(args.summary, args, [vae_log, *logs], times, extra)
    print(f"wrote {weights}, {ldm}, {sheet}, {args.summary}; total {times['total'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
