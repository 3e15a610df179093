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
DEFAULT_STEPS = "env bench batched profile schedules tests".split()
BY_NAME = ["inductor", "sdpa", "fastpath", "paritygap", "tiny", "tests-slow", "profile-inductor", "profile-compile-max",
           "fastpath-inductor", "compile-cache", "aoti", "samplers", "startup"]
BUDGET = 480  # seconds: what the default run may take on a fresh device machine (8 of its 15 minutes)


def _run(tmp_path: Path, *steps: str, keep_python: bool = False,
         budget: int | None = None) -> tuple[subprocess.CompletedProcess, Path, list[dict]]:
    python = tmp_path / "python"
    if not keep_python:
        python.write_text(f"#!/bin/sh\nexec {sys.executable} {ROOT / 'tests' / 'gpu_check_shim.py'} \"$@\"\n")
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    results, calls = tmp_path / "results", tmp_path / "calls.jsonl"
    env = {**os.environ, "PYTHON": str(python), "GPU_CHECK_RESULTS": str(results), "GPU_CHECK_SHIM_LOG": str(calls),
           "SDCN_TRT_CACHE": str(tmp_path / "cache"), "PATH": os.environ["PATH"]}
    env.pop("OUT", None)
    env.pop("GPU_CHECK_BUDGET", None)
    if budget is not None:
        env["GPU_CHECK_BUDGET"] = str(budget)
    proc = subprocess.run(["bash", str(SCRIPT), *steps], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    return proc, results, [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []


def test_every_gpu_check_step_passes_arguments_the_code_takes(tmp_path):
    # every step in one call: a budget that holds all of their limits (by name they run one or two at a time)
    proc, results, calls = _run(tmp_path, *DEFAULT_STEPS, *BY_NAME, budget=10_000)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    runs = ([s for s in DEFAULT_STEPS if s != "env"] + ["toolchain"]
            + [s for s in BY_NAME if s != "compile-cache"]
            + ["compile-cache-first", "compile-cache-second", "compile-cache-blocks"])
    for step in runs:
        assert re.search(rf"== {re.escape(step)}: exit 0 after \d+ s", out), f"step {step} failed:\n{out}"
    assert "unrecognized arguments" not in out and "invalid choice" not in out and "skipped" not in out
    modules = [c["module"] for c in calls]
    assert modules == ["benchmarks", "benchmarks", "benchmarks.profile", "benchmarks.schedules", "pytest",
                       "benchmarks.inductor_probe", "benchmarks.sdpa", "benchmarks.fast_path", "benchmarks.parity_gap",
                       "benchmarks", "pytest", "benchmarks.profile", "benchmarks.profile", "benchmarks.fast_path",
                       "benchmarks", "benchmarks", "benchmarks", "benchmarks", "benchmarks.samplers",
                       "benchmarks.startup"]
    assert out.count("arguments parsed") == len(modules) - 2  # pytest collected instead, twice
    for call in (c for c in calls if c["module"] == "benchmarks"):  # each --cases entry is a case the runner reads
        cases = call["args"][call["args"].index("--cases") + 1:]
        cases = cases[:next((i for i, a in enumerate(cases) if a.startswith("--")), len(cases))]
        assert cases and all(parse_case(c)["backend"] in {"torch", "diffusers", "inductor"} for c in cases)
    scopes = [parse_case(c).get("compile_scope") for call in calls if call["module"] == "benchmarks"
              for c in call["args"] if ":" in c]
    assert scopes.count("blocks") == 1  # compile-cache's regional compile
    (samplers,) = [c["args"] for c in calls if c["module"] == "benchmarks.samplers"]  # issue #32's GPU goal
    assert all(f" {a} " in f" {' '.join(samplers)} " for a in ("--preset sd15-random", "--device cuda",
                                                               "--cuda-graph loop", "--steps 10 20", "--warmup"))
    (startup,) = [c["args"] for c in calls if c["module"] == "benchmarks.startup"]  # issue #31's first-image goal
    from benchmarks.startup import plan_runs

    labels = startup[startup.index("--cases") + 1:]
    labels = labels[:next(i for i, a in enumerate(labels) if a.startswith("--"))]
    planned = plan_runs("cuda", "sd15-random", labels, None)  # labels the GPU cases have, none that empties --weights
    assert [r[0] for r in planned] == ["compiled fp16, compile cold", "compiled fp16, warm"] and "--weights" in startup
    collected = re.findall(r"(\d+)/\d+ tests collected", out)  # both halves of the GPU-marked tests collect
    assert len(collected) == 2 and all(int(n) > 0 for n in collected), out
    assert sorted(p.name.split("-", 3)[-1] for p in results.glob("gpu-*.log")) == sorted(f"{s}.log" for s in ["env", *runs])


def _plan(budget: int | None = None) -> tuple[dict[str, int], dict[str, int], str]:
    env = {k: v for k, v in os.environ.items() if k != "GPU_CHECK_BUDGET"}
    if budget is not None:
        env["GPU_CHECK_BUDGET"] = str(budget)
    out = subprocess.run(["bash", str(SCRIPT), "--plan"], env=env, capture_output=True, text=True, check=True).stdout
    default = {m[0]: int(m[1]) for m in re.findall(r"^(\S+) (\d+)$", out, re.M)}
    by_name = {m[0]: int(m[1]) for m in re.findall(r"^by name: (\S+) (\d+)$", out, re.M)}
    return default, by_name, out


def test_the_default_plan_fits_eight_minutes_on_a_fresh_machine():
    """The plan's arithmetic: the default steps, in order, with limits that add up to no more than the 480 s
    budget (the total line says the same sum); every by-name step fits the budget on its own."""
    default, by_name, out = _plan()
    assert list(default) == DEFAULT_STEPS and sorted(by_name) == sorted(BY_NAME)
    assert sum(default.values()) <= BUDGET
    assert f"total {sum(default.values())} of the {BUDGET} s budget" in out
    assert all(limit <= BUDGET for limit in by_name.values())


def test_a_step_that_cannot_finish_in_what_is_left_is_skipped_not_cut(tmp_path):
    default, _, _ = _plan()
    budget = default["bench"] - 1  # env runs; then bench's whole limit no longer fits, tests' does
    proc, results, calls = _run(tmp_path, "env", "bench", "tests", budget=budget)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"== toolchain: exit 0 after \d+ s", proc.stdout)
    assert re.search(rf"== bench: skipped: needs {default['bench']} s, \d+ s of the {budget} s budget left", proc.stdout)
    assert [c["module"] for c in calls] == ["pytest"]  # tests' 50 s still fit, so it ran; bench never started
    assert "skipped: needs" in (results.glob("gpu-*-bench.log").__next__()).read_text()


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
    proc, _, calls = _run(tmp_path, "env", "env-typo")
    assert proc.returncode == 2 and "unknown step 'env-typo': choose from env bench batched" in proc.stdout
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").glob("gpu-*.log"))  # nothing ran
    assert calls == []
