"""Time to first image: load an SD1.5-sized single file, each case in its own process.

    python -m benchmarks.startup                       # writes the file once, runs every case, deletes it
    python -m benchmarks.startup --keep --work /tmp/x  # keep the file and caches for another run
    python -m benchmarks.startup --baseline /path/to/older/checkout   # adds a row measured with older code
    python -m benchmarks.startup --preset tiny --cases "preset compiled"  # torch.compile: compile, then from cache

    python -m benchmarks.startup --device cuda         # the GPU cases (GPU_CASES): eager, compiled, AOTInductor

The file is written by the project's own `ldm_layout.save_single_file` from the sd15-random preset
(the layout and size of control_sd15_canny.pth: 5.71 GB fp32). Per case: imports, load, a ready
pipeline (every runner activated: torch modules built, onnxruntime sessions made), a first 1-step
256x384 image, and the peak resident memory (ru_maxrss, which counts mapped file pages once touched).
'cold' starts with an empty cache folder (the file is hashed, converted and written to the weights
cache), 'warm' with that cache present. The 'compiled' cases run every network through torch.compile
(BackendConfig.compile='default'): cold compiles, warm compiles from the caches the cold case left in the
case's cache folder (sdcn_trt.engines.compile_cache), each process with a temp folder of its own. The
'inductor' cases build every network's AOTInductor package (with the weights the cases before left),
then load them.

On a GPU (`--device cuda`) the cases start from the preset (no file to write), make a 20-step fp16 image,
and separate the two caches: 'compile-cold' starts with the weights cache the cases before left but
no compiled code (torch.compile's caches, AOTInductor packages), so the compile is timed without the
weights being drawn again. 'compiled fp16, warm' and 'inductor fp16, warm' are the goal's rows: the
first image within 5 s of process start, with the compiled step and the weights cached. The report is
written after every case, so a run stopped midway keeps the cases it finished.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as a script (each case's child process), Python puts this folder first on sys.path, where
# benchmarks/profile.py would shadow the standard library's profile module (cProfile imports it).
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

START = time.perf_counter()
# (label, source, backend, precision, cache state[, torch.compile mode]): 'none' = cache=False, 'cold' = an
# empty cache folder, 'warm' = the cache the case before left, 'compile-cold' = the weights the cases before
# left and nothing else
CASES: list[tuple[str, ...]] = [
    ("torch fp32, no cache", "file", "torch", "fp32", "none"),
    ("torch fp32, cold", "file", "torch", "fp32", "cold"),
    ("torch fp32, warm", "file", "torch", "fp32", "warm"),
    ("torch fp16, cold", "file", "torch", "fp16", "cold"),
    ("torch fp16, warm", "file", "torch", "fp16", "warm"),
    ("onnxruntime fp32, first run (exports)", "file", "onnxruntime", "fp32", "cold"),
    ("onnxruntime fp32, warm", "file", "onnxruntime", "fp32", "warm"),
    ("preset, cold", "preset", "torch", "fp32", "cold"),  # the preset the file is written from, drawn
    ("preset, warm", "preset", "torch", "fp32", "warm"),  # ... and mapped from the weights cache
    ("preset compiled, cold", "preset", "torch", "fp32", "cold", "default"),  # every network compiled ...
    ("preset compiled, warm", "preset", "torch", "fp32", "warm", "default"),  # ... and again from the caches
    ("preset inductor, package built", "preset", "inductor", "fp32", "compile-cold"),  # AOTInductor packages ...
    ("preset inductor, warm", "preset", "inductor", "fp32", "warm"),  # ... loaded from the cache
]
GPU_CASES: list[tuple[str, ...]] = [
    ("fp16, weights drawn", "preset", "torch", "fp16", "cold"),  # eager torch; the weights cache written
    ("fp16, warm", "preset", "torch", "fp16", "warm"),
    ("compiled fp16, compile cold", "preset", "torch", "fp16", "compile-cold", "default"),  # torch.compile ...
    ("compiled fp16, warm", "preset", "torch", "fp16", "warm", "default"),  # ... from its caches: a goal row
    ("inductor fp16, package built", "preset", "inductor", "fp16", "compile-cold"),  # AOTInductor packages ...
    ("inductor fp16, warm", "preset", "inductor", "fp16", "warm"),  # ... loaded: the other goal row
]
STEPS = {"cpu": 1, "cuda": 20}  # the first image's denoising steps: one on a CPU, the contest's 20 on a GPU


def rss_now() -> dict[str, float]:
    """Current resident memory in GiB: anonymous and file-backed (memory-mapped weights) pages."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "RssAnon", "RssFile")):
                name, value = line.split(":")
                fields[name] = int(value.split()[0]) / 2**20
    return fields


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ---------------------------------------------------------------------------------------------
# One case, in this process
# ---------------------------------------------------------------------------------------------
def run_case(args: argparse.Namespace) -> dict[str, Any]:
    import inspect

    import cv2
    import skimage.data

    from sdcn_trt import BackendConfig, ControlNetPipeline, GenerationConfig

    # the libraries any load imports, timed apart (seconds on a quiet machine, many more on a busy one)
    import diffusers.loaders.single_file_utils  # noqa: F401
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401

    import logging

    logs: list[str] = []  # what the package says about the caches it used
    handler = logging.Handler()
    handler.emit = lambda record: logs.append(f"{record.name}: {record.getMessage()}")  # type: ignore[method-assign]
    logging.getLogger("sdcn_trt").addHandler(handler)
    logging.getLogger("sdcn_trt").setLevel(logging.INFO)
    result: dict[str, Any] = {"load_average": os.getloadavg()[0], "import_s": time.perf_counter() - START,
                              "rss_before_load_gib": rss_now()["VmRSS"], "logs": logs}
    backend = BackendConfig(backend=args.backend, device=args.device, precision=args.precision,
                            cache_dir=args.cache_dir, compile=args.compile)
    kwargs: dict[str, Any] = {}
    params = inspect.signature(ControlNetPipeline.from_single_file).parameters
    if "cache" in params:
        kwargs["cache"] = args.cache != "none"
    else:
        result["code"] = "baseline (no weights cache)"
    clock = time.perf_counter()
    if args.source == "preset":
        pipe = ControlNetPipeline.from_preset(args.preset, backend=backend, **kwargs)
    else:
        pipe = ControlNetPipeline.from_single_file(args.file, backend=backend, **kwargs)
    result["load_s"] = time.perf_counter() - clock
    for name, runner in pipe.runners.items():
        runner.activate()  # torch: modules built; onnxruntime: exports found (or made) and sessions created
    result["ready_s"] = time.perf_counter() - clock
    result["ready_from_start_s"] = time.perf_counter() - START
    result["rss_at_ready_gib"] = rss_now()
    result["peak_rss_at_ready_gib"] = peak_rss_gib()
    components = pipe.components
    if hasattr(components, "is_loaded"):
        result["torch_weights_loaded_at_ready"] = components.is_loaded()
    photo = cv2.resize(skimage.data.chelsea(), (451, 300), interpolation=cv2.INTER_AREA)  # -> 256 x 384
    clock = time.perf_counter()
    steps = STEPS[args.device.split(":")[0]] if args.steps is None else args.steps
    result["steps"] = steps
    if args.precision == "fp16" and args.device == "cpu":
        # fp16 networks on a CPU take minutes per call (no fast fp16 kernels): read every weight once instead
        for module in components.modules().values():
            for tensor in module.state_dict().values():
                tensor.sum()
        result["weights_read_s"] = time.perf_counter() - clock
    else:
        image = pipe.run(photo, GenerationConfig(ddim_steps=steps)).images[0]
        result["first_image_s"] = time.perf_counter() - clock
        result["first_image_from_start_s"] = time.perf_counter() - START
        result["image_shape"] = list(image.shape)
        result["image_sha256"] = hashlib.sha256(image.tobytes()).hexdigest()  # cold and warm cases: the same image?
        clock = time.perf_counter()
        pipe.run(photo, GenerationConfig(ddim_steps=steps))
        result["second_image_s"] = time.perf_counter() - clock  # the same work, weights in memory
    if hasattr(components, "is_loaded"):
        result["torch_weights_loaded_after_image"] = components.is_loaded()
    result["rss_after_image_gib"] = rss_now()
    result["peak_rss_gib"] = peak_rss_gib()
    if args.cache != "none" and "code" not in result:  # the weights cache entry it used (for its size), keyed
        from sdcn_trt.models.weights_cache import entry_folder  # as the components name their weights

        folder = entry_folder(Path(args.cache_dir), components.weights_id(args.precision), args.precision)
        result["weights_entry"] = folder.name if folder.exists() else None
    exports = {n: {"cached": r.export.cached, "seconds": r.export.seconds}
               for n, r in pipe.runners.items() if getattr(r, "export", None) is not None}
    if exports:
        result["exports"] = exports
    return result


# ---------------------------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------------------------
def write_file(path: Path, preset: str) -> dict[str, Any]:
    """The ldm single file (SD1.5-sized for sd15-random), written in a process of its own."""
    code = ("import sys; from sdcn_trt.models.presets import load_preset; from sdcn_trt.models.ldm_layout import save_single_file; "
            "save_single_file(load_preset(sys.argv[2], seed=0, cache=False), sys.argv[1])")
    clock = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(path), preset], check=True)
    return {"seconds": time.perf_counter() - clock, "bytes": path.stat().st_size}


def evict(folder: Path) -> None:
    """Drop every file under `folder` from the page cache (after writing dirty pages back)."""
    os.sync()
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def weights_bytes(cache: Path, entry: str | None) -> int | None:
    """Size of the weights cache entry the case used (the weights' own size at its precision), by the
    entry's folder name as the case reported it; None when it reported none (a baseline checkout)."""
    path = cache / "weights" / entry / "weights.safetensors" if entry else None
    return path.stat().st_size if path is not None and path.exists() else None


def markdown(report: dict[str, Any]) -> str:
    gb = 1e9
    device = report.get("device", "cpu")
    steps = sorted({c["steps"] for c in report["cases"] if "steps" in c}) or [STEPS.get(device, 1)]
    source = (f"File: an ldm single file in control_sd15_canny.pth's layout, written by `ldm_layout.save_single_file` "
              f"from the {report['preset']} preset, {report['file_bytes'] / gb:.2f} GB (fp32). " if "file_bytes" in report
              else f"Weights: the {report['preset']} preset, drawn by the first case and cached. ")
    lines = [f"# Start-up benchmark {report['date']} ({device})", "",
             source + "Each case ran in its own process, one "
             "after another. 'ready': from_single_file (or from_preset) plus every runner activated (torch: the weights "
             "mapped and paged in, compiled when the case says so; onnxruntime: the sessions made; inductor: the "
             f"packages built or loaded); 'first image': one {'/'.join(map(str, steps))}-step "
             "256x384 image after that; 'imports': torch, diffusers, transformers and the package, before any "
             "clock starts ('from start' adds them back). Peak RSS is ru_maxrss over the "
             "whole process (mapped weight pages count once touched). " + ("The file and cache entries sat in the page "
             "cache as the case before left it" if not report.get("evict") else "The file and cache entries were "
             "dropped from the page cache before each case (read from disk, ~0.3 GB/s here)") + ". The machine's "
             "other jobs shared the 2 cores and the memory (load average when each case started is in the table; "
             "the times are several times what a quiet machine gives).", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in report["machine"].items()), "",
             "| case | imports s | load s | ready s | first image s (second) | ready from start s | "
             "first image from start s | RSS before load GiB | peak RSS GiB | peak RSS / weights | torch weights read "
             "| load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in report["cases"]:
        if "error" in c:
            lines.append(f"| {c['label']} | failed: {c['error'][:100].replace('|', '/')} |" + " |" * 10)
            continue
        ratio = (f"{c['peak_rss_gib'] * 2**30 / c['weights_bytes']:.2f}x ({c['weights_bytes'] / gb:.2f} GB)"
                 if c.get("weights_bytes") else "-")
        loaded = c.get("torch_weights_loaded_after_image")
        image = (f"{c['first_image_s']:.1f} ({c['second_image_s']:.1f})" if "first_image_s" in c
                 else f"not run (every weight read once: {c['weights_read_s']:.1f})")
        from_start = f"{c['first_image_from_start_s']:.1f}" if "first_image_from_start_s" in c else "-"
        lines.append(f"| {c['label']} | {c['import_s']:.1f} | {c['load_s']:.1f} | {c['ready_s']:.1f} | "
                     f"{image} | {c['ready_from_start_s']:.1f} | {from_start} | {c.get('rss_before_load_gib', 0):.2f} | "
                     f"{c['peak_rss_gib']:.2f} | "
                     f"{ratio} | {'-' if loaded is None else 'yes' if loaded else 'no'} | {c['load_average']:.1f} |")
    lines += ["", "'first image': its denoising steps plus CLIP, hint and VAE decode; the second, identical "
              "call in brackets shows how much of the first was paging the weights in. fp16 on a CPU has no fast "
              "kernels (fp16 is for GPUs): those cases read every weight once instead of making an image. "
              "'peak RSS / weights': against the size of the weights the case holds (the fp32 or fp16 cache "
              "entry; for a run without cache, the file). 'torch weights read': whether the torch networks' "
              "weights were loaded at all by the end (onnxruntime with cached exports reads none)."]
    return "\n".join(lines) + "\n"


def startup_device(text: str) -> str:
    """--device: cpu, cuda or cuda:N (argparse turns the ValueError into a usage error)."""
    if text.split(":")[0] not in STEPS:
        raise ValueError(text)
    return text


def plan_runs(device: str, preset: str, labels: list[str] | None,
              baseline: str | None) -> list[tuple[str, str, str, str, str, str, str | None]]:
    """The cases to run on `device`, in order, as (label, source, backend, precision, cache state,
    torch.compile mode, older checkout or None); `labels` picks cases by label or prefix."""
    table = CASES if device == "cpu" else GPU_CASES
    cases = [c for c in table if not labels or any(c[0].startswith(p) for p in labels)]
    if labels and not cases:
        raise SystemExit(f"no {device} case matches {labels}; the cases: " + "; ".join(c[0] for c in table))
    runs = [(f"{preset} {label}" if source == "preset" and device == "cpu" else label, source, backend, precision,
             cache, compile_mode[0] if compile_mode else "off", None)
            for label, source, backend, precision, cache, *compile_mode in cases]
    if baseline:
        runs.insert(0, ("torch fp32, baseline code", "file", "torch", "fp32", "none", "off", baseline))
    return runs


def prepare_cache(shared: Path, cache_dir: Path, state: str) -> None:
    """The case's cache folder as `state` asks. Every case's weights live in one folder of the suite
    (`shared`, linked into the case's cache): 'cold' and 'none' empty both, 'compile-cold' empties
    the case's folder but keeps the weights, 'warm' keeps everything."""
    if state in ("cold", "none", "compile-cold") and cache_dir.exists():
        shutil.rmtree(cache_dir)
    if state in ("cold", "none") and shared.exists():
        shutil.rmtree(shared)
    shared.mkdir(parents=True, exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    link = cache_dir / "weights"
    if not link.is_symlink():
        link.symlink_to(shared, target_is_directory=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="/tmp/sdcn-startup", help="where the file and the caches go")
    parser.add_argument("--preset", default="sd15-random", help="the preset the single file is written from")
    parser.add_argument("--device", default="cpu", type=startup_device, help="cpu (CASES) or cuda[:N] (GPU_CASES)")
    parser.add_argument("--steps", type=int, help="the first image's steps (default: 1 on a CPU, 20 on a GPU)")
    parser.add_argument("--keep", action="store_true", help="keep the file and caches (default: delete them)")
    parser.add_argument("--cases", nargs="+", help="labels (or prefixes) of the cases to run")
    parser.add_argument("--baseline", help="an older checkout: adds 'torch fp32, baseline' run with its code")
    parser.add_argument("--weights", help="a weights cache folder to share (another run's; default: one in --work). "
                        "Only cases that keep the weights ('warm', 'compile-cold') may use it")
    parser.add_argument("--out", nargs="+", default=[str(Path(__file__).parent / "results")],
                        help="folders for startup-<device>-<date>.json / .md")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per case")
    # one case in this process (what the suite runs in a subprocess)
    parser.add_argument("--case", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--file")
    parser.add_argument("--source", default="file", choices=("file", "preset"))
    parser.add_argument("--evict", action="store_true",
                        help="drop the file and the caches from the page cache before each case (a cold disk)")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--cache", default="warm")
    parser.add_argument("--cache-dir")
    parser.add_argument("--compile", default="off")
    parser.add_argument("--result")
    args = parser.parse_args()
    if args.case:
        Path(args.result).write_text(json.dumps(run_case(args), indent=1))
        return 0

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.__main__ import machine
    from sdcn_trt.engines.inductor.child import run_child

    device = args.device.split(":")[0]
    runs = plan_runs(device, args.preset, args.cases, args.baseline)
    if args.weights and any(cache in ("cold", "none") for *_, cache, _, _ in runs):
        raise SystemExit("--weights is another run's weights cache, which a cold case would empty: "
                         "pick 'warm' and 'compile-cold' cases only, or leave --weights out")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"control_{args.preset}.pth"
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "preset": args.preset, "device": device,
                              "machine": machine(args.device), "evict": args.evict, "cases": []}
    if any(source == "file" for _, source, *_ in runs):
        if not path.exists():
            print(f"writing {path} ...", flush=True)
            report["file_written"] = write_file(path, args.preset)
        report["file_bytes"] = path.stat().st_size
    out_dirs = [Path(folder) for folder in args.out]
    for folder in out_dirs:
        folder.mkdir(parents=True, exist_ok=True)
    shared = Path(args.weights) if args.weights else work / "weights"
    stem = f"startup-{device}-{time.strftime('%Y%m%d-%H%M')}"
    for label, source, backend, precision, cache, compile_mode, code in runs:
        cache_dir = work / (f"cache-{source}-{backend}" + ("" if compile_mode == "off" else "-compiled"))
        prepare_cache(shared, cache_dir, cache)  # cold: no weights cache, no hash memo, no exports
        if args.evict:
            evict(work)
            if args.weights:  # another run's folder, outside `work`
                evict(shared)
        print(f"case {label} ...", flush=True)
        out = work / "case.json"
        # run as a script, so that only sdcn_trt comes from PYTHONPATH (the baseline's, when asked)
        env = dict(os.environ, PYTHONPATH=code or os.environ.get("PYTHONPATH", str(Path(__file__).parent.parent)))
        env["TMPDIR"] = tempfile.mkdtemp(prefix="case-tmp-", dir=work)  # a temp folder of its own, as a new process has
        env.pop("TORCHINDUCTOR_CACHE_DIR", None)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--case", "--file", str(path), "--backend", backend,
               "--precision", precision, "--cache", cache, "--cache-dir", str(cache_dir), "--result", str(out),
               "--source", source, "--preset", args.preset, "--device", args.device]
        cmd += (["--compile", compile_mode] if compile_mode != "off" else []) + ([f"--steps={args.steps}"] if args.steps else [])
        # a timeout ends the case's process group; an inductor build child it started dies with it
        outcome = run_child(cmd, args.timeout, env=env)
        case = json.loads(out.read_text()) if outcome.ok else {"error": outcome.how()}
        if not outcome.ok:
            print(outcome.details(), file=sys.stderr, flush=True)
        shutil.rmtree(env["TMPDIR"], ignore_errors=True)
        case.update(label=label, source=source, backend=backend, precision=precision, cache=cache, compile=compile_mode,
                    page_cache="evicted" if args.evict else "as the case before left it")
        held = weights_bytes(cache_dir, case.get("weights_entry")) if cache != "none" else report.get("file_bytes")
        if held is not None:
            case["weights_bytes"] = held if backend == "torch" else None
        report["cases"].append(case)
        print(json.dumps(case)[:600], flush=True)
        for folder in out_dirs:  # after every case: a run stopped midway keeps what it finished
            (folder / f"{stem}.json").write_text(json.dumps(report, indent=1))
            (folder / f"{stem}.md").write_text(markdown(report))
    if not args.keep:
        shutil.rmtree(work)
    table = markdown(report)
    if not args.cases and args.preset == "sd15-random" and device == "cpu":  # the full CPU run is what LATEST shows
        (out_dirs[0] / "LATEST-startup-cpu.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
