"""The benchmark suite's plumbing on the tiny preset (speed goals live in benchmarks/results, not here)."""
import json
import subprocess
import sys

import pytest

from benchmarks.__main__ import markdown
from benchmarks.case import in_seconds
from sdcn_trt.scoring.latency import summarize


def test_case_runs_and_reports_every_stage(tmp_path):
    out = tmp_path / "case.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.case", "--backend", "torch", "--preset", "tiny",
                           "--steps", "1", "--repeats", "1", "--out", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    case = json.loads(out.read_text())
    for stage in ("text_encoder", "fused_step", "vae_decoder", "end_to_end"):
        assert case[stage]["median_s"] > 0 and case[stage]["repeats"] == 1
    assert 0 < case["fused_step_tflop"] < 1  # the tiny model: far below SD1.5's ~0.74 TFLOP per step
    assert 0 <= case["outside_steps_fraction"] < 1


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
    table = markdown(report)
    assert "| torch | fp32 | off | - | 8000.0 | - | 20.00 | 1.00x | 2.00x | 0.050 (50%) | 20.0% | 1.0 |" in table
    assert "| onnxruntime | fp32 | off | - | - | - | 10.00 | 2.00x | 4.00x |" in table
    assert "| tensorrt | fp16 | loop | failed: no GPU |" in table
    assert "SD1.5-sized" in table and "**2 DDIM steps**" in table
