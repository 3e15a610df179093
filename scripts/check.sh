#!/usr/bin/env bash
# The test command: type-check the TensorRT layer against tensorrt-stubs, then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
MYPYPATH=.venv/trt-stubs .venv/bin/python -m mypy --config-file pyproject.toml sdcn_trt/engines/
.venv/bin/python -m pytest -q -m "not slow" "$@"
