"""Work in a child process, and how the child ended, in words: the signal that killed it (SIGSEGV,
SIGKILL from the out-of-memory killer, ...), the faulthandler stack it printed, or its Python error.

AOTInductor compiles and first loads, and each benchmark case, run this way: a crashing compiler or
loader kills the child, and the user's process gets an error naming what died, where and why.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence


def python_command(module: str, *args: str) -> list[str]:
    """`python -X faulthandler -m module args...` with this interpreter: a fatal signal prints every
    thread's Python stack to stderr before the child dies."""
    return [sys.executable, "-X", "faulthandler", "-m", module, *args]


def describe_exit(returncode: int) -> str:
    """A child's exit status in words: 'killed by SIGSEGV (segmentation fault)', 'exit status 3'."""
    if returncode >= 0:
        return f"exit status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        return f"killed by signal {-returncode}"
    why = {"SIGSEGV": "segmentation fault", "SIGKILL": "out of memory (the kernel's OOM killer) or killed from outside",
           "SIGABRT": "aborted", "SIGBUS": "bus error: a mapped file was truncated or the disk is full",
           "SIGILL": "illegal instruction: code built for another CPU", "SIGTERM": "terminated"}.get(name)
    return f"killed by {name}" + (f" ({why})" if why else "")


def fault_stack(stderr: str, limit: int = 40) -> str:
    """The faulthandler report in a crashed child's stderr: 'Fatal Python error: ...' and the current
    thread's stack first (the other threads are compile workers and monitors), without the list of
    extension modules; "" when there is none."""
    lines = stderr.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Fatal Python error")), None)
    if start is None:
        return ""
    block = []
    for line in lines[start:]:
        if line.startswith("Extension modules:"):
            break
        if line.strip():
            block.append(line)
    current = next((i for i, line in enumerate(block) if line.startswith("Current thread")), None)
    if current is not None:
        following = next((i for i in range(current + 1, len(block)) if block[i].startswith("Thread ")), len(block))
        block = block[:1] + block[current:following] + block[1:current] + block[following:]
    return "\n".join(block[:limit])


def crash_site(stack: str) -> str:
    """The innermost frame of the crashing thread ('torch/export/pt2_archive/_package.py:1045 in _load_aoti'),
    or ""."""
    lines = stack.splitlines()
    current = next((i for i, line in enumerate(lines) if line.startswith("Current thread")), None)
    if current is None or current + 1 >= len(lines):
        return ""
    frame = lines[current + 1].strip()  # File "path", line N in function
    if not frame.startswith('File "'):
        return ""
    path, _, rest = frame[len('File "'):].partition('", line ')
    number, _, function = rest.partition(" in ")
    short = "/".join(Path(path).parts[-3:])
    return f"{short}:{number} in {function}"


def python_error(stderr: str) -> str:
    """The exception line of the last Python traceback in `stderr`, its type unqualified
    ('sdcn_trt.errors.InputError: bad shape' -> 'InputError: bad shape'), else the last line that is
    not a library warning; "" for an empty stderr."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    last = max((i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")), default=None)
    if last is not None:
        error = next((line for line in lines[last + 1:] if not line.startswith((" ", "\t"))), "")
        if error:
            return re.sub(r"^(?:[A-Za-z_]\w*\.)+(?=[A-Z]\w*:)", "", error)
    kept = [line for line in lines if "Warning" not in line and not line.startswith((" ", "\t"))]
    return kept[-1] if kept else ""


@dataclass
class ChildOutcome:
    """How a child ended: its exit status (None when it timed out and was killed), its stderr, its time."""

    returncode: int | None
    stderr: str
    seconds: float
    timeout: float | None

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def crashed(self) -> bool:
        """Killed by a signal it did not ask for (a timeout is not a crash)."""
        return self.returncode is not None and self.returncode < 0

    def how(self) -> str:
        """'killed by SIGSEGV (segmentation fault) at pkg/mod.py:12 in f', 'timed out after 300 s', or the
        Python error ('exit status 1: ValueError: ...')."""
        if self.returncode is None:
            return f"timed out after {self.timeout or 0:.0f} s"
        if self.crashed:
            site = crash_site(fault_stack(self.stderr))
            return describe_exit(self.returncode) + (f" at {site}" if site else "")
        error = python_error(self.stderr)
        return describe_exit(self.returncode) + (f": {error}" if error else "")

    def details(self) -> str:
        """What to keep in the log: the faulthandler stack of a crash, else the end of stderr."""
        stack = fault_stack(self.stderr)
        return stack if stack else "\n".join(self.stderr.strip().splitlines()[-20:])


PROGRESS = "sdcn-progress: "  # a child's stderr line that run_child hands to its `progress` callback as it comes


def say_progress(message: str) -> None:
    """In a child: one progress line for the parent (run_child(progress=...)), e.g. 'exported in 12.3 s'."""
    print(PROGRESS + message, file=sys.stderr, flush=True)


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# What runs before the child's command (then exec'd in its place): the kernel is told to SIGKILL the
# process when the thread that started it ends (the setting survives exec), and it exits at once if
# that parent is already gone. No preexec_fn: that would fork a multi-threaded torch process and run
# Python (and torch's fork hooks) in the copy.
ARM_CHILD = (f"import ctypes, os, sys; ctypes.CDLL(None).prctl({PR_SET_PDEATHSIG}, {int(signal.SIGKILL)}); "
             "os.getppid() == int(sys.argv[1]) or os._exit(1); os.execvp(sys.argv[2], sys.argv[2:])")


def dying_with_parent(cmd: Sequence[str]) -> list[str]:
    """`cmd`, run so that it dies with this process's calling thread (Linux; elsewhere `cmd` as it is): a
    parent killed outright (SIGKILL, a benchmark's timeout, the OOM killer), whose `finally` never runs,
    leaves no build behind. That thread is the one waiting in run_child until the child ends. Only the
    child itself is tied: its own children (g++, compile workers) finish or watch their parent."""
    if not sys.platform.startswith("linux"):
        return list(cmd)
    return [sys.executable, "-c", ARM_CHILD, str(os.getpid()), *cmd]


def run_child(cmd: Sequence[str], timeout: float | None, env: Mapping[str, str] | None = None,
              stdout: int | None = subprocess.DEVNULL, progress: Callable[[str], None] | None = None,
              poll_s: float = 1.0) -> ChildOutcome:
    """Run `cmd` in its own process group (a timeout, None for none, also ends the workers it started),
    tied to the calling thread (`dying_with_parent`); stderr goes to a temporary file, not a pipe, so a
    child that writes a lot never blocks. `progress` gets each PROGRESS line of the child's stderr
    (without the prefix) within `poll_s` of its writing."""
    clock = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+", prefix="sdcn_child.", suffix=".log") as err:
        proc = subprocess.Popen(dying_with_parent(cmd), stdout=stdout, stderr=err, text=True, start_new_session=True,
                                env=dict(env) if env is not None else None)
        seen = 0  # bytes of stderr already scanned for progress lines

        def relay() -> None:
            nonlocal seen
            if progress is None:
                return
            while True:  # everything the child wrote so far, a MiB at a time
                text = os.pread(err.fileno(), 1 << 20, seen)  # where the child got to; the file's offset stays
                end = text.rfind(b"\n") + 1 or (len(text) if len(text) == 1 << 20 else 0)  # a line longer than a MiB: skip on
                seen += end
                for line in text[:end].decode(errors="replace").splitlines():
                    if line.startswith(PROGRESS):
                        progress(line[len(PROGRESS):])
                if len(text) < 1 << 20:
                    return

        returncode: int | None = None
        try:
            while True:
                left = None if timeout is None else timeout - (time.perf_counter() - clock)
                try:
                    returncode = proc.wait(timeout=poll_s if left is None else max(0.0, min(poll_s, left)))
                    relay()
                    break
                except subprocess.TimeoutExpired:
                    relay()
                    if left is not None and left <= poll_s:
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
                        returncode = None
                        break
        finally:  # the callback raised, or Ctrl-C: the child (a session of its own) must not outlive us
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        err.seek(0)
        stderr = err.read()
    return ChildOutcome(returncode, stderr, time.perf_counter() - clock, timeout)
