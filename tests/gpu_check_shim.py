"""A stand-in for the device machine's python in tests/test_gpu_check.py: `python -m MODULE ARGS` parses
the module's arguments with its own argparse parser and stops there (printing "gpu_check shim: MODULE
arguments parsed"), recording the call as a JSON line in $GPU_CHECK_SHIM_LOG; `python -m pytest` only
collects; anything else (`python -`, `python -c`) runs for real. So every command line gpu_check.sh
writes is checked against the code without a GPU or the minutes the real steps take."""
import argparse
import json
import os
import runpy
import sys

args = sys.argv[1:]
if args[:1] != ["-m"]:
    os.execv(sys.executable, [sys.executable, *args])
module, rest = args[1], args[2:]
sys.path[0] = os.getcwd()  # as `python -m` has it (not this file's folder)
with open(os.environ["GPU_CHECK_SHIM_LOG"], "a") as log:
    log.write(json.dumps({"module": module, "args": rest}) + "\n")
if module == "pytest":
    sys.argv = ["pytest", *rest, "--collect-only"]
else:
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, *a, **kw):  # type: ignore[no-untyped-def]
        parse(self, *a, **kw)  # exits 2 with the parser's message on a bad command line
        print(f"gpu_check shim: {module} arguments parsed")
        sys.exit(0)

    argparse.ArgumentParser.parse_args = parse_then_stop  # type: ignore[method-assign]
    sys.argv = [module, *rest]
runpy.run_module(module, run_name="__main__", alter_sys=True)
