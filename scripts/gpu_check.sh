#!/usr/bin/env bash
# What only a GPU can show, in about 8 minutes: the toolchain the inductor backend needs, the GPU-marked
# tests (CUDA graphs, fp16 on CUDA, inductor on CUDA, TensorRT when installed), then the GPU benchmark
# on the contest workload (sd15-random, 256x384, CFG batch 2, 20 steps), each case in its own process,
# then, with the time left, fp16 parity on the tiny preset and the fast path's switches one by one
# (benchmarks/fast_path.py). Every step has its own time limit and the
# whole script a budget (GPU_CHECK_BUDGET seconds, default 480); logs, JSON and Markdown go to
# benchmarks/results/ and, when $OUT is set (the device machine), to $OUT as they are written.
#
# Usage, on a machine with a CUDA GPU and this package importable (the offline device machine:
# `source .device/env.sh` first, see ../shared/offline_gpu/prepare.sh):
#   bash scripts/gpu_check.sh                 # env, inductor, tests, bench, tiny, fastpath
#   bash scripts/gpu_check.sh batched         # B photos per call (benchmarks/batched.py), not in the defaults
#   bash scripts/gpu_check.sh bench tiny      # only some steps (a second run on the same machine
#                                             # reuses the inductor packages in .sdcn_cache/)
# The inductor step tries AOTInductor's load strategies (benchmarks/inductor_probe.py), each in its own
# process, on the SD1.5-sized text encoder (the package that crashed the first GPU run), and exports
# SDCN_TRT_INDUCTOR_LOAD=<the first that loads> for the steps after it; its package stays in the cache.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
budget=${GPU_CHECK_BUDGET:-480}
steps=${*:-env inductor tests bench tiny fastpath}
results=benchmarks/results
stamp=$(date +%Y%m%d-%H%M)
mkdir -p "$results" ${OUT:+"$OUT"}
# compiled packages outlive this script on a warm machine (git-ignored), so a second run skips compiles
export SDCN_TRT_CACHE=${SDCN_TRT_CACHE:-$PWD/.sdcn_cache} PYTHONUNBUFFERED=1
start=$SECONDS

left() { echo $((budget - (SECONDS - start))); }

# run NAME LIMIT CMD...: the command under min(LIMIT, budget left), logged to both places
run() {
  local name=$1 limit=$2; shift 2
  local remaining; remaining=$(left)
  ((limit > remaining)) && limit=$remaining
  local log="$results/gpu-$stamp-$name.log"
  if ((limit < 20)); then
    echo "== $name: skipped, $remaining s of the ${budget} s budget left" | tee -a "$log" ${OUT:+"$OUT/gpu-$stamp-$name.log"}
    return 0
  fi
  echo "== $name (limit $limit s): $*" | tee "$log" ${OUT:+"$OUT/gpu-$stamp-$name.log"}
  local t0=$SECONDS
  timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$log" ${OUT:+"$OUT/gpu-$stamp-$name.log"}
  local rc=${PIPESTATUS[0]}
  local how="exit $rc"
  ((rc == 124 || rc == 137)) && how="timed out (exit $rc)"
  echo "== $name: $how after $((SECONDS - t0)) s" | tee -a "$log" ${OUT:+"$OUT/gpu-$stamp-$name.log"}
}

# AOTInductor on CUDA compiles its C++ wrapper against the CUDA runtime headers and links libcuda. On an
# image with torch's pip CUDA but no toolkit, point CUDA_HOME at a folder holding the pip headers and
# the driver's libcuda (nothing is installed; the folder is git-ignored).
cuda_home_from_pip() {
  local found inc lib home=$PWD/.sdcn_cache/cuda_home
  found=$("$python" -c "from sdcn_trt.engines.inductor_plan import cuda_headers_found as f; print(f()[0])" 2>/dev/null)
  [[ $found == True ]] && { echo "CUDA headers: found where torch looks (CUDA_HOME=${CUDA_HOME:-unset})"; return 0; }
  inc=$("$python" - <<'PY'
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()] + os.environ.get("PYTHONPATH", "").split(":")
hits = [p for r in roots if r for p in glob.glob(os.path.join(r, "nvidia", "*", "include", "cuda_runtime_api.h"))]
print(os.path.dirname(hits[0]) if hits else "")
PY
)
  [[ -z $inc ]] && { echo "CUDA headers: none where torch looks, none in pip's nvidia/*/include"; return 0; }
  lib=$(ldconfig -p 2>/dev/null | awk '/libcuda\.so\.1 /{print $NF; exit}')
  [[ -z $lib ]] && lib=$(ls /usr/lib/x86_64-linux-gnu/libcuda.so.1 /usr/lib64/libcuda.so.1 \
    /usr/local/nvidia/lib64/libcuda.so.1 2>/dev/null | head -1)
  mkdir -p "$home/lib64"
  ln -sfn "$inc" "$home/include"
  [[ -n $lib ]] && ln -sf "$lib" "$home/lib64/libcuda.so"
  export CUDA_HOME=$home LIBRARY_PATH=$home/lib64${LIBRARY_PATH:+:$LIBRARY_PATH}
  echo "CUDA_HOME=$CUDA_HOME (headers from $inc; libcuda: ${lib:-not found by ldconfig})"
}

for step in $steps; do
  case $step in
    env)
      run env 60 bash -c "nvidia-smi; nvidia-smi --query-gpu=name,compute_cap,memory.total,clocks.max.sm --format=csv"
      cuda_home_from_pip >"$results/.cuda_home.txt" 2>&1  # not in a pipe: its exports must stay in this shell
      tee -a "$results/gpu-$stamp-env.log" ${OUT:+"$OUT/gpu-$stamp-env.log"} <"$results/.cuda_home.txt"
      rm -f "$results/.cuda_home.txt"
      run toolchain 60 "$python" - <<'PY'
import os, shutil, torch
from sdcn_trt import BACKENDS, backend_available
from sdcn_trt.engines.inductor_plan import cuda_headers_found
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
print("CXX", shutil.which(os.environ.get("CXX") or "g++"), "CUDA_HOME", os.environ.get("CUDA_HOME"), "nvcc", shutil.which("nvcc"))
print("CUDA headers", cuda_headers_found())
for backend in BACKENDS:
    print(f"{backend:>12} on cuda:", backend_available(backend, "cuda"))
PY
      ;;
    inductor)
      # each load strategy in a child, in order, until one compiles, loads and runs the text encoder
      run inductor 240 "$python" -m benchmarks.inductor_probe --device cuda --preset sd15-random --precision fp16 \
        --networks text_encoder --timeout 200 --out "$results" ${OUT:+"$OUT"}
      chosen=$(grep -ho 'SDCN_TRT_INDUCTOR_LOAD=[a-z-]*' "$results/gpu-$stamp-inductor.log" | tail -1)
      if [[ -n $chosen ]]; then
        export "${chosen?}"
        echo "== inductor: the steps below load packages with $chosen" | tee -a "$results/gpu-$stamp-inductor.log" ${OUT:+"$OUT/gpu-$stamp-inductor.log"}
      fi
      ;;
    tests)
      run tests 200 "$python" -m pytest -q -m "gpu or tensorrt" -rs -s tests/ -p no:cacheprovider
      ;;
    bench)
      # per case at most 300 s (the inductor case compiles four networks unless .sdcn_cache has them)
      run bench 420 "$python" -m benchmarks --device cuda --steps 20 --repeats 3 --timeout 300 \
        --deadline $(($(left) - 20)) --out "$results" ${OUT:+"$OUT"}
      ;;
    tiny)
      # fp16 parity where random SD1.5-sized weights may overflow: the tiny preset, same cases
      run tiny 240 "$python" -m benchmarks --device cuda --preset tiny --steps 20 --repeats 1 --timeout 200 \
        --cases torch:fp32:off torch:fp16:off torch:fp16:loop inductor:fp16:loop \
        --deadline $(($(left) - 20)) --out "$results" ${OUT:+"$OUT"}
      ;;
    batched)
      # not in the default steps: B photos per call through the whole-loop graph (issue #21's goal: >= 20
      # images/s at B = 8), images/s, ms/image, peak memory and the difference from single calls per B
      run batched 300 "$python" -m benchmarks --device cuda --steps 20 --repeats 2 --timeout 240 \
        --cases torch:fp16:loop --batch-sizes 1 2 4 8 16 --deadline $(($(left) - 20)) --out "$results" ${OUT:+"$OUT"}
      ;;
    fastpath)
      # eager fp16 fused step with SDPA, fused QKV and channels_last added in turn (channels_last's default)
      run fastpath 120 "$python" -m benchmarks.fast_path --device cuda --precision fp16 --out "$results" ${OUT:+"$OUT"}
      ;;
    *) echo "unknown step '$step': choose from env inductor tests bench tiny fastpath batched"; exit 2 ;;
  esac
done
echo "gpu_check: $((SECONDS - start)) s of the $budget s budget"
