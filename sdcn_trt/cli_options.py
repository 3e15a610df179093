"""The command line's shared flag groups (model, backend, generation, shapes) and how they become
settings, components and a pipeline: every check that needs no weights runs before any load."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from sdcn_trt.models.single_file import load_single_file
from sdcn_trt.config import (
    BACKENDS, COMPILE_FLAGS, COMPILE_MODES, COMPILE_SCOPES, CONTEST_HEIGHT, CONTEST_WIDTH, GRAPH_MODES, NETWORKS, PRECISIONS, BackendConfig,
    GenerationConfig,
)
from sdcn_trt.engines import require_backend
from sdcn_trt.errors import InputError
from sdcn_trt.models.lora import apply_loras, parse_lora_arg
from sdcn_trt.models.presets import load_diffusers, load_preset, with_controlnets
from sdcn_trt.pipeline.pipeline import ControlNetPipeline
from sdcn_trt.samplers import SAMPLER_NAMES, SAMPLERS
from sdcn_trt.schedule import load_schedule_file, schedule_file_sampler


# -- shared option groups ------------------------------------------------------------------------
def add_model_args(parser: argparse.ArgumentParser, default_preset: str = "tiny") -> None:
    """The model flags; `default_preset`: the preset the command loads when no model flag is given (help text)."""
    g = parser.add_argument_group("model (one of: --preset, --sd-dir + --controlnet, --checkpoint)")
    g.add_argument("--preset", default=None,
                   help="built-in model: tiny-trained (trained here on scikit-image's photos, not SD1.5), or "
                        f"seeded random weights: tiny | sd15-random (default: {default_preset})")
    g.add_argument("--preset-seed", type=int, default=0, help="seed of a random preset's weights")
    g.add_argument("--sd-dir", help="diffusers SD1.5 folder (tokenizer/, text_encoder/, unet/, vae/)")
    g.add_argument("--controlnet", action="append", default=[],
                   help="diffusers ControlNet folder or ControlNet checkpoint file; repeat for several ControlNets "
                        "(with --sd-dir the first is the canny one; with --checkpoint/--preset each adds one)")
    g.add_argument("--checkpoint", help="single ldm-layout file with SD + ControlNet (control_sd15_canny.pth)")
    g.add_argument("--original-config", help="ldm YAML for --checkpoint (default: read off the tensor shapes)")
    g.add_argument("--text-encoder-config", help="CLIPTextConfig json for --checkpoint (default: from shapes)")
    g.add_argument("--tokenizer", help="folder with vocab.json + merges.txt (default: bundled CLIP vocabulary)")
    g.add_argument("--lora", action="append", default=[], metavar="PATH[:STRENGTH]",
                   help="LoRA file (kohya or diffusers/PEFT safetensors) merged into the UNet and text encoder at "
                        "STRENGTH (default 1.0, -4..4); repeat for several")
    g.add_argument("--no-cache", action="store_true",
                   help="neither read nor write converted weights in the weights cache (--checkpoint, --preset)")


def add_backend_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("backend")
    g.add_argument("--backend", default="torch", choices=BACKENDS)
    g.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    g.add_argument("--precision", default="fp32", choices=PRECISIONS, help="fp16: CLIP stays fp32")
    g.add_argument("--cache-dir", help="where exported ONNX and engines go (default: $SDCN_TRT_CACHE)")
    g.add_argument("--cuda-graph", default="off", choices=GRAPH_MODES,
                   help="replay each step (step) or the whole loop + decode (loop) from CUDA graphs")
    g.add_argument("--check-finite", action="store_true", help="fail naming the network that outputs NaN/Inf")
    g.add_argument("--max-batch", type=int, default=None,
                   help="most images (photos x samples) per network call; tensorrt/inductor engines are built for "
                        "1..max-batch (default: no limit on torch/onnxruntime, 1 on tensorrt/inductor; with "
                        "--batch-size: batch size x samples)")
    g.add_argument("--compiled-networks", nargs="*", default=None, metavar="NETWORK",
                   help="tensorrt/inductor (torch with --compile): build (compile) only these networks and run the "
                        "others on eager torch at the same "
                        "device and precision, e.g. fused_step (the 20-per-image step; CLIP and the VAE run once). "
                        f"Default: all. Valid: {', '.join(NETWORKS)}")
    g.add_argument("--compile", default="off", choices=COMPILE_MODES,
                   help="torch backend: run the networks (--compiled-networks: these only) through torch.compile in "
                        "this mode; they compile at the first image (the tiny preset's fused step: about a minute "
                        "on a 2-core CPU); with --cuda-graph loop the loop is captured around the compiled kernels (torch.compile's "
                        "reduce-overhead and max-autotune modes are not offered: they capture CUDA graphs of their own)")
    g.add_argument("--compile-scope", default="whole", choices=COMPILE_SCOPES,
                   help="with --compile: 'whole' compiles each network as one graph; 'blocks' compiles each transformer, "
                        "ResNet block and resampler apart (regional compilation: blocks of one kind and shape share "
                        "one compile, the ControlNet's reuse the UNet's; a shorter cold compile)")
    g.add_argument("--compile-flags", nargs="*", default=(), choices=list(COMPILE_FLAGS), metavar="FLAG",
                   help="with --compile: inductor settings added to the mode (diffusers' diffusion-fast recipe; "
                        f"off by default until a GPU run measures them): {', '.join(COMPILE_FLAGS)}")


def add_generation_args(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    g = parser.add_argument_group("generation (the contest's process() arguments, a schedule, a size guard)")
    for f in dataclasses.fields(GenerationConfig):
        if f.name in exclude or f.name == "eps_steps":  # eps_steps: the API's old spelling of --schedule eps=N
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name == "controlnet_strengths":
            g.add_argument(flag, dest=f.name, type=float, nargs="+", default=(),
                           help="one strength per ControlNet, 0..2 (default: --strength for all)")
        elif f.name == "sampler":
            g.add_argument(flag, dest=f.name, default=None, choices=SAMPLER_NAMES,
                           help=f"the sampler (default: {f.default}, or the one --schedule-file names); --ddim-steps "
                                "counts its steps (`sdcn-trt samplers` describes each): "
                                + "; ".join(f"{name}: {info.description}" for name, info in SAMPLERS.items()))
        elif f.type in ("bool", bool):
            g.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            kind = {"int": int, "float": float, "str": str}[str(f.type)]
            g.add_argument(flag, dest=f.name, type=kind, default=f.default, help=f"default: {f.default!r}")
    if "schedule" not in exclude:
        g.add_argument("--schedule-file", help="JSON schedule (as `sdcn-trt tune` writes it); overrides --schedule, "
                                               "and sets the sampler it names unless --sampler names another")


def add_shape_args(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--batch", type=int, default=1, help=f"{what}: images per call")
    parser.add_argument("--height", type=int, default=CONTEST_HEIGHT, help=f"{what}: image height in pixels")
    parser.add_argument("--width", type=int, default=CONTEST_WIDTH, help=f"{what}: image width in pixels")


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(GenerationConfig) if hasattr(args, f.name)}
    if fields.get("sampler", "") is None:  # not given: the schedule file's, else the default
        del fields["sampler"]
    if getattr(args, "schedule_file", None):
        fields["schedule"] = load_schedule_file(args.schedule_file)
        tuned = schedule_file_sampler(args.schedule_file)
        if tuned is not None and fields.get("sampler", tuned) != tuned:
            raise InputError(f"--sampler {fields['sampler']} and the schedule file's sampler {tuned} disagree "
                             f"({args.schedule_file}); drop --sampler to use the file's, or edit the file")
        if tuned is not None:
            fields["sampler"] = tuned
    return GenerationConfig(**fields)


def backend_config(args: argparse.Namespace) -> BackendConfig:
    max_batch = getattr(args, "max_batch", None)
    if max_batch is None and getattr(args, "batch_size", None):  # engines that take the batches asked for
        max_batch = args.batch_size * getattr(args, "num_samples", 1)
    return BackendConfig(backend=args.backend, device=args.device, precision=args.precision, cache_dir=args.cache_dir,
                         cuda_graph=args.cuda_graph, check_finite=args.check_finite, max_batch=max_batch,
                         compiled_networks=args.compiled_networks, compile=args.compile,
                         compile_flags=tuple(args.compile_flags), compile_scope=args.compile_scope)


def usable_backend(args: argparse.Namespace) -> BackendConfig:
    """The backend flags, checked before any weights load: BackendUnavailableError saying what this machine
    lacks for that backend on that device (e.g. onnxruntime's CUDA execution provider)."""
    config = backend_config(args)
    require_backend(config)
    return config


def load_components(args: argparse.Namespace, precision: str = "fp32"):  # -> Components
    """The model named by the model flags, with the --lora files merged in; its weights in `precision`
    (single files and presets: fp16 holds the UNet, ControlNet and VAE in fp16, CLIP stays fp32)."""

    check_model_flags(args)
    loras = [parse_lora_arg(text) for text in getattr(args, "lora", [])]  # bad strengths fail before loading
    for path, _ in loras:
        if not Path(path).is_file():
            what = "is a folder" if Path(path).is_dir() else "not found"
            raise InputError(f"LoRA file {path} {what}; --lora takes PATH[:STRENGTH], a .safetensors file and a "
                             "strength in -4..4")
    components = load_base_components(args, precision)
    if loras:
        apply_loras(components, loras)
    return components


def check_model_flags(args: argparse.Namespace) -> None:
    """One model source, and no flag of one source that another would ignore without a word."""
    chosen = [n for n, v in (("--preset", args.preset), ("--sd-dir", args.sd_dir), ("--checkpoint", args.checkpoint)) if v]
    if len(chosen) > 1:
        raise InputError(f"choose one model source, got {' and '.join(chosen)}")
    if args.sd_dir and not args.controlnet:
        raise InputError("--sd-dir needs --controlnet (a ControlNet folder or checkpoint file)")
    nets = len(args.controlnet) + (0 if args.sd_dir else 1)  # --sd-dir: the first --controlnet is the canny one
    strengths, controls = getattr(args, "controlnet_strengths", ()), getattr(args, "control_image", [])
    if strengths and len(strengths) != nets:
        raise InputError(f"{len(strengths)} --controlnet-strengths for {nets} ControlNet{'s' if nets > 1 else ''}; "
                         "give one per ControlNet")
    if controls and len(controls) != nets - 1:
        raise InputError(f"{len(controls)} --control-image for {nets - 1} further ControlNets: the first ControlNet "
                         "takes each photo's edges, and each one after it (--controlnet) one --control-image")
    for path in args.controlnet:
        if not Path(path).exists():
            raise InputError(f"ControlNet not found: {path}; --controlnet takes a diffusers ControlNet folder or a "
                             "ControlNet checkpoint file")
    unused = [flag for flag, value, used in (
        ("--original-config", args.original_config, args.checkpoint),
        ("--text-encoder-config", args.text_encoder_config, args.checkpoint),
        ("--preset-seed", args.preset_seed, not (args.checkpoint or args.sd_dir))) if value and not used]
    if unused:
        source = chosen[0] if chosen else "--preset"
        raise InputError(f"{' and '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect with {source}: "
                         "--original-config and --text-encoder-config go with --checkpoint, --preset-seed with a "
                         "random --preset")


def load_base_components(args: argparse.Namespace, precision: str = "fp32"):  # -> Components
    """The model named by the model flags: a preset, diffusers folders, or one ldm checkpoint."""

    if args.checkpoint:
        components = load_single_file(args.checkpoint, args.original_config, args.tokenizer, args.text_encoder_config,
                                      precision=precision, cache=not getattr(args, "no_cache", False),
                                      cache_dir=getattr(args, "cache_dir", None))
        return with_controlnets(components, args.controlnet)
    if args.sd_dir:
        return load_diffusers(args.sd_dir, args.controlnet, args.tokenizer)
    return with_controlnets(load_preset(args.preset or "tiny", seed=args.preset_seed, tokenizer=args.tokenizer,
                                        precision=precision, cache=not getattr(args, "no_cache", False),
                                        cache_dir=getattr(args, "cache_dir", None)),
                            args.controlnet)


def load_pipeline(args: argparse.Namespace):  # -> ControlNetPipeline

    backend = usable_backend(args)  # validated before the weights load
    return ControlNetPipeline(load_components(args, backend.precision), backend)
