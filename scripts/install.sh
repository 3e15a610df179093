#!/usr/bin/env bash
# Installs sdcn_trt with its test/dev extras into ./.venv (about 3-4 minutes on a fresh machine, as README says).
set -euo pipefail
cd "$(dirname "$0")/.."
# a fresh install takes about 6 GB (torch's wheel is a CUDA build); say so before pip fails half-way
[ -d .venv/lib ] || bash scripts/need_disk.sh 7 "a fresh install"
python3 -m venv .venv
export PIP_NO_CACHE_DIR=1  # no second copy of every download: CI machines can be short of disk
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: any other spelling pulls a multi-GB CUDA build from the index
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e ".[test]"
# type stubs for TensorRT 10.13 (mypy only); --no-deps: their 'tensorrt' dependency cannot install here
.venv/bin/python -m pip install -q --no-deps tensorrt-stubs==10.13.0.35.1
# they install as a plain 'tensorrt' package of .pyi files without py.typed, which mypy skips in
# site-packages; a mended copy on MYPYPATH is read as stubs (scripts/check.sh points mypy at it)
.venv/bin/python scripts/prepare_trt_stubs.py .venv/trt-stubs
echo "installed: $(.venv/bin/python -c 'import sdcn_trt, torch; print("sdcn_trt", sdcn_trt.__version__, "torch", torch.__version__)')"
