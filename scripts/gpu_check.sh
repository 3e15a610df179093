#!/usr/bin/env bash
# What only a GPU can show: the GPU-marked tests (CUDA graphs, fp16 on CUDA, TensorRT when installed)
# and the GPU benchmark on the contest workload. Logs and results go to benchmarks/results/.
# Usage (on a machine with a CUDA GPU and this package installed): bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
mkdir -p benchmarks/results
stamp=$(date +%Y%m%d-%H%M)
nvidia-smi | tee "benchmarks/results/gpu-$stamp-nvidia-smi.txt"
"$python" -m pytest -q -m "gpu or tensorrt" -rs tests/ 2>&1 | tee "benchmarks/results/gpu-$stamp-tests.log"
"$python" -m benchmarks --device cuda --steps 20 --repeats 5 2>&1 | tee "benchmarks/results/gpu-$stamp-bench.log"
