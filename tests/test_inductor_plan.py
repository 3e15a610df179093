"""The inductor backend's GPU-free parts: package keys by architecture, load strategies, the constants
given at load time, max_autotune's memory check, and how a crashed child is named. No compile here."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdcn_trt.engines.inductor.child import ChildOutcome, crash_site, describe_exit, fault_stack, python_error, run_child
from sdcn_trt.engines.inductor.plan import (
    LOAD_ENV, LOAD_STRATEGIES, InductorSettings, architecture, autotune_fits, constant_batches, constants_api_missing,
    inductor_phases, load_strategy, loader_kwargs, module_tensors, network_config, own_storage,
    timed_totals, unpack_dir,
)
from sdcn_trt.errors import InputError
from sdcn_trt.export.descriptors import ShapeRange, ShapeSpec, get_descriptor
from sdcn_trt.engines.torch import FastPath

CRASH = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"


# -- what a package is keyed by ----------------------------------------------------------------------
def test_the_architecture_key_ignores_weights_and_provenance(tiny):
    from sdcn_trt.models.presets import load_preset

    other = load_preset("tiny", seed=1)
    desc, other_desc = get_descriptor("fused_step", tiny), get_descriptor("fused_step", other)
    assert architecture(desc) == architecture(other_desc)  # another checkpoint, same architecture
    entry = network_config(tiny.peek("unet"))
    assert entry["class"] == "UNet2DConditionModel" and entry["config"]["block_out_channels"] == [32, 64]
    assert not any(k.startswith("_") for k in entry["config"])
    clip = network_config(tiny.peek("text_encoder"))["config"]
    assert "transformers_version" not in clip and "architectures" not in clip and clip["hidden_size"] == tiny.peek("text_encoder").config.hidden_size
    assert set(architecture(desc)["libraries"]) == {"diffusers", "transformers"}


def test_settings_travel_to_the_child_as_json():
    settings = InductorSettings(ShapeRange(ShapeSpec(1, 64, 64), ShapeSpec(1, 64, 96), ShapeSpec(3, 128, 256)),
                               max_autotune=True, fast=FastPath(sdpa=True), load="fresh-process")
    assert InductorSettings.from_json(settings.to_json()) == settings
    assert InductorSettings.from_json(InductorSettings().to_json()) == InductorSettings()
    assert settings.inductor_configs() == {"max_autotune": True, "aot_inductor.package_constants_in_so": False,
                                           "aot_inductor.compile_wrapper_opt_level": "O0"}
    assert settings.inductor_configs(False)["max_autotune"] is False
    assert InductorSettings().inductor_configs()["aot_inductor.compile_wrapper_opt_level"] == "O0"  # the default
    inductors_own = InductorSettings(wrapper_opt="O1")
    assert InductorSettings.from_json(inductors_own.to_json()) == inductors_own
    assert inductors_own.inductor_configs()["aot_inductor.compile_wrapper_opt_level"] == "O1"  # given, not the env's
    assert InductorSettings.from_json({k: v for k, v in inductors_own.to_json().items() if k != "wrapper_opt"}) \
        == inductors_own  # a request written before the field was an O1 build
    with pytest.raises(InputError, match="unknown wrapper_opt 'O3'; choose one of O0, O1"):
        InductorSettings(wrapper_opt="O3")


def test_the_wrapper_level_keys_a_package_only_when_it_is_not_inductors_default(tiny):
    """O1 (inductor's default, what every package before the field was built at) leaves package keys as they
    were; O0, our default, is another package."""
    from sdcn_trt.engines.inductor.plan import current_target, package_parts

    desc = get_descriptor("control_hint", tiny)
    target = current_target(torch.device("cpu"))
    parts = {opt: package_parts(desc, "arch", "fp32", InductorSettings(wrapper_opt=opt), FastPath(), target)
             for opt in ("O0", "O1")}
    assert "wrapper_opt" not in parts["O1"]["options"] and parts["O0"]["options"]["wrapper_opt"] == "O0"


def test_the_cpu_target_is_read_without_compiling_anything(monkeypatch):
    """A package's CPU key names the CPU and its vector ISA without inductor's ISA probe, which builds test
    programs with g++ (seconds, in every process whose temp folder is new)."""
    from sdcn_trt.engines.inductor.plan import cpu_model, current_target, isa_flags

    import torch._inductor.cpu_vec_isa as cpu_vec_isa

    def no_compiler(*args, **kwargs):
        raise AssertionError("inductor's ISA probe ran")

    monkeypatch.setattr(cpu_vec_isa, "pick_vec_isa", no_compiler)
    monkeypatch.setattr(subprocess, "run", no_compiler)
    target = current_target(torch.device("cpu"))
    assert (target.device_type, target.device_name) == ("cpu", cpu_model())
    assert target.capability.startswith(torch.backends.cpu.get_cpu_capability().lower())
    if Path("/proc/cpuinfo").exists():  # a digest of the CPU's flags beside it: two CPUs named alike may differ
        assert re.fullmatch(r"\w+ flags [0-9a-f]{12}", target.capability), target.capability
    # the digest covers instruction sets, not the microcode and mitigation flags an update changes
    assert isa_flags("fpu vme ibrs avx2 md_clear avx512f sse4_2 ssbd amx_tile") == ["amx_tile", "avx2", "avx512f",
                                                                                      "fpu", "sse4_2"]


def test_an_aoti_builds_phases_come_from_inductors_own_timers():
    """Only the compile between the two readings counts; a section this torch never timed is left out, not 0."""
    before = timed_totals({"GraphLowering.run": [2.0], "GraphLowering.codegen": [1.0, 4.0], "other": [9.0]})
    assert before == {"GraphLowering.run": 2.0, "GraphLowering.codegen": 5.0, "AotCodeCompiler.compile": 0.0}
    after = timed_totals({"GraphLowering.run": [2.0, 3.0], "GraphLowering.codegen": [1.0, 4.0, 20.0], "other": [9.0]})
    assert inductor_phases(before, after) == {"lower_s": 3.0, "codegen_s": 20.0}
    after["AotCodeCompiler.compile"] = 44.0
    assert inductor_phases(before, after) == {"lower_s": 3.0, "codegen_s": 20.0, "cpp_s": 44.0}


def test_a_childs_progress_lines_arrive_while_it_runs():
    """run_child hands each 'sdcn-progress: ' line of the child's stderr to `progress` as it is written (a
    minute-long build says what it is doing), and only those lines."""
    import time

    code = ("import sys, time; from sdcn_trt.engines.inductor.child import say_progress; "
            "say_progress('exported in 1.0 s'); print('a warning', file=sys.stderr, flush=True); time.sleep(2); "
            "say_progress('compiled')")
    seen = []
    outcome = run_child([sys.executable, "-c", code], 60, progress=lambda line: seen.append((line, time.perf_counter())),
                        poll_s=0.2)
    end = time.perf_counter()
    assert outcome.ok and [line for line, _ in seen] == ["exported in 1.0 s", "compiled"]
    assert end - seen[0][1] > 1.0  # the first line came while the child still slept
    assert "a warning" in outcome.stderr and "sdcn-progress: compiled" in outcome.stderr


# -- load strategies ---------------------------------------------------------------------------------------
def test_load_strategies_by_name_and_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(LOAD_ENV, raising=False)
    assert load_strategy(None).name == "default" and load_strategy(None).single_threaded
    assert [s.name for s in LOAD_STRATEGIES] == ["default", "multithreaded", "fresh-process", "unpack-in-cache"]
    monkeypatch.setenv(LOAD_ENV, "multithreaded")
    assert load_strategy(None).name == "multithreaded" and not load_strategy(None).single_threaded
    assert InductorSettings().load is None and load_strategy(InductorSettings().load).name == "multithreaded"
    monkeypatch.setenv(LOAD_ENV, "fastest")
    with pytest.raises(InputError, match=r"unknown inductor load strategy 'fastest' \(from \$SDCN_TRT_INDUCTOR_LOAD\); "
                                         r"valid: default, multithreaded, fresh-process, unpack-in-cache"):
        load_strategy(None)
    with pytest.raises(InputError, match="unknown inductor load strategy 'x'; valid: default"):
        InductorSettings(load="x")
    default, unpack = load_strategy("default"), load_strategy("unpack-in-cache")
    assert loader_kwargs(default, torch.device("cuda:1")) == {"run_single_threaded": True, "device_index": 1}
    assert loader_kwargs(load_strategy("multithreaded"), torch.device("cpu")) == {"run_single_threaded": False}
    assert unpack_dir(default, 1000, tmp_path) is None  # the system temp folder has room for 1000 bytes
    assert unpack_dir(unpack, 1000, tmp_path) == tmp_path / "inductor" / ".unpack"
    assert unpack_dir(default, 2**62, tmp_path) == tmp_path / "inductor" / ".unpack"  # no temp folder is that big


# -- the constants given at load time ------------------------------------------------------------------
def test_constants_are_given_in_storage_of_their_own():
    plain = torch.arange(6.0).reshape(2, 3)
    assert own_storage(plain) is not plain and own_storage(plain).data_ptr() == plain.data_ptr()  # detached only
    big = torch.arange(12.0)
    view = big[6:].reshape(2, 3)  # what a memory-mapped file or a fused QKV weight hands out
    owned = own_storage(view)
    assert owned.untyped_storage().nbytes() == 6 * 4 and owned.storage_offset() == 0 and torch.equal(owned, view)
    assert owned.data_ptr() == view.data_ptr() and owned.shape == view.shape  # the same memory, not a copy
    halves = torch.arange(12.0).half()[4:].reshape(2, 2, 2)
    assert own_storage(halves).dtype == torch.float16 and torch.equal(own_storage(halves), halves)
    transposed = own_storage(plain.t())  # dense, not contiguous: copied in its own layout
    assert transposed.stride() == (1, 3) and torch.equal(transposed, plain.t())
    assert transposed.untyped_storage().nbytes() == 6 * 4 and transposed.data_ptr() != plain.data_ptr()
    every_other = own_storage(big[::2])  # not dense: copied contiguous
    assert every_other.is_contiguous() and every_other.untyped_storage().nbytes() == 6 * 4
    assert torch.equal(every_other, big[::2])
    conv = torch.randn(4, 3, 2, 2).to(memory_format=torch.channels_last)
    assert own_storage(conv).data_ptr() == conv.data_ptr()  # alone in its storage: as it is
    file = torch.cat([torch.zeros(5), conv.permute(0, 2, 3, 1).flatten()])  # a conv weight mapped from a file
    mapped = file[5:].view(4, 2, 2, 3).permute(0, 3, 1, 2)  # channels_last, at an offset
    owned = own_storage(mapped)
    assert owned.stride() == conv.stride() and torch.equal(owned, conv) and owned.data_ptr() == mapped.data_ptr()
    assert owned.untyped_storage().nbytes() == conv.numel() * 4
    del file, mapped
    assert torch.equal(owned, conv)  # the slice keeps the file's memory alive
    empty = own_storage(big[12:])
    assert empty.numel() == 0 and empty.untyped_storage().nbytes() == 0


def test_the_constants_given_are_the_ones_asked_for_and_a_lack_is_named():
    module = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    tensors = module_tensors(module)
    assert sorted(tensors) == ["0.bias", "0.weight", "1.bias", "1.num_batches_tracked", "1.running_mean",
                               "1.running_var", "1.weight"]
    given, = constant_batches(["0.weight", "1.running_mean"], tensors, "toy")
    assert sorted(given) == ["0.weight", "1.running_mean"] and torch.equal(given["0.weight"], module[0].weight)
    with pytest.raises(InputError, match=r"the 'toy' package needs 1 tensors the module does not have \(first: "
                                         r"\['2.weight'\]; the module has 6 the package does not need, first: "
                                         r"\['0.bias', '1.bias', '1.num_batches_tracked'\]\): the package was "
                                         r"compiled for another architecture"):
        next(constant_batches(["0.weight", "2.weight"], tensors, "toy"))  # before any batch is made
    batches = list(constant_batches(["0.weight", "0.bias", "1.running_mean"], tensors, "toy", batch_bytes=20))
    assert [sorted(b) for b in batches] == [["0.weight"], ["0.bias", "1.running_mean"]]  # 24 bytes, then 12 + 12


def test_a_torch_without_the_constants_api_is_named():
    class OldLoader:
        def __call__(self, *args):
            return args

    assert "without get_constant_fqns / load_constants" in constants_api_missing(OldLoader())
    assert "install torch >= 2.6" in constants_api_missing(OldLoader())

    class NewLoader(OldLoader):
        def get_constant_fqns(self):
            return []

        def load_constants(self, constants, *, check_full_update):
            pass

    assert constants_api_missing(NewLoader()) == ""


def test_max_autotune_wants_room_beside_the_weights():
    assert autotune_fits(20 * 2**30, 2 * 2**30) == (True, "")
    ok, why = autotune_fits(5 * 2**30, 2 * 2**30)
    assert not ok and why == ("the GPU has 5.0 GiB free and max_autotune wants about 7.0 GiB "
                              "(3x the 2.0 GiB of weights + 1 GiB)")


# -- a child's end, in words ---------------------------------------------------------------------------
def test_exit_statuses_in_words():
    assert describe_exit(0) == "exit status 0" and describe_exit(2) == "exit status 2"
    assert describe_exit(-11) == "killed by SIGSEGV (segmentation fault)"
    assert describe_exit(-9) == "killed by SIGKILL (out of memory (the kernel's OOM killer) or killed from outside)"
    assert describe_exit(-6) == "killed by SIGABRT (aborted)"
    assert describe_exit(-200) == "killed by signal 200"


def test_a_crashed_child_is_named_with_its_faulthandler_stack():
    outcome = run_child([sys.executable, "-X", "faulthandler", "-c", "def crash():\n    " + CRASH + "\ncrash()"], 60)
    assert outcome.returncode == -11 and outcome.crashed and not outcome.ok
    assert outcome.how() == "killed by SIGSEGV (segmentation fault) at <string>:2 in crash"
    details = outcome.details()
    assert details.startswith("Fatal Python error: Segmentation fault\nCurrent thread")
    assert 'File "<string>", line 2 in crash' in details and 'line 3 in <module>' in details
    assert "Extension modules" not in details


def test_fault_stack_puts_the_crashing_thread_first():
    stderr = "\n".join([
        "some warning", "Fatal Python error: Segmentation fault", "",
        "Thread 0x1 (most recent call first):", '  File "/x/threading.py", line 359 in wait', "",
        "Current thread 0x2 (most recent call first):",
        '  File "/site-packages/torch/export/pt2_archive/_package.py", line 1045 in _load_aoti',
        '  File "/w/sdcn_trt/engines/inductor/runner.py", line 109 in load_compiled', "",
        "Thread 0x3 (most recent call first):", '  File "/x/tqdm/_monitor.py", line 69 in run', "",
        "Extension modules: numpy, torch._C (total: 2)"])
    stack = fault_stack(stderr)
    assert stack.splitlines() == [
        "Fatal Python error: Segmentation fault", "Current thread 0x2 (most recent call first):",
        '  File "/site-packages/torch/export/pt2_archive/_package.py", line 1045 in _load_aoti',
        '  File "/w/sdcn_trt/engines/inductor/runner.py", line 109 in load_compiled',
        "Thread 0x1 (most recent call first):", '  File "/x/threading.py", line 359 in wait',
        "Thread 0x3 (most recent call first):", '  File "/x/tqdm/_monitor.py", line 69 in run']
    assert crash_site(stack) == "export/pt2_archive/_package.py:1045 in _load_aoti"
    assert fault_stack("no crash here") == "" and crash_site("") == ""


def test_a_python_error_is_the_exception_not_a_warning_line():
    stderr = ("Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n    f()\n"
              "sdcn_trt.errors.InputError: bad shape\nsite-packages/torch/x.py:3: UserWarning: careful\n"
              "  warnings.warn(\n")
    assert python_error(stderr) == "InputError: bad shape"
    assert python_error("copyreg.py:99: FutureWarning: deprecated\n  return cls.__new__(cls)\nplain end\n") == "plain end"
    assert python_error("") == ""
    failed = ChildOutcome(1, stderr, 1.0, 10)
    assert failed.how() == "exit status 1: InputError: bad shape"


def test_a_child_past_its_time_is_killed_with_its_process_group():
    outcome = run_child([sys.executable, "-c", "import subprocess, sys, time; "
                         "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"], 2)
    assert outcome.returncode is None and outcome.how() == "timed out after 2 s" and not outcome.crashed
    assert outcome.seconds < 30
    leftover = subprocess.run(["pgrep", "-f", "time.sleep\\(60\\)"], capture_output=True, text=True).stdout.split()
    assert leftover == []


def gone(pid: int) -> bool:
    """The process has ended (a zombie nobody reaped counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_dies_with_a_parent_killed_outright(tmp_path):
    """A parent SIGKILLed (a benchmark's timeout, the OOM killer) runs no `finally`: the kernel ends the
    child it was waiting for, which would otherwise build on for minutes in a session of its own."""
    import os
    import signal
    import time

    pid_file = tmp_path / "child.pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    parent = subprocess.Popen([sys.executable, "-c", "import sys; from sdcn_trt.engines.inductor.child import run_child; "
                               f"run_child([sys.executable, '-c', {child!r}], 300)"])
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pid_file.exists() and pid_file.read_text(), "the child did not start in 60 s"
        pid = int(pid_file.read_text())
        assert not gone(pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while not gone(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gone(pid)
    finally:
        parent.kill()
        if pid_file.exists() and pid_file.read_text() and not gone(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)  # (this test failed: leave nothing behind)


def test_dynamic_shapes_are_grouped_as_forward_takes_its_inputs():
    """The networks take hints, scales and residuals as *varargs: torch.export wants one tuple for them."""
    from sdcn_trt.engines.inductor.plan import export_dynamic_shapes

    def step(latents, timestep, *hints_and_scales):
        return latents

    def hint(*controls):
        return controls

    def text(input_ids):
        return input_ids

    assert export_dynamic_shapes(step, ("l", None, "h1", "h2", None)) == ("l", None, ("h1", "h2", None))
    assert export_dynamic_shapes(hint, ({0: "b"},)) == (({0: "b"},),)
    assert export_dynamic_shapes(text, ("t",)) == ("t",) and export_dynamic_shapes(text, None) is None
    with pytest.raises(InputError, match="2 inputs do not fit the parameters of .*text"):
        export_dynamic_shapes(text, ("t", "u"))


def test_a_failing_progress_callback_leaves_no_child_running():
    code = ("import time; from sdcn_trt.engines.inductor.child import say_progress; say_progress('started'); "
            "time.sleep(60)  # sdcn-callback-test")

    def stop(line):
        raise KeyboardInterrupt  # Ctrl-C, or a callback that fails

    with pytest.raises(KeyboardInterrupt):
        run_child([sys.executable, "-c", code], 120, progress=stop, poll_s=0.2)
    leftover = subprocess.run(["pgrep", "-f", "sdcn-callback-test"], capture_output=True, text=True).stdout.split()
    assert leftover == []
