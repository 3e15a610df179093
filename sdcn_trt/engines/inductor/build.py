"""AOTInductor compiles and first loads in a child process, and loading a package with its weights.

    python -X faulthandler -m sdcn_trt.engines.inductor.build WORK_FOLDER --stage compile+load

A package holds kernels only (`aot_inductor.package_constants_in_so=False`): the weights are given at
load time (`load_constants`), so one package serves every set of weights of its architecture (a LoRA,
another checkpoint) and the compile needs no real weights. The parent writes WORK_FOLDER/request.json
(the network, its model's classes and configs, precision, device, settings); the child builds the
networks from those configs with seeded random weights, exports and compiles into WORK_FOLDER/model.pt2
("compile"), loads it with those weights and compares it with eager torch ("load"), and writes
WORK_FOLDER/result.json. A compiler or loader that crashes kills the child only: the parent raises
PackageBuildError naming the network, the shapes and the signal, with the child's faulthandler stack.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from sdcn_trt.engines.inductor.child import python_command, run_child, say_progress
from sdcn_trt.engines.inductor.plan import (
    PHASE_WORDS, InductorSettings, LoadStrategy, architecture, autotune_fits, constant_batches, constants_api_missing,
    dynamic_shapes, export_dynamic_shapes, inductor_phases, load_strategy, loader_kwargs, module_tensors, timed_totals,
    unpack_dir,
)
from sdcn_trt.engines.torch import FastPath, cast_input, prepare_module, resolve_dtype
from sdcn_trt.errors import BackendUnavailableError, DeviceMemoryError, SdcnError
from sdcn_trt.export.descriptors import NetworkDescriptor, get_descriptor
from sdcn_trt.export.onnx_export import compare_outputs

logger = logging.getLogger(__name__)

FAULT_ENV = "SDCN_TRT_INDUCTOR_FAULT"  # tests only: "SIGSEGV@compile", "OutOfMemoryError@load", ...
REQUEST, RESULT, PACKAGE = "request.json", "result.json", "model.pt2"
STAGES = ("compile", "load", "compile+load")


class PackageBuildError(SdcnError, RuntimeError):
    """torch.export or AOTInductor failed (or crashed) on a network; the message names it, its shapes and the cause."""


# -- loading a package with its weights ------------------------------------------------------------------
@contextlib.contextmanager
def unpack_env(folder: Path | None) -> Iterator[None]:
    """TMPDIR pointed at `folder` (created) while the loader unpacks the package; nothing when None."""
    if folder is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(folder)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old


def load_compiled(path: Path, device: torch.device, strategy: LoadStrategy, unpack: Path | None = None,
                  notes: list[str] | None = None) -> Any:
    """The package's callable, still without weights. When the loader was told to unpack into `unpack`
    and did not (torch 2.11's loader unpacks into /tmp whatever TMPDIR says), a warning is logged and
    appended to `notes`."""
    from torch._inductor import aoti_load_package

    before = set(unpack.iterdir()) if unpack is not None and unpack.is_dir() else set()
    with unpack_env(unpack):
        compiled = aoti_load_package(str(path), **loader_kwargs(strategy, device))
    if unpack is not None and not set(unpack.iterdir()) - before:
        note = unpack_ignored(unpack)
        logger.warning("%s", note)
        if notes is not None:
            notes.append(note)
    return compiled


def unpack_ignored(unpack: Path) -> str:
    """What to say when the loader unpacked a package somewhere other than `unpack`."""
    return (f"torch {torch.__version__}'s AOTInductor loader ignores TMPDIR: the package was not unpacked in "
            f"{unpack} but in the system temp folder (torch 2.11 unpacks into /tmp/XXXXXX; 2.14 honours TMPDIR)")


def attach_weights(compiled: Any, module: torch.nn.Module, network: str) -> Any:
    """Give the package `module`'s parameters and buffers as its constants, batch by batch (copied into the
    package's own buffers on its device; see constant_batches); returns `compiled`. Not `user_managed=True`,
    which would skip the copy: in torch 2.11 and 2.14 AOTInductor then keeps a reference to every tensor it
    is given that nothing ever releases, so each activation (a LoRA set, a pipeline reopened) would leak a
    copy of the weights."""
    missing = constants_api_missing(compiled)
    if missing:
        raise BackendUnavailableError(f"backend 'inductor' cannot run '{network}': {missing}")
    for batch in constant_batches(list(compiled.get_constant_fqns()), module_tensors(module), network):
        compiled.load_constants(batch, check_full_update=False)  # every name is given (constant_batches checks)
    return compiled


def load_package(path: Path, device: torch.device, strategy: LoadStrategy, module: torch.nn.Module, network: str,
                 unpack: Path | None = None, notes: list[str] | None = None) -> Any:
    """Load the package at `path` and give it `module`'s weights (`notes`: see load_compiled)."""
    return attach_weights(load_compiled(path, device, strategy, unpack, notes), module, network)


def as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


# -- what the child does ---------------------------------------------------------------------------------
def components_from_architecture(arch: dict[str, Any], device: torch.device, seed: int = 0) -> Any:
    """Components of the architecture `arch` (plan.architecture) with weights drawn from
    `seed` on `device`: what a package is compiled and checked with (its kernels do not depend on the
    weights). ControlNet's zero convolutions are drawn too, so its residuals reach the check."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdcn_trt.models.components import Components

    classes: dict[str, Callable[[dict[str, Any]], Any]] = {
        "CLIPTextModel": lambda c: CLIPTextModel(CLIPTextConfig(**c)),
        "UNet2DConditionModel": UNet2DConditionModel.from_config, "ControlNetModel": ControlNetModel.from_config,
        "AutoencoderKL": AutoencoderKL.from_config}

    def build(entry: dict[str, Any]) -> Any:
        if entry["class"] not in classes:
            raise PackageBuildError(f"cannot build a {entry['class']} for an AOTInductor package; known: {sorted(classes)}")
        module = classes[entry["class"]](entry["config"])
        if entry["class"] == "ControlNetModel":
            for conv in [*module.controlnet_down_blocks, module.controlnet_mid_block,
                         module.controlnet_cond_embedding.conv_out]:
                conv.reset_parameters()
        return module

    torch.manual_seed(seed)
    with torch.device(device):
        nets = {name: build(entry) for name, entry in arch["networks"].items()}
        more = [build(entry) for entry in arch["more_controlnets"]]
    return Components(None, nets["text_encoder"], nets["unet"], nets["controlnet"], nets["vae"],
                      source=f"seeded architecture (seed {seed})", more_controlnets=more).eval_()


def compile_package(descriptor: NetworkDescriptor, module: torch.nn.Module, args: tuple[torch.Tensor, ...],
                    settings: InductorSettings, device: torch.device, target: Path,
                    phases: dict[str, float] | None = None) -> str:
    """torch.export + AOTInductor into `target`; returns a note when max_autotune was asked for and
    the GPU had no room for it (compiled with the default instead, with a warning). Each phase's seconds go
    into `phases` (export, aoti: inductor's code generation, kernel and wrapper compiles) and to the parent
    as a progress line when it ends."""
    phases = {} if phases is None else phases
    from torch._dynamo.utils import compilation_time_metrics
    from torch._inductor import aoti_compile_and_package

    autotune, note = settings.max_autotune, ""
    if autotune and device.type == "cuda":
        weights = sum(t.numel() * t.element_size() for t in module_tensors(module).values())
        fits, why = autotune_fits(torch.cuda.mem_get_info(device)[0], weights)
        if not fits:
            autotune, note = False, f"max_autotune skipped: {why}"
    with torch.inference_mode(False), torch.no_grad():
        clock = time.perf_counter()
        shapes = export_dynamic_shapes(module.forward, dynamic_shapes(descriptor, settings.shape_range))
        program = torch.export.export(module, args, dynamic_shapes=shapes, strict=False)
        phases["export_s"] = time.perf_counter() - clock
        say_progress(f"exported in {phases['export_s']:.1f} s ({len(program.graph.nodes)} graph nodes); AOTInductor "
                     "generating and compiling kernels and the C++ wrapper ...")
        clock, timed = time.perf_counter(), timed_totals(compilation_time_metrics)
        try:
            aoti_compile_and_package(program, package_path=str(target), inductor_configs=settings.inductor_configs(autotune))
        except torch.OutOfMemoryError as exc:
            if not autotune:
                raise
            torch.cuda.empty_cache()
            note = f"max_autotune ran out of GPU memory ({str(exc).splitlines()[0]})"
            aoti_compile_and_package(program, package_path=str(target), inductor_configs=settings.inductor_configs(False))
        phases["aoti_s"] = time.perf_counter() - clock
        inside = inductor_phases(timed, timed_totals(compilation_time_metrics))
        phases.update(inside)
        say_progress(f"AOTInductor compiled in {phases['aoti_s']:.1f} s"
                     + (" (" + ", ".join(f"{PHASE_WORDS[k]} {v:.1f} s" for k, v in inside.items()) + ")" if inside else ""))
    if note:
        note += "; compiled with the default settings instead"
        logger.warning("%s: %s", descriptor.name, note)
    return note


def _fault(stage: str) -> None:
    """Tests only: $SDCN_TRT_INDUCTOR_FAULT="WHAT@STAGE" makes the child kill itself with signal WHAT
    (SIGSEGV, SIGKILL) or raise WHAT (RuntimeError, OutOfMemoryError) when it reaches STAGE."""
    what, _, where = os.environ.get(FAULT_ENV, "").partition("@")
    if not what or where != stage:
        return
    if what.startswith("SIG"):
        os.kill(os.getpid(), signal.Signals[what])
    error = torch.OutOfMemoryError if what == "OutOfMemoryError" else RuntimeError
    raise error(f"{what} injected at {stage} by ${FAULT_ENV}")


def child_main(work: Path, stage: str, result: dict[str, Any]) -> None:
    """One build child's work on the request in `work`, recorded in `result` as it goes (result.json)."""
    set_up = time.perf_counter()
    request = json.loads((work / REQUEST).read_text())
    device = torch.device(request["device"])
    settings = InductorSettings.from_json(request["settings"])
    descriptor = get_descriptor(request["network"], components_from_architecture(request["architecture"], device))
    dtype = resolve_dtype(descriptor.precision_for(request["precision"]))
    module = prepare_module(descriptor, device, dtype, FastPath(**request["fast"]))
    feed = descriptor.sample_inputs(settings.trace_spec(), device)
    args = tuple(cast_input(feed[n], device, dtype) for n in descriptor.input_names)
    if stage in ("compile", "compile+load"):
        _fault("compile")
        clock = time.perf_counter()
        phases: dict[str, float] = {"setup_s": clock - set_up}  # the networks built with seeded weights
        result["autotune_note"] = compile_package(descriptor, module, args, settings, device, work / PACKAGE, phases)
        result["compile_s"] = time.perf_counter() - clock
        result["phases"] = phases
    if stage in ("load", "compile+load"):
        _fault("load")
        clock = time.perf_counter()
        strategy = load_strategy(settings.load)
        unpack = Path(request["unpack_dir"]) if request.get("unpack_dir") else None
        notes: list[str] = []
        compiled = load_package(work / PACKAGE, device, strategy, module, descriptor.name, unpack, notes)
        result["load_notes"] = notes
        result["load_s"] = time.perf_counter() - clock
        say_progress(f"loaded in {result['load_s']:.1f} s; checking it against eager torch ...")
        with torch.no_grad():
            expected, actual = as_tuple(module(*args)), as_tuple(compiled(*args))
        names = descriptor.output_names
        result["check"] = compare_outputs(
            {n: e.float().cpu().numpy() for n, e in zip(names, expected, strict=True)},
            {n: a.float().cpu().numpy().astype(np.float32) for n, a in zip(names, actual, strict=True)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="compile and/or load one AOTInductor package (a build child)")
    parser.add_argument("work", type=Path, help="folder holding request.json; model.pt2 and result.json go there")
    parser.add_argument("--stage", default="compile+load", choices=STAGES)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning)
    result: dict[str, Any] = {}
    code = 0
    try:
        child_main(args.work, args.stage, result)
    except Exception as exc:  # the parent re-raises it in its own terms; the traceback stays in the log
        logger.exception("build child failed")
        kind = "DeviceMemoryError" if isinstance(exc, (torch.OutOfMemoryError, DeviceMemoryError)) else type(exc).__name__
        result["error"], code = {"type": kind, "message": f"{type(exc).__name__}: {exc}"}, 1
    previous = json.loads((args.work / RESULT).read_text()) if (args.work / RESULT).exists() else {}
    (args.work / RESULT).write_text(json.dumps({**previous, **result}, indent=1, default=str))
    return code


# -- what the parent does ----------------------------------------------------------------------------------
def build_in_child(descriptor: NetworkDescriptor, device: torch.device, precision: str, settings: InductorSettings,
                   fast: FastPath, work: Path, cache_root: Path, timeout: float | None = None) -> dict[str, Any]:
    """Compile `descriptor`'s network into work/model.pt2 and load-check it, in child processes (one
    for both, or one each when the load strategy wants a fresh process). Returns the child's result;
    raises PackageBuildError (DeviceMemoryError when the GPU ran out of memory) naming the network,
    the shapes and what went wrong: the signal and the faulthandler stack when a child crashed."""
    strategy = load_strategy(settings.load)
    shapes = settings.describe(descriptor)
    what = f"'{descriptor.name}' ({precision}, {device.type}, {shapes})"
    request = {"network": descriptor.name, "architecture": architecture(descriptor), "precision": precision,
               "device": str(device), "settings": settings.to_json(), "fast": asdict(fast),
               "unpack_dir": str(unpack_dir(strategy, 0, cache_root) or "")}
    (work / REQUEST).write_text(json.dumps(request, indent=1))
    stages = ["compile", "load"] if strategy.fresh_process else ["compile+load"]
    for stage in stages:
        clock = time.perf_counter()

        def progress(message: str) -> None:  # the child's phases, as they end: a build is minutes, not silence
            logger.info("%s (AOTInductor, %.0f s): %s", descriptor.name, time.perf_counter() - clock, message)

        outcome = run_child(python_command(__name__, str(work), "--stage", stage), timeout, progress=progress)
        result = json.loads((work / RESULT).read_text()) if (work / RESULT).exists() else {}
        error = result.get("error")
        if outcome.ok and not error:
            continue
        doing = {"compile": "compiling", "load": "loading", "compile+load": "compiling and loading"}[stage]
        if error:
            logger.error("AOTInductor build child of %s failed:\n%s", descriptor.name, outcome.details())
            if error["type"] == "DeviceMemoryError":
                raise DeviceMemoryError(f"out of GPU memory while {doing} {what} with AOTInductor "
                                        f"(load strategy {strategy.name!r}): {error['message']}")
            raise PackageBuildError(f"AOTInductor could not compile {what}: {error['message']}"
                                    if "compile" in stage and "compile_s" not in result else
                                    f"the AOTInductor package of {what} does not load (strategy "
                                    f"{strategy.name!r}): {error['message']}")
        logger.error("AOTInductor build child of %s: %s\n%s", descriptor.name, outcome.how(), outcome.details())
        raise PackageBuildError(
            f"AOTInductor {doing} {what} failed in its child process: {outcome.how()} (load strategy "
            f"{strategy.name!r}); this process is unaffected and nothing was cached.\n{outcome.details()}")
    return json.loads((work / RESULT).read_text())


if __name__ == "__main__":
    sys.exit(main())
