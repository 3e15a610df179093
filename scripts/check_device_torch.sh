#!/usr/bin/env bash
# The test suite (pytest -m "not slow", extra arguments passed on) on the CPU under the GPU machine's
# versions: torch 2.11 with the device image's transformers, onnx, onnxruntime and numpy
# (scripts/device-versions.txt), on Python 3.12 where this machine has it. The pinned .venv runs
# torch 2.14.1; the device runs 2.11, so code that works on one only is caught here, not in device
# minutes. Installs into .venv-device on first use (about 2 minutes and 5.5 GB: PyPI's torch 2.11 is
# a CUDA build, which runs on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-device
if [ ! -x "$venv/bin/python" ]; then
    bash scripts/need_disk.sh 8 "$venv and a test run"
    python=python3
    for candidate in python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3; do
        if "$candidate" --version >/dev/null 2>&1; then python=$candidate; break; fi
    done
    "$python" -m venv "$venv"
    export PIP_NO_CACHE_DIR=1
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q -c scripts/device-versions.txt torch torchvision
    "$venv/bin/python" -m pip install -q -c scripts/device-versions.txt -e ".[test]"
fi
"$venv/bin/python" -c 'import sys, torch, transformers, onnx, onnxruntime, numpy
print("device versions: python", sys.version.split()[0], "torch", torch.__version__, "transformers",
      transformers.__version__, "onnx", onnx.__version__, "onnxruntime", onnxruntime.__version__, "numpy", numpy.__version__)'
"$venv/bin/python" -m pytest -q -m "not slow" -p no:cacheprovider "$@"
