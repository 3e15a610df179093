"""`sdcn-trt`: sub-commands that map 1:1 onto the Python API (flag names = field names); the flag groups
they share and their checks are in cli_options."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

from sdcn_trt.batch.local import (
    BatchSettings, check_inputs_kept, jobs_for_paths, plan_batch, run_batch, write_outputs,
)
from sdcn_trt.cache import CACHE_KINDS, cache_entries, cache_root, remove_cache_entries
from sdcn_trt.config import (BACKENDS, COMPILE_FLAGS, COMPILE_MODES, COMPILE_SCOPES, PRECISIONS, BackendConfig)
from sdcn_trt.contest import write_kit
from sdcn_trt.demo import report_lines, run_demo
from sdcn_trt.batch.ray import RayRunner
from sdcn_trt.cli_options import (
    add_backend_args, add_generation_args, add_model_args, add_shape_args, backend_config, generation_config,
    load_components, load_pipeline, usable_backend,
)
from sdcn_trt.engines import require_backend
from sdcn_trt.engines.inductor.runner import build_packages, require_inductor
from sdcn_trt.engines.inductor.plan import InductorSettings
from sdcn_trt.engines.tensorrt.runner import build_engines, require_tensorrt
from sdcn_trt.engines.tensorrt.plan import BuildSettings
from sdcn_trt.errors import InputError, SdcnError
from sdcn_trt.export import ExportSettings, export_networks
from sdcn_trt.export.descriptors import DESCRIPTORS, PIPELINE_NETWORKS, ShapeRange, ShapeSpec
from sdcn_trt.models.presets import preset_names
from sdcn_trt.images import check_output_folder
from sdcn_trt.preprocess import check_side, load_image, read_image, resize_shape
from sdcn_trt.progress import RunProgress
from sdcn_trt.samplers import SAMPLER_NAMES, describe_samplers
from sdcn_trt.schedule import SPELLINGS, load_schedule_file
from sdcn_trt.scoring.report import summary_table
from sdcn_trt.scoring.run import ScoreSettings, run_score
from sdcn_trt.scoring.tune import TuneSettings, frontier_table, tune

logger = logging.getLogger("sdcn_trt")


# -- sub-commands ----------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    """Named and written as `batch` names and writes them (one writer): <input>.png, <input>_1.png ...
    and <input>_canny.png, folders' images under their relative paths."""

    jobs = jobs_for_paths(args.inputs, generation_config(args))  # clashing output names fail here
    check_inputs_kept(jobs, Path(args.output))
    images = [(root, job, read_image(root / job.source)) for root, job in jobs]  # a bad file fails before any work
    for root, job, loaded in images:  # the pipeline's size guard, before the weights load
        height, width, _ = resize_shape(*loaded.image.shape[:2], job.config.image_resolution)
        try:
            check_side(height, width, job.config.max_side, original=loaded.image.shape[:2])
        except InputError as exc:
            raise InputError(f"{root / job.source}: {exc}") from None
    # further ControlNets' control maps, the same for every input (the first ControlNet gets each photo's edges)
    controls = [None] + [load_image(p) for p in args.control_image] if args.control_image else None
    check_output_folder(args.output, "--output")
    pipe = load_pipeline(args)
    out_dir = Path(args.output)
    with RunProgress(len(images), "generate", enabled=not args.quiet) as bar:
        for root, job, loaded in images:
            result = pipe.run(loaded.image, job.config, progress=bar.steps, control_images=controls)
            written = write_outputs(result, job, out_dir, args.save_control)
            notes = f"; {'; '.join(loaded.notes)}" if loaded.notes else ""  # first of N frames, 16-bit scaled ...
            bar.write(f"{root / job.source} -> {', '.join(map(str, written))} "
                      f"(seed {result.seed}, {sum(result.timings.values()):.2f} s{notes})")
            bar.advance()
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    settings = ExportSettings(precision=args.precision, opset=args.opset,
                              sample=ShapeSpec(args.batch, args.height, args.width), dynamic=not args.static,
                              simplify=not args.no_simplify)
    if args.output:
        check_output_folder(args.output, "--output")
    if args.cache_dir:  # a read-only cache of earlier exports is fine; a file in its place is not
        check_output_folder(args.cache_dir, "--cache-dir", writable=False)
    results = export_networks(load_components(args), args.networks, settings, args.cache_dir, args.output)
    for name, r in results.items():
        state = "cached" if r.cached else f"exported in {r.seconds:.1f} s"
        print(f"{name:>13}: {r.path} ({state})")
        for output, c in r.check.items():
            print(f"{'':>15}{output}: onnxruntime vs torch fp32 max |diff| {c['max_abs']:.3e}, "
                  f"max rel {c['max_rel']:.3e}, mean {c['mean_abs']:.3e}"
                  + (f", {c['nonfinite']} non-finite" if c.get("nonfinite") else ""))
    return 0


def build_settings(args: argparse.Namespace):  # -> tuple[BuildSettings, BackendConfig]
    """The engine build settings and the TensorRT backend named by `sdcn-trt build`'s flags."""

    opt = ShapeSpec(batch=args.batch, height=args.height, width=args.width)
    shape_range = (ShapeRange.dynamic(opt, max_batch=args.max_batch, min_side=args.min_side, max_side=args.max_side)
                   if args.dynamic else ShapeRange.static(opt))
    settings = BuildSettings(precision=args.precision, optimization_level=args.optimization_level,
                             workspace_gib=args.workspace_gib, shape_range=shape_range, refit=args.refit)
    backend = BackendConfig(backend="tensorrt", device=args.device, precision=args.precision,
                            cache_dir=args.cache_dir)
    return settings, backend

def cmd_build_inductor(args: argparse.Namespace) -> int:
    """`build --backend inductor`: an AOTInductor package per network (kernels only, keyed by architecture,
    not by weights), each compiled and load-checked in a child process; prints build time, size and
    the package's difference from eager torch on sample inputs (seeded weights of the architecture)."""

    config = BackendConfig(backend="inductor", device=args.device, precision=args.precision, cache_dir=args.cache_dir)
    require_inductor(config.device.split(":")[0])  # before loading any weights
    opt = ShapeSpec(args.batch, args.height, args.width)
    shape_range = (ShapeRange.dynamic(opt, args.max_batch, args.min_side, args.max_side) if args.dynamic
                   else ShapeRange.static(opt))
    settings = InductorSettings(shape_range, max_autotune=args.max_autotune)
    results = build_packages(load_components(args), args.networks or list(PIPELINE_NETWORKS), config, settings)
    for name, r in results.items():
        state = "cached" if r.cached else f"compiled in {r.seconds:.1f} s ({'; '.join(r.reasons)})"
        worst = max((c["max_abs"] for c in r.check.values()), default=float("nan"))
        print(f"{name:>13}: {r.path} ({state}); {r.size_bytes / 2**20:.1f} MiB; "
              f"max |diff| vs eager torch {worst:.2e}")
    total = sum(r.seconds for r in results.values())
    print(f"{'total':>13}: {total:.1f} s compiling, {sum(r.size_bytes for r in results.values()) / 2**20:.1f} MiB")
    return 0


def cmd_build_warm(args: argparse.Namespace) -> int:
    """`build --backend torch|onnxruntime`: one image at the build shape, so that what the backend caches is
    there for the next process (the web page, a batch run, the contest kit): onnxruntime's ONNX exports,
    torch.compile's caches (--compile), the weights cache a checkpoint is converted into."""
    import numpy as np

    from sdcn_trt import ControlNetPipeline, GenerationConfig

    config = BackendConfig(backend=args.backend, device=args.device, precision=args.precision, cache_dir=args.cache_dir,
                           compiled_networks=args.networks if args.compile != "off" else None, compile=args.compile,
                           compile_flags=tuple(args.compile_flags), compile_scope=args.compile_scope)
    require_backend(config)  # before loading any weights
    generation = GenerationConfig(image_resolution=min(args.height, args.width), ddim_steps=1)  # one step: every network runs
    photo = np.full((args.height, args.width, 3), 128, np.uint8)
    pipe = ControlNetPipeline(load_components(args), config)
    clock = time.perf_counter()
    pipe.run([photo] * args.batch if args.batch > 1 else photo, generation)
    for name, runner in pipe.runners.items():
        export = getattr(runner, "export", None)
        where = (f"ONNX {export.path} ({'cached' if export.cached else f'exported in {export.seconds:.1f} s'})"
                 if export is not None else f"torch.compile caches in {runner.compile_cache}"
                 if getattr(runner, "compile_cache", None) else "nothing to cache (eager torch)")
        print(f"{name:>13}: {where}")
    print(f"{'total':>13}: {time.perf_counter() - clock:.1f} s for one {args.height}x{args.width} image; the next "
          "process starts from these caches")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    if args.cache_dir:  # engines and packages are written there
        check_output_folder(args.cache_dir, "--cache-dir")
    if args.backend == "inductor":
        return cmd_build_inductor(args)
    if args.backend in ("torch", "onnxruntime"):
        return cmd_build_warm(args)

    settings, backend = build_settings(args)  # bad flags fail first
    require_tensorrt()  # before loading any weights
    folders = build_engines(load_components(args), args.networks or list(PIPELINE_NETWORKS), backend, settings)
    for name, folder in folders.items():
        print(f"{name:>13}: {folder}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    schedules = tuple(args.schedules) + tuple(load_schedule_file(f) for f in args.schedule_file)
    settings = ScoreSettings(inputs=args.inputs, output=args.output, schedules=schedules,
                             image_format=args.image_format, reference_dir=args.reference_dir,
                             fid_weights=args.fid_weights, random_fid=args.random_fid, warmup=args.warmup,
                             generation=generation_config(args), batch_size=args.batch_size)
    check_output_folder(args.output, "--output")
    backend = usable_backend(args)
    summary = run_score(load_components(args), backend, settings)
    print(summary_table(summary))
    print(f"report: {Path(args.output) / 'report.html'}")
    return 1 if any(s["errors"] for s in summary["schedules"].values()) else 0


def cmd_tune(args: argparse.Namespace) -> int:
    candidates = tuple(args.candidates or ()) + tuple(load_schedule_file(f) for f in args.schedule_file)
    settings = TuneSettings(inputs=args.inputs, output=args.output, candidates=candidates,
                            samplers=tuple(args.samplers or ()), greedy=not args.no_greedy,
                            greedy_kinds=tuple(args.greedy_kinds), greedy_budget=args.greedy_budget,
                            max_pd=args.max_pd, min_ssim=args.min_ssim, fid_weights=args.fid_weights,
                            random_fid=args.random_fid, warmup=args.warmup, generation=generation_config(args))
    check_output_folder(args.output, "--output")
    backend = usable_backend(args)
    summary = tune(load_components(args), backend, settings, progress=not args.quiet)
    print(frontier_table(summary))
    best = summary["best"]
    print(f"best: {best['sampler']} {best['schedule']} ({best['latency_ms']['mean']:.1f} ms/image, {summary['quality']} "
          f"{best[summary['quality']]:.3f}) -> {Path(args.output) / 'best_schedule.json'}")
    print(f"report: {Path(args.output) / 'report.html'}")
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    import functools


    settings = BatchSettings(args.input_dir, args.output_dir, args.prompts, args.save_control, not args.no_recursive,
                             generation_config(args), batch_size=args.batch_size)
    backend_config(args)  # validate the backend flags before any work
    check_output_folder(args.output_dir, "output_dir")
    plan_batch(settings)  # the input folder, the prompt file and clashing names, before the weights load
    runner = None
    if args.ray or args.ray_address:
        runner = RayRunner(functools.partial(load_pipeline, args), address=args.ray_address, workers=args.workers,
                           chunk_size=args.chunk_size)
        pipe = None
    else:
        pipe = load_pipeline(args)
    summary = run_batch(pipe, settings, runner)
    print(summary)
    print(f"manifest: {Path(args.output_dir) / 'manifest.jsonl'}")
    return 1 if summary.failed else 0


def cmd_demo(args: argparse.Namespace) -> int:
    check_output_folder(args.output, "--output")
    summary = run_demo(Path(args.output), backends=args.backends, steps=args.ddim_steps, samples=args.samples,
                       progress=not args.quiet, preset=args.preset)
    print("\n".join(report_lines(summary)))
    return 0


def cmd_contest_kit(args: argparse.Namespace) -> int:
    check_output_folder(args.folder, "folder")
    for path in write_kit(args.folder, force=args.force):
        print(f"wrote {path}")
    print(f"copy the contest's compute_score.py into {args.folder} and run it there (settings: SDCN_* variables, "
          "see the README written beside the module)")
    return 0


APP_PRESET = "tiny-trained"  # the web page's model when no model flag is given


def cmd_samplers(args: argparse.Namespace) -> int:
    print(describe_samplers())
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """What the cache holds, kind by kind (each entry with --entries), and what this install can no longer use;
    --remove-stale / --remove KIND remove entries, never anything outside the cache."""
    root = Path(args.cache_dir) if args.cache_dir else cache_root()
    if not root.is_dir():
        raise InputError(f"--cache-dir {root} is not a folder")
    entries = cache_entries(root)
    print(f"cache: {root} ({sum(e.bytes for e in entries) / 1e9:.2f} GB)")
    print(f"{'kind':<14} {'entries':>7} {'size':>10} {'stale':>6}")
    for kind in dict.fromkeys(CACHE_KINDS.values()):
        mine = [e for e in entries if e.kind == kind]
        if mine:
            print(f"{kind:<14} {len(mine):>7} {sum(e.bytes for e in mine) / 1e6:>8.1f} MB {sum(bool(e.stale) for e in mine):>6}")
    if args.entries:
        for e in entries:
            print(f"  {e.kind:<14} {e.bytes / 1e6:>9.1f} MB  {e.path}" + (f"  [{e.made_for}]" if e.made_for else "")
                  + (f"  stale: {e.stale}" if e.stale else ""))
    chosen = [e for e in entries if (args.remove_stale and e.stale) or e.kind in (args.remove or ())]
    if args.remove_stale or args.remove:
        freed = remove_cache_entries(chosen, root)
        print(f"removed {len(chosen)} entries ({freed / 1e6:.1f} MB)")
    return 0


def cmd_app(args: argparse.Namespace) -> int:
    """The canny2image web page; Gradio (the [app] extra) is imported only here."""
    from sdcn_trt.app import check_launch_settings, serve

    check_launch_settings(args.port, args.max_file_size)  # before the model loads
    if not (args.preset or args.sd_dir or args.checkpoint):
        args.preset = APP_PRESET
    serve(load_pipeline(args), host=args.host, port=args.port, share=args.share, max_file_size=args.max_file_size)
    return 0


def add_app_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("app", help="the original canny2image web page on any backend, with timings ([app] extra)",
                       description="Serve the canny2image page (the original ControlNet Gradio app's controls) at "
                                   "http://HOST:PORT. The model defaults to the tiny-trained preset (not SD1.5).")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes the page)")
    p.add_argument("--port", type=int, default=7860, help="default: 7860")
    p.add_argument("--share", action="store_true", help="ask Gradio for a public share link (off by default)")
    p.add_argument("--max-file-size", default="20mb", help="largest upload accepted (default: 20mb)")
    add_model_args(p, default_preset=APP_PRESET)
    add_backend_args(p)
    p.set_defaults(func=cmd_app)


def add_contest_kit_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("contest-kit", help="write canny2image_TRT.py so the contest's compute_score.py runs unchanged",
                       description="Write FOLDER/canny2image_TRT.py (imports sdcn_trt.contest.hackathon) and a README "
                                   "listing the SDCN_* settings; the contest's compute_score.py then runs in FOLDER.")
    p.add_argument("folder", help="where compute_score.py will run")
    p.add_argument("--force", action="store_true", help="overwrite a canny2image_TRT.py this command did not write")
    p.set_defaults(func=cmd_contest_kit)


def _network_names() -> list[str]:
    return list(DESCRIPTORS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdcn-trt", description="SD1.5 + ControlNet canny: generate, export, score.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="canny-to-image for image files or folders")
    p.add_argument("inputs", nargs="+", help="image files or folders of images")
    p.add_argument("-o", "--output", default="sdcn_out", help="output folder (default: sdcn_out)")
    p.add_argument("--save-control", action="store_true", help="also write the inverted canny map")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--control-image", action="append", default=[],
                   help="control map for the 2nd, 3rd ... ControlNet (repeat in --controlnet order)")
    add_model_args(p)
    add_backend_args(p)
    add_generation_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="export networks to ONNX, checked against torch on onnxruntime")
    p.add_argument("--networks", nargs="+", default=None, help="default: all of " + ", ".join(_network_names()))
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    p.add_argument("--opset", type=int, default=17)
    add_shape_args(p, "tracing/check shape")
    p.add_argument("--static", action="store_true", help="fixed shapes instead of dynamic batch/height/width")
    p.add_argument("--no-simplify", action="store_true", help="skip onnxslim clean-up")
    p.add_argument("-o", "--output", default=None, help="also copy the files here as <network>.onnx")
    add_model_args(p)
    p.add_argument("--cache-dir", help="export cache (default: $SDCN_TRT_CACHE)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("build", help="build TensorRT engines (TensorRT + GPU) or AOTInductor packages (--backend inductor); "
                                     "warm the ONNX exports (onnxruntime) or torch.compile's caches (torch --compile)")
    p.add_argument("--backend", default="tensorrt", choices=("tensorrt", "inductor", "torch", "onnxruntime"),
                   help="inductor: AOTInductor packages (Triton kernels on a GPU, C++ on the CPU); torch / onnxruntime: "
                        "one image at the build shape, leaving torch.compile's caches (with --compile) or the ONNX "
                        "exports for the next process")
    p.add_argument("--compile", default="off", choices=COMPILE_MODES, help="torch: the torch.compile mode to warm")
    p.add_argument("--compile-scope", default="whole", choices=COMPILE_SCOPES, help="torch --compile: whole or blocks")
    p.add_argument("--compile-flags", nargs="*", default=(), choices=list(COMPILE_FLAGS), metavar="FLAG",
                   help=f"torch --compile: inductor settings ({', '.join(COMPILE_FLAGS)})")
    p.add_argument("--networks", nargs="+", default=None, help="the networks to build (torch --compile: to compile); "
                   "default: text_encoder control_hint fused_step vae_decoder")
    p.add_argument("--precision", default="fp16", choices=PRECISIONS)
    p.add_argument("--optimization-level", type=int, default=3, help="builder optimization level 0..5")
    p.add_argument("--workspace-gib", type=float, default=8.0)
    add_shape_args(p, "optimum (and static) shape")
    p.add_argument("--dynamic", action="store_true", help="dynamic profile instead of the static contest shape")
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--min-side", type=int, default=256)
    p.add_argument("--max-side", type=int, default=768)
    p.add_argument("--refit", action="store_true",
                   help="refittable engines, keyed by graph: other weights (--lora, another ControlNet) are refitted in, "
                        "not rebuilt")
    p.add_argument("--max-autotune", action="store_true", help="inductor: autotune GEMMs/convolutions (longer builds)")
    add_model_args(p)
    p.add_argument("--device", default="cuda")
    p.add_argument("--cache-dir", help="engine cache (default: $SDCN_TRT_CACHE)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("score", help="latency + PD + contest score of a backend against the torch fp32 reference",
                       description="Latency is the contest's: wall clock around one whole generate call per image "
                                   "after warm-up (the contest timed hackathon.process() after initialize()); "
                                   "inputs are read and outputs written as its compute_score.py did (cv2.imread, "
                                   "cv2.imwrite), so on the same photos and settings score writes the images that "
                                   "scorer writes when it runs beside `sdcn-trt contest-kit`.")
    p.add_argument("inputs", nargs="?", default=None, help="folder of input images (default: scikit-image photos)")
    p.add_argument("-o", "--output", default="sdcn_score", help="report folder (default: sdcn_score)")
    p.add_argument("--schedules", nargs="+", default=["full"],
                   help=f"schedules to score against the full fp32 reference: {SPELLINGS}")
    p.add_argument("--schedule-file", action="append", default=[], help="also score this JSON schedule (repeatable)")
    p.add_argument("--image-format", default="jpg", choices=("jpg", "png"))
    p.add_argument("--reference-dir", help="precomputed reference images, matched by file stem")
    p.add_argument("--fid-weights", help="pt_inception-2015-12-05-6726825d.pth (default: $SDCN_FID_WEIGHTS, hub cache)")
    p.add_argument("--random-fid", action="store_true", help="seeded random Inception (tests/demo; PD not the contest's)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    p.add_argument("--batch-size", type=int, default=None,
                   help="also time all inputs through batched calls of this many photos: a throughput line "
                        "(the contest latency stays one photo per call)")
    add_model_args(p)
    add_backend_args(p)
    add_generation_args(p, exclude=("schedule",))
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("tune", help="measure schedules on your weights and photos; write the best as a schedule file")
    p.add_argument("inputs", nargs="?", default=None, help="folder of photos (default: scikit-image photos)")
    p.add_argument("-o", "--output", default="sdcn_tune", help="results folder, also the resumable cache")
    p.add_argument("--candidates", nargs="+", help="schedules to measure (default: full, steps=N/2, eps/control/"
                                                   "deepcache families)")
    p.add_argument("--schedule-file", action="append", default=[], help="also measure this JSON schedule")
    p.add_argument("--samplers", nargs="+", choices=SAMPLER_NAMES,
                   help="measure every candidate with each of these samplers (default: --sampler's); the "
                        "reference stays DDIM's full schedule")
    p.add_argument("--no-greedy", action="store_true", help="skip the greedy search after the candidates")
    p.add_argument("--greedy-kinds", nargs="+", default=["reuse_eps", "reuse_control"],
                   help="what a dropped full step may become: reuse_eps reuse_control shallow")
    p.add_argument("--greedy-budget", type=int, default=40, help="at most this many greedy candidates")
    p.add_argument("--max-pd", type=float, default=4.0, help="quality bound with FID weights (mean PD)")
    p.add_argument("--min-ssim", type=float, default=0.9, help="quality bound without them (mean SSIM)")
    p.add_argument("--fid-weights", help="pt_inception-2015-12-05-6726825d.pth (default: $SDCN_FID_WEIGHTS, hub cache)")
    p.add_argument("--random-fid", action="store_true", help="seeded random Inception (plumbing; PD not the contest's)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per candidate")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_model_args(p)
    add_backend_args(p)
    add_generation_args(p, exclude=("schedule",))
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("batch", help="every image in a folder, resumable; --ray for many GPUs")
    p.add_argument("input_dir")
    p.add_argument("output_dir")
    p.add_argument("--prompts", help="CSV (file,prompt,n_prompt,seed) or JSONL with those keys, per image")
    p.add_argument("--save-control", action="store_true", help="also write <name>_canny.png")
    p.add_argument("--no-recursive", action="store_true", help="only the folder itself, not sub-folders")
    p.add_argument("--ray", action="store_true", help="run on Ray (a local cluster unless --ray-address)")
    p.add_argument("--ray-address", help="address of a running Ray cluster (implies --ray)")
    p.add_argument("--workers", type=int, help="Ray actors (default: one per GPU, else one per CPU)")
    p.add_argument("--chunk-size", type=int, default=4, help="images per Ray task (at least --batch-size)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="photos per network call: queued files of one size and settings are grouped (default: 1)")
    add_model_args(p)
    add_backend_args(p)
    add_generation_args(p)
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("demo", help="offline main job: a small trained model on scikit-image's sample photos")
    p.add_argument("--preset", default="tiny-trained", choices=preset_names(),
                   help="tiny-trained: trained here on scikit-image's photos (not SD1.5); tiny: random weights")
    p.add_argument("-o", "--output", default="sdcn_demo", help="output folder (default: sdcn_demo)")
    p.add_argument("--backends", nargs="+", default=["torch", "onnxruntime"], choices=BACKENDS,
                   help="torch (always, the reference) and these, where available (default: torch onnxruntime)")
    p.add_argument("--ddim-steps", type=int, default=20)
    p.add_argument("--samples", nargs="+", default=None, help="skimage.data names (default: four photos)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("samplers", help="list the samplers (--sampler) with a line on each",
                       description="The samplers generate, batch, score, tune and the web page offer. ddim is the "
                                   "original code's and the contest's; the others follow diffusers' schedulers.")
    p.set_defaults(func=cmd_samplers)

    p = sub.add_parser("cache", help="what the cache holds, for which torch / GPU, its size; remove stale entries",
                       description="Lists the sdcn_trt cache ($SDCN_TRT_CACHE, else ~/.cache/sdcn_trt) kind by kind: "
                                   "converted weights, ONNX exports, TensorRT engines, AOTInductor packages, "
                                   "torch.compile caches, reference images, remembered file hashes. An entry made by "
                                   "another torch or Python (compiled code), a hash of a file that is gone, or a "
                                   "temporary of a write that stopped hours ago is stale: this install can never use "
                                   "it (compiled code of another torch may be another install's, sharing this cache: "
                                   "run --remove-stale from the install whose entries you keep).")
    p.add_argument("--cache-dir", default=None, help="the cache folder (default: $SDCN_TRT_CACHE, else ~/.cache/sdcn_trt)")
    p.add_argument("--entries", action="store_true", help="list every entry with its size and what made it")
    p.add_argument("--remove-stale", action="store_true", help="remove the entries this install can never use")
    p.add_argument("--remove", nargs="+", metavar="KIND", choices=list(CACHE_KINDS.values()),
                   help=f"remove every entry of these kinds: {', '.join(CACHE_KINDS.values())}")
    p.set_defaults(func=cmd_cache)

    add_contest_kit_parser(sub)
    add_app_parser(sub)
    return parser


# third-party loggers kept to these levels unless -v
QUIET_LOGGERS = {"transformers": logging.ERROR, "diffusers": logging.ERROR, "Polygraphy": logging.WARNING,
                 "httpx": logging.WARNING}  # httpx: Gradio's start-up self-checks (sdcn-trt app)


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:  # warnings.showwarning
    logging.getLogger("py.warnings").debug("%s:%s: %s: %s", filename, lineno, category.__name__, message)


def setup_logging(verbose: bool) -> None:
    """Our log lines on stderr (INFO; DEBUG with -v). Python warnings — torch.onnx's TracerWarnings,
    diffusers' and transformers' FutureWarnings and deprecations — are logged at DEBUG, so only -v
    shows them; transformers' and diffusers' own loggers keep to errors unless -v."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    warnings.showwarning = _log_warning
    if verbose:
        return
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for variable in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):  # read when they set up their loggers
        os.environ.setdefault(variable, "error")  # (after this, on first import; Ray workers inherit it)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except SdcnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file the system refused (permissions, a full disk) that no check caught first
        logger.debug("traceback of the error below", exc_info=True)
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where} (-v shows where it happened)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
