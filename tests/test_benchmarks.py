"""The benchmark suite's plumbing on the tiny preset (speed goals live in benchmarks/results, not here)."""
import dataclasses
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from benchmarks.__main__ import markdown
from benchmarks.case import in_seconds
from sdcn_trt.errors import InputError
from sdcn_trt.scoring.latency import summarize


def test_diffusers_baseline_case_runs(tmp_path):
    out = tmp_path / "case.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.case", "--backend", "diffusers", "--preset", "tiny",
                           "--steps", "1", "--repeats", "2", "--out", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    case = json.loads(out.read_text())
    assert case["end_to_end"]["repeats"] == 2 and 0 < case["end_to_end"]["min_s"] <= case["end_to_end"]["median_s"]


def test_case_times_are_the_scoring_harness_stats_in_seconds():
    assert in_seconds(summarize([30.0, 10.0, 20.0]), warmup=1) == pytest.approx(
        {"median_s": 0.02, "min_s": 0.01, "repeats": 3, "warmup": 1})


def test_markdown_ratios_come_from_the_same_run():
    case = lambda backend, e2e, **extra: {"backend": backend, "precision": "fp32", "cuda_graph": "off",  # noqa: E731
                                          "end_to_end": {"median_s": e2e}, "peak_rss_gib": 1.0, **extra}
    report = {"date": "d", "device": "cpu", "preset": "sd15-random", "steps": 2, "repeats": 2, "machine": {"x": "y"},
              "gemm_peak_tflops": 0.1, "cases": [
                  case("torch", 20.0, fused_step={"median_s": 8.0}, fused_step_tflops_achieved=0.05,
                       outside_steps_fraction=0.2),
                  case("onnxruntime", 10.0), case("diffusers", 40.0),
                  {"backend": "tensorrt", "precision": "fp16", "cuda_graph": "loop", "error": "no GPU"}]}
    report["cases"].append(case("inductor", 5.0, parity={"mean": 0.25, "max": 3}, nonfinite={"fused_step": 0},
                                packages={"fused_step": {"build_s": 100.4, "size_mib": 2000.2},
                                          "vae_decoder": {"build_s": 20.0, "size_mib": 160.0}}))
    table = markdown(report)
    assert "| torch | fp32 | off | 20000 | 1.00x | 2.00x | - | 8000.0 | - | 0.050 (50%) | 20.0% | 1.0 | - | - | - |" in table
    assert "| onnxruntime | fp32 | off | 10000 | 2.00x | 4.00x | - | - | - | - | - | 1.0 |" in table
    assert "| tensorrt | fp16 | loop | failed: no GPU |" in table
    assert ("| inductor | fp32 | off | 5000 | 4.00x | 8.00x | - | - | - | - | - | 1.0 | 0.25 / 3 | 0 | "
            "120 / 2160 (fused_step, vae_decoder) |") in table
    report["cases"].append(case("inductor", 6.0, compiled_networks=["fused_step"],
                                packages={"fused_step": {"build_s": 100.4, "size_mib": 2.2}}))
    assert ("| inductor (builds fused_step) | fp32 | off | 6000 | 3.33x | 6.67x | - | - | - | - | - | 1.0 | - | - | "
            "100 / 2 (fused_step) |") in markdown(report)
    report["cases"].pop()
    assert "SD1.5-sized" in table and "**2 DDIM steps**" in table and "**fp16 overflow**" not in table
    report["cases"].append({**case("torch", 4.0), "precision": "fp16", "nonfinite": {"fused_step": 5, "vae_decoder": 7}})
    table = markdown(report)
    assert "| 12 (fused_step 5, vae_decoder 7) |" in table
    assert "**fp16 overflow**: torch fp16 produced NaN/Inf on these weights (preset sd15-random)" in table


def test_suite_runs_cases_compares_them_with_torch_fp32_and_keeps_its_time_limit(tmp_path):
    """Two tiny cases, each in its own process, report every stage; the static-buffer loop's image
    equals the eager one (CPU) and no network outputs NaN/Inf; a case that would start after the
    run's deadline is skipped, and the report says so."""
    out = [str(tmp_path / "a"), str(tmp_path / "b")]
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--preset", "tiny", "--steps", "1", "--repeats", "1",
                           "--cases", "torch:fp32:off", "torch:fp32:loop", "--out", *out], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for folder in out:
        (report_file,) = (tmp_path / folder).glob("bench-cpu-tiny-*.json")
        assert (tmp_path / folder / "LATEST-cpu-tiny.md").read_text() == report_file.with_suffix(".md").read_text()
    report = json.loads(report_file.read_text())
    eager, loop = report["cases"]
    for stage in ("text_encoder", "fused_step", "vae_decoder", "end_to_end"):
        assert eager[stage]["median_s"] > 0 and eager[stage]["repeats"] == 1
    assert 0 < eager["fused_step_tflop"] < 1  # the tiny model: far below SD1.5's ~0.74 TFLOP per step
    assert 0 <= eager["outside_steps_fraction"] < 1
    assert eager["parity"] == loop["parity"] == {"mean": 0.0, "max": 0, "against": "torch fp32"}
    assert loop["nonfinite"] == {"text_encoder": 0, "control_hint": 0, "fused_step": 0, "vae_decoder": 0}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--preset", "tiny", "--cases", "torch:fp32:off",
                           "--deadline", "1", "--out", str(tmp_path / "c")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (report_file,) = (tmp_path / "c").glob("bench-cpu-tiny-*.json")
    assert json.loads(report_file.read_text())["cases"] == [
        {"backend": "torch", "precision": "fp32", "cuda_graph": "off", "compile": "off",
         "error": "skipped: the run's 1 s were spent"}]


@pytest.mark.slow
def test_fast_path_variants_are_timed_and_compared(tmp_path):
    from benchmarks.fast_path import UPDATE_VARIANTS, VARIANTS, main

    chosen = ["plain", "default (sdpa+fuse_qkv)", "+gn_silu", "+fused_update", "+cudnn_benchmark",
              "+sdpa_backend=efficient"]
    assert main(["--device", "cpu", "--precision", "fp32", "--preset", "tiny", "--repeats", "1",
                 "--height", "64", "--width", "64", "--variants", *chosen, "--out", str(tmp_path)]) == 0
    (report_file,) = tmp_path.glob("fastpath-cpu-tiny-*.json")
    variants = json.loads(report_file.read_text())["variants"]
    assert list(variants) == chosen and set(chosen) <= {*VARIANTS, *UPDATE_VARIANTS}
    refused = {n for n, v in variants.items() if "refused" in v}
    # CUDA-only switches and the SDPA kernels the CPU lacks say why; everything else ran and matches plain
    assert refused == {"+cudnn_benchmark", "+sdpa_backend=efficient"}
    assert "only act on CUDA, not on device 'cpu'" in variants["+cudnn_benchmark"]["refused"]
    ran = {n: v for n, v in variants.items() if n not in refused}
    default = variants["default (sdpa+fuse_qkv)"]["max_abs_vs_plain"]  # both the same ops on the CPU: bit-identical
    assert variants["+gn_silu"]["max_abs_vs_plain"] == default == variants["+fused_update"]["max_abs_vs_plain"]
    assert all(v["eager_ms"]["n"] == 1 and v["eager_ms"]["p50"] > 0 and "graph_ms" not in v
               and v["max_abs_vs_plain"] < 1e-3 for v in ran.values())
    assert "| +gn_silu | - | - | " in report_file.with_suffix(".md").read_text()


def test_startup_cases_run_cold_then_warm(tmp_path):
    """benchmarks.startup on the tiny preset: a single file written, converted once, then mapped."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.startup", "--preset", "tiny", "--work", str(tmp_path / "w"),
                           "--out", str(tmp_path / "out"), "--cases", "torch fp32, cold", "torch fp32, warm"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (tmp_path / "w").exists()  # the file and caches are deleted unless --keep
    report = json.loads(next((tmp_path / "out").glob("startup-cpu-*.json")).read_text())
    cold, warm = report["cases"]
    assert [cold["label"], warm["label"]] == ["torch fp32, cold", "torch fp32, warm"]
    for case in (cold, warm):
        assert case["image_shape"] == [256, 384, 3] and case["torch_weights_loaded_after_image"]
        assert case["weights_bytes"] > 0.9 * report["file_bytes"]  # the fp32 entry: the file's tensors
        assert case["weights_entry"].endswith("-fp32")
        assert case["ready_s"] >= case["load_s"] > 0 and case["peak_rss_gib"] > 0
    table = next((tmp_path / "out").glob("startup-cpu-*.md")).read_text()
    assert "| torch fp32, warm |" in table and "from the tiny preset" in table
    assert not (tmp_path / "out" / "LATEST-startup-cpu.md").exists()  # LATEST is the full sd15-random run's


def test_startup_plans_the_gpu_cases_and_keeps_the_weights_when_only_the_compile_is_cold(tmp_path):
    from benchmarks.startup import GPU_CASES, plan_runs, prepare_cache, weights_bytes

    runs = plan_runs("cuda", "sd15-random", ["fp16", "compiled fp16, warm"], None)
    assert [(r[0], r[4], r[5]) for r in runs] == [("fp16, weights drawn", "cold", "off"), ("fp16, warm", "warm", "off"),
                                                  ("compiled fp16, warm", "warm", "default")]
    assert [r[0] for r in plan_runs("cuda", "sd15-random", None, None)] == [c[0] for c in GPU_CASES]
    with pytest.raises(SystemExit, match="no cuda case matches \\['torch fp32'\\]; the cases: fp16, weights drawn;"):
        plan_runs("cuda", "sd15-random", ["torch fp32"], None)  # a CPU case's label
    work, cache = tmp_path / "w", tmp_path / "w" / "cache-preset-torch-compiled"
    prepare_cache(work / "weights", cache, "cold")
    (cache / "weights" / "entry").write_text("weights")  # lands in the suite's weights folder
    (cache / "torch_compile").mkdir()
    prepare_cache(work / "weights", cache, "compile-cold")
    assert (work / "weights" / "entry").exists() and (cache / "weights" / "entry").exists()
    assert not (cache / "torch_compile").exists()
    (cache / "torch_compile").mkdir()
    prepare_cache(work / "weights", cache, "warm")
    assert (cache / "torch_compile").exists() and (cache / "weights" / "entry").exists()
    prepare_cache(work / "weights", cache, "cold")
    assert list((work / "weights").iterdir()) == [] and list(cache.iterdir()) == [cache / "weights"]
    wrong = subprocess.run([sys.executable, "-m", "benchmarks.startup", "--device", "gpu"], capture_output=True,
                           text=True, timeout=120)
    assert wrong.returncode == 2 and "argument --device: invalid startup_device value: 'gpu'" in wrong.stderr
    (work / "weights" / "a-fp32").mkdir()  # a shared weights folder holds other models' entries too
    (work / "weights" / "a-fp32" / "weights.safetensors").write_bytes(b"1" * 10)
    (work / "weights" / "b-fp32").mkdir()
    (work / "weights" / "b-fp32" / "weights.safetensors").write_bytes(b"2" * 20)
    assert weights_bytes(cache, "b-fp32") == 20 and weights_bytes(cache, None) is None
    assert weights_bytes(cache, "c-fp32") is None
    refused = subprocess.run([sys.executable, "-m", "benchmarks.startup", "--device", "cuda", "--weights", str(work),
                              "--cases", "fp16, weights drawn"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and refused.stderr.strip().splitlines()[-1] == (
        "--weights is another run's weights cache, which a cold case would empty: pick 'warm' and 'compile-cold' "
        "cases only, or leave --weights out")


def test_a_startup_case_past_its_time_is_ended_and_reported(tmp_path):
    """--timeout ends the case's process group (an inductor build it started too); the report says so
    and the suite goes on."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.startup", "--preset", "tiny", "--work", str(tmp_path / "w"),
                           "--out", str(tmp_path / "out"), "--cases", "preset, cold", "--timeout", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    case, = json.loads(next((tmp_path / "out").glob("startup-cpu-*.json")).read_text())["cases"]
    assert case["label"] == "tiny preset, cold" and case["error"] == "timed out after 1 s"


@pytest.mark.slow
def test_startup_inductor_cases_build_then_load_the_packages(tmp_path):
    """The AOTInductor route's start-up on the tiny preset: packages built on the weights the case
    before drew, then loaded by the next process; the same image both times."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.startup", "--preset", "tiny", "--work", str(tmp_path / "w"),
                           "--out", str(tmp_path / "out"), "--cases", "preset, cold", "preset inductor"],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    drawn, built, loaded = json.loads(next((tmp_path / "out").glob("startup-cpu-*.json")).read_text())["cases"]
    assert [built["label"], loaded["label"]] == ["tiny preset inductor, package built", "tiny preset inductor, warm"]
    assert built["cache"] == "compile-cold" and "error" not in built and "error" not in loaded
    assert built["image_sha256"] == loaded["image_sha256"] and built["steps"] == loaded["steps"] == 1
    assert loaded["ready_s"] < built["ready_s"]  # loaded, not built
    assert not any("wrote weights cache entry" in line for line in built["logs"])  # the weights the first case drew


def test_quality_table_runs_every_row_against_full_fp32(tmp_path, monkeypatch):
    from benchmarks.quality import main, parse_row

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))  # no FID weights: PD is reported as not measured
    monkeypatch.delenv("SDCN_FID_WEIGHTS", raising=False)
    out = tmp_path / "quality.md"
    assert main(["--rows", "full", "eps=1", "steps=1@fp16", "--photos", "chelsea", "--ddim-steps", "2",
                 "--image-resolution", "64", "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert list(rows) == ["full", "eps=1", "steps=1@fp16"]
    assert rows["full"]["mean_abs_diff"] == 0 and rows["full"]["ssim_mean"] == 1.0
    assert rows["full"]["steps"] == "2 full" and rows["eps=1"]["steps"] == "1 full + 1 reuse_eps"
    assert rows["steps=1@fp16"]["precision"] == "fp16" and rows["steps=1@fp16"]["ddim_steps"] == 1
    assert rows["eps=1"]["mean_abs_diff"] > 0  # the reused prediction changes the image
    text = out.read_text()
    assert "not SD1.5" in text and "| eps=1 | fp32 | 1 full + 1 reuse_eps |" in text and out.with_suffix(".png").is_file()
    assert rows["eps=1"]["pd_mean"] is None and "PD: not measured" in text and "| n/a |" in text
    assert parse_row("eps=10@fp16") == ("eps=10", "fp16") and parse_row("full@19,18") == ("full@19,18", "fp32")
    with pytest.raises(InputError, match="unknown precision 'int8' in row 'full@int8'; use fp32 or fp16"):
        parse_row("full@int8")
    with pytest.raises(InputError, match="unknown schedule term 'fast'"):
        parse_row("fast")


def test_quality_table_measures_pd_with_fid_weights(tmp_path):
    """PD through the contest's path (JPEG files, pytorch-fid InceptionV3); seeded random Inception
    weights stand in for the FID ones here, so only the plumbing is checked: 0 for the reference itself."""
    import torch

    from benchmarks.quality import main
    from sdcn_trt.errors import WeightsError
    from sdcn_trt.scoring.pd import FID_WEIGHTS_FILE, random_inception_state

    weights = tmp_path / FID_WEIGHTS_FILE
    torch.save(random_inception_state(0), weights)
    out = tmp_path / "quality.md"
    assert main(["--rows", "full", "eps=1", "--photos", "chelsea", "--ddim-steps", "2", "--image-resolution", "64",
                 "--fid-weights", str(weights), "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert rows["full"]["pd_mean"] == 0.0 and rows["eps=1"]["pd_mean"] > 0
    assert "PD: the contest's PD" in out.read_text()
    with pytest.raises(WeightsError, match="FID Inception weights not found"):
        main(["--rows", "full", "--photos", "chelsea", "--fid-weights", str(tmp_path / "absent.pth"),
              "--out", str(out)])


def test_a_crashed_or_failed_case_is_reported_by_signal_and_error_not_a_stray_line(tmp_path, monkeypatch, capsys):
    """A case whose process dies of SIGSEGV is reported with the signal and the crashing frame, its
    faulthandler stack kept in the JSON and on stderr; a case that raises is reported by its exception,
    not by the library warning its stderr happens to end with."""
    import argparse

    from benchmarks import __main__ as suite

    crash = ("import os, signal\ndef load_package():\n    os.kill(os.getpid(), signal.SIGSEGV)\nload_package()\n")
    monkeypatch.setattr(suite, "case_command", lambda *a: [sys.executable, "-X", "faulthandler", "-c", crash])
    case = {"backend": "inductor", "precision": "fp16", "cuda_graph": "loop"}
    args = argparse.Namespace()
    result = suite.run_one(case, args, 60, tmp_path / "image.npy")
    assert result["error"] == "killed by SIGSEGV (segmentation fault) at <string>:3 in load_package"
    assert result["crash"]["details"].startswith("Fatal Python error: Segmentation fault\nCurrent thread")
    assert 'File "<string>", line 3 in load_package' in result["crash"]["details"]
    assert "case inductor fp16 graph=loop failed: killed by SIGSEGV" in capsys.readouterr().err

    fails = ("import warnings\nfrom sdcn_trt.errors import InputError\ntry:\n    raise InputError('bad shape')\n"
             "finally:\n    warnings.warn('careful')\n")
    monkeypatch.setattr(suite, "case_command", lambda *a: [sys.executable, "-c", fails])
    result = suite.run_one(case, args, 60, tmp_path / "image.npy")
    assert result["error"] == "exit status 1: InputError: bad shape"
    report = {"date": "d", "device": "cuda", "preset": "sd15-random", "steps": 20, "repeats": 3, "machine": {},
              "gemm_peak_tflops": 1.0, "cases": [{**case, "error": "killed by SIGSEGV | x\nstack line"}]}
    assert "| inductor | fp16 | loop | failed: killed by SIGSEGV / x |" in markdown(report)


@pytest.mark.slow
def test_inductor_probe_names_the_first_load_strategy_that_works(tmp_path):
    """Each strategy in its own process; the package it builds lands in the cache for what follows;
    a strategy whose children crash is named with its signal and the next one is tried."""
    import os

    env = {**os.environ, "SDCN_TRT_CACHE": str(tmp_path / "cache"), "SDCN_TRT_INDUCTOR_FAULT": "SIGSEGV@compile"}
    base = [sys.executable, "-m", "benchmarks.inductor_probe", "--device", "cpu", "--preset", "tiny", "--precision",
            "fp32", "--networks", "control_hint", "--out", str(tmp_path)]
    crashed = subprocess.run(base + ["--strategies", "default"], capture_output=True, text=True, env=env, timeout=600)
    assert crashed.returncode == 1, crashed.stderr[-2000:]
    lines = [line for line in crashed.stdout.strip().splitlines() if not line.startswith("  ")]  # not the progress
    assert lines[-1] == "no load strategy loaded the packages (tried: default)"
    assert lines[1].startswith("strategy default: failed: exit status 1: PackageBuildError: AOTInductor compiling and "
                               "loading 'control_hint' (fp32, cpu, control (1, 3, 256, 384)) failed in its child "
                               "process: killed by SIGSEGV (segmentation fault) at engines/inductor/build.py:")
    del env["SDCN_TRT_INDUCTOR_FAULT"]
    proc = subprocess.run(base + ["--strategies", "multithreaded", "default"], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "SDCN_TRT_INDUCTOR_LOAD=multithreaded"
    report = json.loads((tmp_path / "inductor-probe-cpu.json").read_text())
    (tried,) = report["tried"]
    net = tried["networks"]["control_hint"]
    assert report["chosen"] == "multithreaded" and not net["cached"] and net["nonfinite"] == 0
    assert net["check"]["hint"]["max_abs"] < 1e-5 and net["size_mib"] < 16
    assert "| multithreaded | loads and runs | control_hint " in (tmp_path / "inductor-probe-cpu.md").read_text()


def test_inductor_probe_table_carries_the_packages_notes(tmp_path):
    """A note a build left (max_autotune skipped, a loader that ignored TMPDIR) is in the .md, not only the .json."""
    from benchmarks.inductor_probe import write

    net = {"build_s": 3.0, "activate_s": 0.5, "size_mib": 1.0, "check": {"hint": {"max_abs": 1e-6}},
           "notes": ["torch 2.11.0's AOTInductor loader ignores TMPDIR: ..."]}
    report = {"date": "d", "device": "cuda:0", "preset": "tiny", "precision": "fp16",
              "tried": [{"strategy": "unpack-in-cache", "networks": {"control_hint": net}}]}
    write(report, [str(tmp_path)])
    text = (tmp_path / "inductor-probe-cuda.md").read_text()
    assert "| unpack-in-cache | loads and runs | control_hint 3 / 0.5 / 1.0 / 1.0e-06 |" in text
    assert text.endswith("- unpack-in-cache, control_hint: torch 2.11.0's AOTInductor loader ignores TMPDIR: ...\n")
    net["notes"] = []
    write(report, [str(tmp_path)])
    assert "Notes" not in (tmp_path / "inductor-probe-cuda.md").read_text()
    net["phases"] = {"export_s": 0.6, "aoti_s": 2.2, "lower_s": 0.4, "cpp_s": 1.5, "load_s": 0.5}  # no codegen timer
    write(report, [str(tmp_path)])
    assert ("| control_hint 3 (torch.export 1, AOTInductor 2: lowering 0, C++ compile 2) / 0.5 / 1.0 / 1.0e-06 |"
            in (tmp_path / "inductor-probe-cuda.md").read_text())


def test_compiled_diffusers_cases_refuse_the_cpu_and_other_backends(tiny):
    import argparse

    from benchmarks.baseline_diffusers import build_diffusers
    from benchmarks.case import run_case
    from sdcn_trt.errors import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="mode 'reduce-overhead' runs on CUDA only \\(device 'cpu' given\\)"):
        build_diffusers(tiny, "cpu", torch.float32, "reduce-overhead")
    with pytest.raises(InputError, match="unknown compile mode 'fast'; choose one of off, max-autotune-no-cudagraphs"):
        build_diffusers(tiny, "cuda", torch.float16, "fast")
    args = argparse.Namespace(backend="torch", compile="reduce-overhead", compiled_networks=None, preset="tiny",
                              device="cpu", precision="fp32", cuda_graph="loop", compile_scope="whole")
    with pytest.raises(InputError, match="compile='reduce-overhead' captures CUDA graphs of its own"):
        run_case(args)
    args.backend = "onnxruntime"
    with pytest.raises(InputError, match="--compile reduce-overhead is for the diffusers baseline and the torch "
                                         "backend; backend 'onnxruntime'"):
        run_case(args)


def test_markdown_names_the_compiled_diffusers_cases():
    from benchmarks.__main__ import label

    assert label({"backend": "diffusers", "compile": "max-autotune-no-cudagraphs"}) == \
        "diffusers (torch.compile max-autotune-no-cudagraphs)"
    assert label({"backend": "diffusers", "compile": "off"}) == label({"backend": "diffusers"}) == "diffusers"


def test_schedule_table_puts_tiny_trained_quality_beside_latency(tmp_path):
    from benchmarks.schedules import GPU_SCHEDULES, QUALITY, WINNER_SPLIT, load_quality, markdown
    from sdcn_trt.schedule import parse_schedule

    assert parse_schedule(WINNER_SPLIT).resolve(20) == (("full",) * 8 + ("reuse_control", "full")
                                                       + ("shallow", "full") * 5)
    quality = load_quality([QUALITY[0], tmp_path / "absent.json"])
    assert quality["eps=10"]["ssim_mean"] == pytest.approx(0.9949, abs=5e-5)  # the committed table's row
    rows = []
    for schedule, seconds in (("full", 0.2), ("eps=10", 0.1), (WINNER_SPLIT, 0.15)):
        row = {"schedule": schedule, "steps": 20, "evaluations": {"controlnet": 1, "unet": 1, "shallow": 0},
               "end_to_end": {"median_s": seconds}}
        if schedule in quality:
            row["quality"] = quality[schedule]
        rows.append(row)
    report = {"date": "d", "preset": "sd15-random", "machine": {"platform": "p", "torch": "t", "threads": 16, "gpu": "H200"},
              "backend": {"backend": "torch", "precision": "fp16", "device": "cuda", "cuda_graph": "loop", "steps": 20,
                          "repeats": 3}, "networks": {"fused_step": {"median_s": 0.005}}, "schedules": rows}
    table = markdown(report)
    assert "| full | 20 | 1 | 1 | 0 | 200.0 | 1.00x | 1.0000 (1.0000) | identical |" in table
    assert "| eps=10 | 20 | 1 | 1 | 0 | 100.0 | 2.00x | 0.9949 (0.9891) | 40.82 |" in table
    assert f"| {WINNER_SPLIT} | 20 | 1 | 1 | 0 | 150.0 | 1.33x | - | - |" in table
    assert set(GPU_SCHEDULES) >= {"full", "eps=10", "control=10", "deepcache=3"}


def test_cases_parse_with_their_options_and_bad_ones_say_what_is_valid(monkeypatch, capsys):
    """backend:precision:graph[:option...]: the diffusers compile mode (bare or compile=), and
    compiled_networks= for the built backends; the default GPU inductor case compiles the fused step only."""
    import argparse

    from benchmarks.__main__ import GPU_CASES, case_command, main, parse_case

    assert parse_case("torch:fp16:loop") == {"backend": "torch", "precision": "fp16", "cuda_graph": "loop",
                                             "compile": "off"}
    assert parse_case("diffusers:fp16:off:reduce-overhead")["compile"] == "reduce-overhead"
    assert parse_case("diffusers:fp16:off:compile=reduce-overhead")["compile"] == "reduce-overhead"
    case = parse_case("inductor:fp16:loop:compiled_networks=fused_step,vae_decoder")
    assert case == {"backend": "inductor", "precision": "fp16", "cuda_graph": "loop", "compile": "off",
                    "compiled_networks": ["fused_step", "vae_decoder"]}
    inductor = [parse_case(c) for c in GPU_CASES if c.startswith("inductor")]
    assert inductor == [{**case, "compiled_networks": ["fused_step"]}]
    args = argparse.Namespace(device="cuda", preset="sd15-random", steps=20, sampler="ddim", repeats=3)
    command = case_command(case, args, "out.json", "image.npy")
    assert command[-3:] == ["--compiled-networks", "fused_step", "vae_decoder"]
    assert "--compiled-networks" not in case_command(parse_case("torch:fp16:loop"), args, "out.json", "image.npy")
    for text, message in (("torch:fp16", "case 'torch:fp16': expected backend:precision:graph[:option...]"),
                          ("inductor:fp16:loop:networks=fused_step", "case 'inductor:fp16:loop:networks=fused_step': "
                           "bad option 'networks=fused_step'; options: compile=MODE, compiled_networks=NAME[,NAME...]"),
                          ("inductor:fp16:loop:compiled_networks=", "bad option 'compiled_networks='")):
        with pytest.raises(InputError, match=re.escape(message)):
            parse_case(text)
    monkeypatch.setattr(sys, "argv", ["benchmarks", "--cases", "torch:fp32:off", "torch:fp16"])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2 and "expected backend:precision:graph[:option...]" in capsys.readouterr().err


def test_the_benchmarks_sampler_reaches_every_case_and_names_its_rows(tiny, tmp_path, monkeypatch):
    """--sampler: every image the case runs has it (the pipeline's run is a stand-in here: the networks' timings
    at 256x384 are the case's cost), the diffusers baseline runs that sampler's scheduler, the child's command
    line, the report's rows, workload line and file names carry it; ddim's report reads as before."""
    import argparse
    from types import SimpleNamespace

    from diffusers import DDIMScheduler, UniPCMultistepScheduler

    from benchmarks.__main__ import case_command, label, parse_case, report_name
    from benchmarks.baseline_diffusers import build_diffusers
    from benchmarks.case import case_parser, run_case
    from sdcn_trt import ControlNetPipeline

    runs = []

    def run(self, image, config, *args, **kwargs):
        runs.append((config.sampler, config.ddim_steps))
        return SimpleNamespace(images=[np.zeros((8, 8, 3), np.uint8)])

    monkeypatch.setattr(ControlNetPipeline, "run", run)
    args = argparse.Namespace(backend="torch", precision="fp32", device="cpu", cuda_graph="off", compile="off",
                              compiled_networks=None, preset="tiny", steps=3, sampler="unipc", repeats=1,
                              image_out=None, compile_scope="whole")
    result = run_case(args)
    assert (result["sampler"], result["steps"]) == ("unipc", 3)
    assert len(runs) == 4 and set(runs) == {("unipc", 3)}  # warm-up, timed, the image, the NaN/Inf count
    assert isinstance(build_diffusers(tiny, "cpu", torch.float32, sampler="unipc").scheduler, UniPCMultistepScheduler)
    assert isinstance(build_diffusers(tiny, "cpu", torch.float32).scheduler, DDIMScheduler)

    case = parse_case("torch:fp16:loop")
    command = case_command(case, argparse.Namespace(device="cuda", preset="sd15-random", steps=10, sampler="unipc",
                                                    repeats=3), "out.json", "image.npy")
    assert command[command.index("--sampler") + 1] == "unipc"
    assert case_parser().parse_args(["--backend", "torch", "--out", "o", "--sampler", "unipc"]).sampler == "unipc"
    with pytest.raises(SystemExit):
        case_parser().parse_args(["--backend", "torch", "--out", "o", "--sampler", "heun"])
    assert label({**case, "sampler": "unipc"}) == "torch [unipc]" and label({**case, "sampler": "ddim"}) == "torch"
    names = [report_name(argparse.Namespace(device="cuda:0", preset=p, sampler=s))
             for p, s in (("sd15-random", "ddim"), ("sd15-random", "unipc"), ("tiny", "unipc"))]
    assert names == ["cuda", "cuda-unipc", "cuda-tiny-unipc"]
    report = {"date": "d", "device": "cuda", "preset": "sd15-random", "steps": 10, "sampler": "unipc", "repeats": 3,
              "machine": {}, "gemm_peak_tflops": 1.0, "cases": [{**result, "backend": "torch", "precision": "fp16"}]}
    table = markdown(report)
    assert "**10 unipc steps**" in table and "| torch [unipc] | fp16 | off |" in table
    assert "**10 DDIM steps**" in markdown({**report, "sampler": "ddim"})


def test_compiled_networks_are_refused_where_nothing_is_built():
    import argparse

    from benchmarks.case import run_case

    args = argparse.Namespace(backend="torch", compile="off", compiled_networks=["fused_step"], preset="tiny")
    with pytest.raises(InputError, match=re.escape("--compiled-networks is for the backends that build networks "
                                                   "(tensorrt, inductor) and torch with --compile; backend 'torch' "
                                                   "builds none")):
        run_case(args)


def test_case_labels_name_what_was_compiled_or_built():
    from benchmarks.__main__ import label, parse_case

    assert [label(parse_case(c)) for c in (
        "torch:fp16:loop:compile=default:compiled_networks=fused_step", "torch:fp16:loop:compile=default",
        "diffusers:fp16:off:reduce-overhead", "inductor:fp16:loop:compiled_networks=fused_step", "torch:fp16:loop")] == [
        "torch (torch.compile default: fused_step)", "torch (torch.compile default)",
        "diffusers (torch.compile reduce-overhead)", "inductor (builds fused_step)", "torch"]


@pytest.mark.slow  # compiles the tiny fused step (about 80 s on the 2-core machine) unless the cache holds it
def test_an_inductor_case_compiles_only_the_networks_it_is_told(tmp_path):
    """The suite's inductor case with compiled_networks=fused_step: one package, the other networks on
    torch, recorded in the JSON and named in the table."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--preset", "tiny", "--steps", "1", "--repeats", "1",
                           "--cases", "inductor:fp32:off:compiled_networks=fused_step", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (report_file,) = tmp_path.glob("bench-cpu-tiny-*.json")
    (case,) = json.loads(report_file.read_text())["cases"]
    assert "error" not in case and case["compiled_networks"] == ["fused_step"] and list(case["packages"]) == ["fused_step"]
    assert case["packages"]["fused_step"]["size_mib"] < 16 and case["nonfinite"]["fused_step"] == 0
    assert "| inductor (builds fused_step) | fp32 | off | " in report_file.with_suffix(".md").read_text()
    assert " (fused_step) |" in report_file.with_suffix(".md").read_text()


@pytest.mark.slow  # torch.compile compiles the tiny fused step: about a minute on the 2-core machine
def test_a_torch_compile_case_compiles_the_step_it_is_told(tmp_path):
    """torch:fp32:loop:compile=default:compiled_networks=fused_step: the step through torch.compile inside
    the static loop, its compile time recorded, the image within a level of the reference case's."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--preset", "tiny", "--steps", "1", "--repeats", "1",
                           "--cases", "torch:fp32:off", "torch:fp32:loop:compile=default:compiled_networks=fused_step",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (report_file,) = tmp_path.glob("bench-cpu-tiny-*.json")
    reference, case = json.loads(report_file.read_text())["cases"]
    assert "error" not in case and case["compile"] == "default" and case["compiled_networks"] == ["fused_step"]
    assert case["compile_s"] > 1.0 and case["parity"]["max"] <= 1 and "packages" not in case
    assert "| torch (torch.compile default: fused_step) | fp32 | loop | " in report_file.with_suffix(".md").read_text()


def test_sdpa_benchmark_times_each_kernel_or_keeps_why_it_refused(tmp_path):
    """benchmarks.sdpa: SD1.5's attention shapes at the contest size, and on the CPU every kernel either
    measured or refused with torch's reason (cuDNN attention has no CPU kernel); the fastest per shape
    and per head size are the measured minima."""
    import json

    from benchmarks.sdpa import KERNELS, main, sd15_attention_shapes

    shapes = sd15_attention_shapes()  # 256x384 -> 32x48 latents
    assert [(s.q_len, s.kv_len, s.head_dim) for s in shapes[:2]] == [(1536, 1536, 40), (1536, 77, 40)]
    assert [(s.name, s.q_len, s.head_dim) for s in shapes[-2:]] == [("middle self", 24, 160), ("middle cross", 24, 160)]
    assert sum(s.count for s in shapes) == 2 * (7 * 3 + 2)  # a self- and a cross-attention per transformer block
    assert main(["--device", "cpu", "--dtype", "fp32", "--height", "64", "--width", "64", "--repeats", "1",
                 "--out", str(tmp_path)]) == 0
    report = json.loads(next(tmp_path.glob("sdpa-cpu-fp32-*.json")).read_text())
    for row in report["rows"]:
        times = row["times"]
        assert set(times) == set(KERNELS) and "ms" in times["math"]  # math takes every shape
        assert all(t["ms"]["p50"] > 0 if "ms" in t else t["refused"] for t in times.values())
        measured = {k: t["ms"]["p50"] for k, t in times.items() if "ms" in t and k != "auto"}
        assert row["best"] == min(measured, key=measured.__getitem__)
        assert "ms" not in times["cudnn"] and times["cudnn"]["refused"]
    math_40 = sum(r["times"]["math"]["ms"]["p50"] * r["shape"]["count"] for r in report["rows"]
                  if r["shape"]["head_dim"] == 40)
    assert report["per_head_size"]["40"]["ms_per_step"]["math"] == pytest.approx(math_40)
    assert "cudnn" not in report["per_head_size"]["40"]["ms_per_step"]  # refused somewhere: no total
    table = next(tmp_path.glob("sdpa-cpu-fp32-*.md")).read_text()
    assert "| level 0 self | 64 x 64 | 40 | 7 |" in table and "Refused (torch's reason" in table


def test_fast_path_pins_each_head_size_to_the_sdpa_tables_fastest(tmp_path):
    """benchmarks.fast_path --sdpa-table: the variant pins each head size to the kernel a benchmarks.sdpa
    report found fastest there (here a CPU report for the tiny preset's head sizes 4 and 8), runs beside
    the others and matches plain."""
    from benchmarks.fast_path import DEFAULT, main, per_head_size_variant
    from benchmarks.sdpa import run

    report = run("cpu", "fp32", 64, 64, repeats=1)
    report["per_head_size"] = {"4": {"best": "math"}, "8": {"best": "flash"}, "40": {"best": None}}
    table = tmp_path / "sdpa.json"
    table.write_text(json.dumps(report))
    name, fast = per_head_size_variant(table, "fp32", "cpu")
    assert name == "+sdpa_backend=4=math,8=flash" and fast == dataclasses.replace(DEFAULT, sdpa_backend="4=math,8=flash")
    assert main(["--device", "cpu", "--precision", "fp32", "--preset", "tiny", "--repeats", "1", "--height", "64",
                 "--width", "64", "--variants", "plain", "--sdpa-table", str(table), "--out", str(tmp_path)]) == 0
    (report_file,) = tmp_path.glob("fastpath-cpu-tiny-*.json")
    variants = json.loads(report_file.read_text())["variants"]
    assert list(variants) == ["plain", name] and variants[name]["max_abs_vs_plain"] < 1e-4
    # the real CPU report names a fastest kernel for each SD1.5 head size, and the variant pins exactly those
    real = run("cpu", "fp32", 64, 64, repeats=1)
    table.write_text(json.dumps(real))
    expected = ",".join(f"{h}={row['best']}" for h, row in sorted(real["per_head_size"].items()))
    assert per_head_size_variant(table, "fp32", "cpu")[1].sdpa_backend == expected and "40=" in expected


def test_fast_path_compiled_steps_are_chosen_by_name_and_take_the_sdpa_table(tmp_path, monkeypatch):
    """--inductor --compiled NAME... runs those compiled steps only; with --sdpa-table the compiled step with the
    table's per-head-size kernels (over the CUDA default) joins them. The steps are stubbed: no compile here."""
    from benchmarks import fast_path

    seen = []

    def stub(backend, components, device, precision, spec, options):
        seen.append((backend, options))
        raise InputError("stubbed")

    monkeypatch.setattr(fast_path, "step_function", stub)
    table = tmp_path / "sdpa.json"
    table.write_text(json.dumps({"dtype": "fp32", "device": "cpu", "per_head_size": {"4": {"best": "math"}}}))
    assert fast_path.main(["--device", "cpu", "--precision", "fp32", "--preset", "tiny", "--variants", "plain",
                           "--inductor", "--compiled", "torch.compile blocks", "torch.compile +conv_1x1_as_mm",
                           "--sdpa-table", str(table), "--out", str(tmp_path)]) == 0
    (report_file,) = tmp_path.glob("fastpath-cpu-tiny-*.json")
    names = list(json.loads(report_file.read_text())["variants"])
    assert names == ["plain", "+sdpa_backend=4=math", "torch.compile blocks", "torch.compile +conv_1x1_as_mm",
                     "torch.compile +sdpa_backend=4=math"]
    compiled = [options for backend, options in seen if "compile" in options]
    assert [o.get("compile_scope", "whole") for o in compiled] == ["blocks", "whole", "whole"]
    assert compiled[1]["compile_flags"] == ("conv_1x1_as_mm",)
    assert compiled[2]["fast"] == dataclasses.replace(fast_path.CUDA_DEFAULT, sdpa_backend="4=math")
    assert all(o["fast"].channels_last and o["fast"].gn_silu for o in compiled)  # today's CUDA default, compiled


@pytest.mark.parametrize("edit, message", [
    (lambda r: {**r, "dtype": "fp16"}, "timed the kernels in fp16; this run is fp32: run `python -m benchmarks.sdpa "
                                       "--dtype fp32` first"),
    (lambda r: {**r, "per_head_size": {"40": {"best": None}}}, "every pinnable kernel refused some shape"),
    (lambda r: {**r, "device": "cuda:0"}, "timed the kernels on cuda; this run is on cpu: the fastest kernel differs "
                                          "by device, run `python -m benchmarks.sdpa --device cpu` first"),
    (lambda r: {"rows": []}, "not a benchmarks.sdpa report (KeyError"),
    (None, "not a benchmarks.sdpa report (JSONDecodeError"),
])
def test_fast_path_sdpa_table_errors(tmp_path, capsys, edit, message):
    from benchmarks.fast_path import main

    table = tmp_path / "sdpa.json"
    base = {"dtype": "fp32", "device": "cpu", "per_head_size": {"40": {"best": "math"}}}
    table.write_text("{not json" if edit is None else json.dumps(edit(base)))
    with pytest.raises(SystemExit) as exc:
        main(["--device", "cpu", "--precision", "fp32", "--sdpa-table", str(table), "--out", str(tmp_path)])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--precision", "fp32", "--sdpa-table", str(tmp_path / "missing.json")])
    assert "missing.json: not a benchmarks.sdpa report (FileNotFoundError" in capsys.readouterr().err
    assert not list(tmp_path.glob("fastpath-*"))  # refused before anything ran or was written


def test_sdpa_benchmark_refuses_an_image_size_whose_latents_do_not_halve(capsys):
    from benchmarks.sdpa import main

    with pytest.raises(SystemExit) as exc:
        main(["--device", "cpu", "--height", "100", "--width", "64"])
    assert exc.value.code == 2 and "multiples of 64" in capsys.readouterr().err


def test_sampler_table_scores_each_sampler_against_the_converged_reference(tmp_path):
    """benchmarks.samplers on the tiny-trained preset, small: every (sampler, steps) row is scored against
    the reference sampler's many-step image; the reference's own sampler converges towards it with steps;
    the table, the plot and the half-steps line are written."""
    from benchmarks.samplers import main as samplers_main

    assert samplers_main(["--images", "1", "--steps", "2", "10", "--samplers", "ddim", "dpmpp_2m", "euler_a",
                          "--resolution", "64", "--reference-steps", "30", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "samplers-tiny-trained-cpu.json").read_text())
    by = {(r["sampler"], r["steps"]): r for r in report["rows"]}
    assert set(by) == {(s, n) for s in ("ddim", "dpmpp_2m", "euler_a") for n in (2, 10)} | {("ddim", 30)}
    assert report["reference"] == ["dpmpp_2m", 30]
    assert by[("dpmpp_2m", 10)]["ssim"] > by[("dpmpp_2m", 2)]["ssim"]  # closer to its own 30-step picture
    assert all(0 <= r["edge_f1"] <= 1 and r["seconds"] > 0 for r in by.values())
    table = (tmp_path / "samplers-tiny-trained-cpu.md").read_text()
    assert "| euler_a (stochastic) |" in table and "Floor (ddim at 30 steps against it): SSIM" in table
    assert "Half the steps: not measured (needs ddim at 20" in table
    assert (tmp_path / "samplers-tiny-trained-cpu.png").stat().st_size > 10_000


def test_sampler_timings_warm_up_repeat_and_put_ten_steps_against_ddims_twenty(tmp_path, monkeypatch):
    """--warmup runs each sampler and step count once untimed (a CUDA graph's capture), --repeats times it
    that often (the median is the row's); the speed line is issue #32's GPU goal, 10 steps against ddim's 20."""
    from benchmarks import samplers as bench
    from sdcn_trt import ControlNetPipeline

    runs = []
    real = ControlNetPipeline.run

    def run(self, image, config, *args, **kwargs):
        runs.append((config.sampler, config.ddim_steps))
        return real(self, image, config, *args, **kwargs)

    monkeypatch.setattr(ControlNetPipeline, "run", run)
    assert bench.main(["--preset", "tiny", "--images", "1", "--steps", "2", "--samplers", "ddim", "unipc",
                       "--resolution", "64", "--warmup", "--repeats", "2", "--out", str(tmp_path)]) == 0
    assert runs == [("ddim", 2)] + [("ddim", 2)] * 3 + [("unipc", 2)] * 3  # the first warm-up, then 1 + 2 each
    report = json.loads((tmp_path / "samplers-tiny-cpu.json").read_text())
    assert (report["warmup"], report["repeats"], report["quality"]) == (True, 2, False)
    table = (tmp_path / "samplers-tiny-cpu.md").read_text()
    assert "Seconds: after one untimed run of the same sampler, steps and image, the median of 2 timed runs" in table
    assert "Speed:" not in table  # no ddim at 20 / others at 10 in this run
    rows = [{"sampler": "ddim", "steps": 20, "seconds": 0.2}, {"sampler": "unipc", "steps": 10, "seconds": 0.104},
            {"sampler": "euler_a", "steps": 10, "seconds": 0.12}, {"sampler": "unipc", "steps": 20, "seconds": 0.2}]
    assert bench.speed_line({"rows": rows}) == ("Speed: a 10-step image against ddim's 20-step image (200.0 ms): "
                                                "unipc 0.52x, euler_a 0.60x (goal <= 0.55x).")
    assert bench.timing_words({}) == ""  # reports from before --warmup/--repeats
    with pytest.raises(SystemExit):
        bench.main(["--repeats", "0"])


def test_sampler_table_half_steps_line_names_what_reaches_ddim_at_20():
    from benchmarks.samplers import half_steps_line

    rows = [{"sampler": "ddim", "steps": 20, "ssim": 0.95}, {"sampler": "unipc", "steps": 10, "ssim": 0.96},
            {"sampler": "euler", "steps": 10, "ssim": 0.90}]
    assert half_steps_line({"rows": rows}) == ("at 10 steps unipc is as close to the reference as ddim at 20 "
                                               "(SSIM 0.9500; best unipc 0.9600)")
    rows[1]["ssim"] = 0.94
    assert half_steps_line({"rows": rows}) == ("no sampler at 10 steps reaches ddim at 20 (SSIM 0.9500); the "
                                               "closest is unipc at 0.9400")


def test_the_step_flops_are_counted_on_fake_tensors_in_either_precision(tiny):
    """The bench's FLOP count of the fused step needs shapes only: fp16 components (what an fp16 case now loads)
    count the same as fp32, and nothing is computed (a fake-tensor run)."""
    from benchmarks.case import fused_step_flops
    from sdcn_trt.export.descriptors import ShapeSpec
    from sdcn_trt.models.presets import load_preset

    spec = ShapeSpec(1, 256, 384)
    fp32 = fused_step_flops(tiny, spec)
    assert fp32 > 1e9 and fused_step_flops(load_preset("tiny", seed=0, precision="fp16"), spec) == fp32
    assert fused_step_flops(tiny, ShapeSpec(1, 512, 512)) > fp32  # more pixels, more work
