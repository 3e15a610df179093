"""Which AOTInductor load strategy works on this machine: each one tried in its own process, in order,
until one compiles (in its build child), loads (here, with the real weights) and runs every network.

    python -m benchmarks.inductor_probe --device cuda --preset sd15-random --precision fp16

The first GPU run's SD1.5-sized package died (SIGSEGV) inside AOTInductor's loader; the strategies
(sdcn_trt.engines.inductor.plan.LOAD_STRATEGIES) each change one suspect. The packages land in the
cache ($SDCN_TRT_CACHE), keyed without the strategy, so the benchmark that follows reuses them. The
last line printed is `SDCN_TRT_INDUCTOR_LOAD=<name>` (exit 0), or says that none loaded (exit 1).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PIPELINE = ["text_encoder", "control_hint", "fused_step", "vae_decoder"]


def probe_one(args: argparse.Namespace) -> dict[str, Any]:
    """Build (or reuse) and load each network's package under strategy `args.one`, run it once."""
    import torch

    from sdcn_trt.config import BackendConfig
    from sdcn_trt.engines.inductor.runner import InductorRunner
    from sdcn_trt.engines.inductor.plan import InductorSettings
    from sdcn_trt.export.descriptors import ShapeSpec, get_descriptor
    from sdcn_trt.models.presets import load_preset

    import logging

    from sdcn_trt.engines.inductor.child import say_progress

    handler = logging.Handler()  # the build's progress lines, on to the parent as they come
    handler.emit = lambda record: say_progress(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("sdcn_trt").addHandler(handler)
    logging.getLogger("sdcn_trt").setLevel(logging.INFO)
    components = load_preset(args.preset, seed=0)
    config = BackendConfig(backend="inductor", device=args.device, precision=args.precision)
    settings = InductorSettings(load=args.one, wrapper_opt=args.wrapper_opt)
    networks: dict[str, Any] = {}
    for name in args.networks:
        desc = get_descriptor(name, components)
        runner = InductorRunner(desc, config, settings)
        clock = time.perf_counter()
        runner.activate()
        activate_s = time.perf_counter() - clock
        feed = desc.sample_inputs(ShapeSpec(), runner.device)
        outputs = runner.infer(feed)
        bad = sum(int((~torch.isfinite(t)).sum()) for t in outputs.values())
        package = runner.package
        assert package is not None
        networks[name] = {"cached": package.cached, "build_s": package.built_seconds, "activate_s": activate_s,
                          "size_mib": package.size_bytes / 2**20, "check": package.check, "nonfinite": bad,
                          "notes": package.notes, "phases": package.phases}
        runner.deactivate()
    return {"strategy": args.one, "networks": networks}


def folder_space(path: Path) -> str:
    try:
        usage = shutil.disk_usage(path)
    except OSError as exc:
        return f"{path}: {exc}"
    return f"{path}: {usage.free / 2**30:.1f} GiB free of {usage.total / 2**30:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="sd15-random")
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--networks", nargs="+", default=PIPELINE, help="default: the pipeline's four networks")
    parser.add_argument("--strategies", nargs="+", help="default: every strategy, in order")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per strategy")
    parser.add_argument("--wrapper-opt", default="O0", choices=("O0", "O1"),
                        help="the C++ wrapper's optimisation level (InductorSettings.wrapper_opt, default O0)")
    parser.add_argument("--out", nargs="*", default=[], help="folders for inductor-probe-<device>.json / .md")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child: this strategy only
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        Path(args.result).write_text(json.dumps(probe_one(args), indent=1, default=str))
        return 0

    from sdcn_trt.cache import cache_root
    from sdcn_trt.engines.inductor.child import python_command, run_child
    from sdcn_trt.engines.inductor.plan import LOAD_ENV, LOAD_STRATEGIES

    names = args.strategies or [s.name for s in LOAD_STRATEGIES]
    print("space: " + "; ".join(folder_space(p) for p in (Path(tempfile.gettempdir()), cache_root())), flush=True)
    rows, chosen = [], None
    for name in names:
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            cmd = python_command("benchmarks.inductor_probe", "--one", name, "--result", tmp.name, "--device",
                                 args.device, "--preset", args.preset, "--precision", args.precision,
                                 "--networks", *args.networks, "--wrapper-opt", args.wrapper_opt)
            outcome = run_child(cmd, args.timeout, progress=lambda line: print(f"  {line}", flush=True))
            row: dict[str, Any] = {"strategy": name, "seconds": outcome.seconds}
            if outcome.ok:
                row.update(json.loads(Path(tmp.name).read_text()))
            else:
                row.update(error=outcome.how(), details=outcome.details())
        rows.append(row)
        print(f"strategy {name}: " + ("loads and runs" if outcome.ok else f"failed: {row['error']}")
              + f" ({outcome.seconds:.0f} s)", flush=True)
        if not outcome.ok:
            print(row["details"], flush=True)
        if outcome.ok:
            chosen = name
            break
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": args.device, "preset": args.preset,
              "precision": args.precision, "wrapper_opt": args.wrapper_opt, "tried": rows, "chosen": chosen}
    write(report, args.out)
    print(f"{LOAD_ENV}={chosen}" if chosen else f"no load strategy loaded the packages (tried: {', '.join(names)})")
    return 0 if chosen else 1


def phase_split(phases: dict[str, float]) -> str:
    """' (torch.export 12, AOTInductor 70)': where a build's seconds went, when the package was built with
    its phases timed: the child's set-up (the networks built with seeded weights), torch.export, and
    AOTInductor, split into lowering, code generation and C++ compile where inductor timed them."""
    if "export_s" not in phases or "aoti_s" not in phases:
        return ""
    from sdcn_trt.engines.inductor.plan import INDUCTOR_PHASES, PHASE_WORDS

    outer = ", ".join(f"{PHASE_WORDS[k]} {phases[k]:.0f}" for k in ("setup_s", "export_s", "aoti_s") if k in phases)
    inside = ", ".join(f"{PHASE_WORDS[k]} {phases[k]:.0f}" for k in INDUCTOR_PHASES.values() if k in phases)
    return f" ({outer}{': ' + inside if inside else ''})"


def write(report: dict[str, Any], folders: list[str]) -> None:
    lines = [f"# AOTInductor load strategies, {report['date']} ({report['device']}, {report['preset']}, "
             f"{report['precision']}, C++ wrapper {report.get('wrapper_opt', 'O1')})", "",
             "| strategy | result | network: build s (its phases) / load s / MiB / max abs diff |", "|---|---|---|"]
    for row in report["tried"]:
        nets = "; ".join(f"{n} {v['build_s']:.0f}{phase_split(v.get('phases', {}))} / {v['activate_s']:.1f} / "
                         f"{v['size_mib']:.1f} / "
                         f"{max((c['max_abs'] for c in v['check'].values()), default=float('nan')):.1e}"
                         for n, v in row.get("networks", {}).items())
        lines.append(f"| {row['strategy']} | {row.get('error', 'loads and runs').replace('|', '/')} | {nets or '-'} |")
    notes = [f"- {row['strategy']}, {n}: {note}" for row in report["tried"]
             for n, v in row.get("networks", {}).items() for note in v.get("notes", [])]
    lines += ["", "Notes (max_autotune skipped, a loader that ignored TMPDIR):", *notes] if notes else []
    for folder in folders:
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"inductor-probe-{report['device'].split(':')[0]}"
        (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
        (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
