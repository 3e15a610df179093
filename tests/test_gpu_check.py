"""scripts/gpu_check.sh's command lines checked against the code, on the CPU: every step (the defaults and
the by-name ones) runs with a python that parses each benchmark module's arguments and stops
(tests/gpu_check_shim.py), so an option the code lacks fails here, not in a device machine's minutes."""
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

from benchmarks.__main__ import parse_case

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
DEFAULT_STEPS = "env inductor profile sdpa schedules fastpath paritygap bench tests tiny".split()
BY_NAME = ["profile-inductor", "profile-compile", "fastpath-inductor", "batched"]


def _run(tmp_path: Path, *steps: str, keep_python: bool = False) -> tuple[subprocess.CompletedProcess, Path, list[dict]]:
    python = tmp_path / "python"
    if not keep_python:
        python.write_text(f"#!/bin/sh\nexec {sys.executable} {ROOT / 'tests' / 'gpu_check_shim.py'} \"$@\"\n")
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    results, calls = tmp_path / "results", tmp_path / "calls.jsonl"
    env = {**os.environ, "PYTHON": str(python), "GPU_CHECK_RESULTS": str(results), "GPU_CHECK_SHIM_LOG": str(calls),
           "SDCN_TRT_CACHE": str(tmp_path / "cache"), "PATH": os.environ["PATH"]}
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(SCRIPT), *steps], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    return proc, results, [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []


def test_every_gpu_check_step_passes_arguments_the_code_takes(tmp_path):
    proc, results, calls = _run(tmp_path, *DEFAULT_STEPS, *BY_NAME)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for step in [s for s in DEFAULT_STEPS if s != "env"] + ["toolchain"] + BY_NAME:
        assert re.search(rf"== {re.escape(step)}: exit 0 after \d+ s", out), f"step {step} failed:\n{out}"
    assert "unrecognized arguments" not in out and "invalid choice" not in out
    modules = [c["module"] for c in calls]
    assert modules == ["benchmarks.inductor_probe", "benchmarks.profile", "benchmarks.sdpa", "benchmarks.schedules",
                       "benchmarks.fast_path", "benchmarks.parity_gap", "benchmarks", "pytest", "benchmarks",
                       "benchmarks.profile", "benchmarks.profile", "benchmarks.fast_path", "benchmarks"]
    assert out.count("arguments parsed") == len(modules) - 1  # pytest collected instead
    for call in (c for c in calls if c["module"] == "benchmarks"):  # each --cases entry is a case the runner reads
        cases = call["args"][call["args"].index("--cases") + 1:]
        cases = cases[:next((i for i, a in enumerate(cases) if a.startswith("--")), len(cases))]
        assert cases and all(parse_case(c)["backend"] in {"torch", "diffusers", "inductor"} for c in cases)
    collected = re.search(r"(\d+)/\d+ tests collected", out)  # the GPU-marked tests exist and collect
    assert collected and int(collected.group(1)) > 0, out
    assert sorted(p.name.split("-", 3)[-1] for p in results.glob("gpu-*.log")) == sorted(
        f"{s}.log" for s in [*DEFAULT_STEPS, "toolchain", *BY_NAME])


def test_gpu_check_fastpath_step_takes_this_runs_sdpa_table(tmp_path):
    """The table the sdpa step writes reaches the fastpath step as --sdpa-table; a table from before the
    run does not (one from another machine would pin the wrong kernels)."""
    results = tmp_path / "results"
    results.mkdir()
    old = results / "sdpa-cuda-fp16-20260101-0000.json"
    old.write_text("{}")
    os.utime(old, (0, 0))
    proc, _, calls = _run(tmp_path, "fastpath")
    assert proc.returncode == 0 and "--sdpa-table" not in calls[0]["args"]
    # the sdpa step as on a device: it writes its report (the shim only parses, so a line of the
    # python stand-in writes one when the sdpa module is called)
    fresh = results / "sdpa-cuda-fp16-20261130-1200.json"
    (tmp_path / "calls.jsonl").unlink()
    python = tmp_path / "python"
    python.write_text(python.read_text().replace(
        "exec ", f'case "$*" in *benchmarks.sdpa*) echo "{{}}" > {fresh};; esac\nexec ', 1))
    proc, _, calls = _run(tmp_path, "sdpa", "fastpath", keep_python=True)
    assert proc.returncode == 0 and [c["module"] for c in calls] == ["benchmarks.sdpa", "benchmarks.fast_path"]
    assert calls[1]["args"][calls[1]["args"].index("--sdpa-table") + 1] == str(fresh)


def test_gpu_check_refuses_an_unknown_step(tmp_path):
    proc, _, calls = _run(tmp_path, "env-typo")
    assert proc.returncode == 2 and "unknown step 'env-typo': choose from env inductor" in proc.stdout
    assert calls == []
