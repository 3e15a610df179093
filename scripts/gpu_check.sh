#!/usr/bin/env bash
# What only a GPU can show, in 8 minutes on a fresh device machine (nothing compiled is carried over). The
# default run is a plan: its steps in order of value, each with its own time limit, the limits adding up to
# at most the budget (GPU_CHECK_BUDGET seconds, default 480; `bash scripts/gpu_check.sh --plan` prints it
# and tests/test_gpu_check.py checks the sum on the CPU). A step starts only when its whole limit fits in
# what is left of the budget; one that does not is skipped with a line saying so, never cut mid-way.
#   env        the GPU and the toolchain (nvidia-smi; torch, CUDA, compilers, which backends can run)
#   bench      the contest workload (sd15-random, 256x384, CFG batch 2, 20 steps), each case in its own
#              process: torch fp32 eager, torch fp16 + whole-loop CUDA graph (the default fast path), the
#              same with the fused step under torch.compile, and the peer: diffusers fp16 under
#              torch.compile reduce-overhead (benchmarks/__main__.py)
#   batched    B = 1 / 8 / 16 photos per call through the whole-loop graph, torch fp16 (images/s, memory)
#   profile    where a step's time goes: the kernel table of one step inside a CUDA graph, the default
#              torch fp16 step and the torch.compile'd one (benchmarks/profile.py); the compiled one is the
#              second process to compile the fused step, so its set-up shows what a compile cache saves
#   schedules  full, eps=10, control=10, deepcache=3 and the contest winners' patterns on torch fp16 under the
#              whole-loop graph (the fastest engine that compiles nothing), tiny-trained quality beside each
#   tests      the GPU-marked tests that compile nothing for minutes (CUDA graphs, fp16, compiled GroupNorm+SiLU)
# and, by name only: inductor (AOTInductor's load strategies, benchmarks/inductor_probe.py), sdpa (each SDPA
# kernel at every attention shape), fastpath (each FastPath switch alone inside a CUDA graph), paritygap
# (diffusers fp16 against ours), tiny (fp16 parity on the tiny preset), tests-slow (the GPU tests that
# compile: inductor packages, torch.compile), profile-inductor, profile-compile-max (the max-autotune
# torch.compile step's kernel table), fastpath-inductor (the compiled steps and their compile times),
# compile-cache (the torch.compile'd fused step compiled, then a second process from the compile cache, then
# its blocks compiled apart: regional compilation; each timed),
# aoti (the inductor fused-step package built, loaded and run inside the loop graph), samplers (every
# sampler at 10 and 20 steps inside the whole-loop graph on sd15-random, torch fp16: issue #32's goal, a
# 10-step image <= 0.55x the 20-step DDIM image's time, benchmarks/samplers.py) and startup (process start
# to first image, each case a new process: torch.compile cold then from its caches; issue #31's goal,
# <= 5 s with the caches warm, benchmarks/startup.py). Logs, JSON and
# Markdown go to benchmarks/results/ and, when $OUT is set (the device machine), to $OUT as they are written.
#
# Usage, on a machine with a CUDA GPU and this package importable (the offline device machine:
# `source .device/env.sh` first, see ../shared/offline_gpu/prepare.sh):
#   bash scripts/gpu_check.sh                 # the default plan: env bench batched profile schedules tests
#   bash scripts/gpu_check.sh --plan          # the plan's steps, limits and their sum; runs nothing
#   bash scripts/gpu_check.sh env compile-cache aoti   # a second machine: by name, each with its own limit
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
budget=${GPU_CHECK_BUDGET:-480}
# step:limit in seconds. The default plan's limits add up to <= 480 (tests/test_gpu_check.py), from the
# 2026-12-04 H200 run's step times (benchmarks/results/gpu-h200-20261204/) with the cached fp16 weights
DEFAULT_PLAN="env:25 bench:200 batched:55 profile:100 schedules:40 tests:50"
BY_NAME_PLAN="inductor:240 sdpa:60 fastpath:90 paritygap:60 tiny:120 tests-slow:240 profile-inductor:300
  profile-compile-max:300 fastpath-inductor:420 compile-cache:420 aoti:420 samplers:240 startup:420"
limit_of() {  # limit_of STEP: its limit in seconds, empty for an unknown step
  local entry
  for entry in $DEFAULT_PLAN $BY_NAME_PLAN; do [[ ${entry%%:*} == "$1" ]] && { echo "${entry#*:}"; return; }; done
}
if [[ ${1:-} == --plan ]]; then
  total=0
  for entry in $DEFAULT_PLAN; do echo "${entry%%:*} ${entry#*:}"; total=$((total + ${entry#*:})); done
  echo "total $total of the $budget s budget"
  for entry in $BY_NAME_PLAN; do echo "by name: ${entry%%:*} ${entry#*:}"; done
  exit 0
fi
default_steps=$(for entry in $DEFAULT_PLAN; do printf '%s ' "${entry%%:*}"; done)
steps=${*:-$default_steps}
for step in $steps; do  # a misspelt step fails before anything runs
  if [[ -z $(limit_of "$step") ]]; then
    echo "unknown step '$step': choose from" $default_steps $(for e in $BY_NAME_PLAN; do printf '%s ' "${e%%:*}"; done)
    exit 2
  fi
done
results=${GPU_CHECK_RESULTS:-benchmarks/results}  # the tests point it elsewhere
stamp=$(date +%Y%m%d-%H%M)
mkdir -p "$results" ${OUT:+"$OUT"}
# compiled packages outlive this script on a warm machine (git-ignored), so a second run skips compiles
export SDCN_TRT_CACHE=${SDCN_TRT_CACHE:-$PWD/.sdcn_cache} PYTHONUNBUFFERED=1
start=$SECONDS
started=$(mktemp)  # its time stamp tells this run's result files from earlier ones
trap 'rm -f "$started"' EXIT

left() { echo $((budget - (SECONDS - start))); }

# run NAME LIMIT CMD...: the command under its LIMIT, logged to both places as it goes; when LIMIT does not
# fit in what is left of the budget the command is skipped with a line saying so (never started to be cut)
run() {
  local name=$1 limit=$2; shift 2
  local remaining; remaining=$(left)
  local log="$results/gpu-$stamp-$name.log"
  if ((limit > remaining)); then
    echo "== $name: skipped: needs $limit s, $remaining s of the ${budget} s budget left" | tee -a "$log" ${OUT:+"$OUT/gpu-$stamp-$name.log"}
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
  local found inc lib home=$SDCN_TRT_CACHE/cuda_home
  found=$("$python" -c "from sdcn_trt.engines.inductor.plan import cuda_headers_found as f; print(f()[0])" 2>/dev/null)
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
  limit=$(limit_of "$step")
  case $step in
    env)
      run env 10 bash -c "nvidia-smi; nvidia-smi --query-gpu=name,compute_cap,memory.total,clocks.max.sm --format=csv"
      cuda_home_from_pip >"$results/.cuda_home.txt" 2>&1  # not in a pipe: its exports must stay in this shell
      tee -a "$results/gpu-$stamp-env.log" ${OUT:+"$OUT/gpu-$stamp-env.log"} <"$results/.cuda_home.txt"
      rm -f "$results/.cuda_home.txt"
      run toolchain $((limit - 10)) "$python" - <<'PY'
import os, shutil, torch
from sdcn_trt import BACKENDS, backend_available
from sdcn_trt.engines.inductor.plan import cuda_headers_found
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
print("CXX", shutil.which(os.environ.get("CXX") or "g++"), "CUDA_HOME", os.environ.get("CUDA_HOME"), "nvcc", shutil.which("nvcc"))
print("CUDA headers", cuda_headers_found())
for backend in BACKENDS:
    print(f"{backend:>12} on cuda:", backend_available(backend, "cuda"))
PY
      ;;
    bench)
      # the first case writes the weights cache (fp16 entry included) the later processes load; the
      # compiled case's torch.compile caches land in $SDCN_TRT_CACHE for the profile step's second compile
      run bench "$limit" "$python" -m benchmarks --device cuda --steps 20 --repeats 3 --timeout 110 \
        --cases torch:fp32:off torch:fp16:loop torch:fp16:loop:compile=default:compiled_networks=fused_step \
        diffusers:fp16:off:reduce-overhead --deadline $((limit - 10)) --out "$results" ${OUT:+"$OUT"}
      ;;
    batched)
      # B photos per call through the whole-loop graph (issue #21's goal: >= 20 images/s at B = 8), images/s,
      # ms/image, peak memory and the difference from single calls per B
      run batched "$limit" "$python" -m benchmarks --device cuda --steps 20 --repeats 2 --timeout 40 \
        --cases torch:fp16:loop --batch-sizes 1 8 16 --deadline $((limit - 5)) --out "$results" ${OUT:+"$OUT"}
      ;;
    profile)
      run profile "$limit" "$python" -m benchmarks.profile --device cuda --repeats 5 \
        --backends "torch fp16" "torch fp16 + torch.compile" --out "$results" ${OUT:+"$OUT"}
      ;;
    schedules)
      run schedules "$limit" "$python" -m benchmarks.schedules --device cuda --precision fp16 --cuda-graph loop \
        --steps 20 --repeats 2 --out "$results" ${OUT:+"$OUT"}
      ;;
    tests)
      run tests "$limit" "$python" -m pytest -q -m "(gpu or tensorrt) and not slow" -rs -s tests/ -p no:cacheprovider
      ;;
    tests-slow)
      run tests-slow "$limit" "$python" -m pytest -q -m "(gpu or tensorrt) and slow" -rs -s tests/ -p no:cacheprovider
      ;;
    inductor)
      # each load strategy in a child, in order, until one compiles, loads and runs the text encoder
      run inductor "$limit" "$python" -m benchmarks.inductor_probe --device cuda --preset sd15-random --precision fp16 \
        --networks text_encoder --timeout $((limit - 40)) --out "$results" ${OUT:+"$OUT"}
      chosen=$(grep -ho 'SDCN_TRT_INDUCTOR_LOAD=[a-z-]*' "$results/gpu-$stamp-inductor.log" | tail -1)
      if [[ -n $chosen ]]; then
        export "${chosen?}"
        echo "== inductor: the steps below load packages with $chosen" | tee -a "$results/gpu-$stamp-inductor.log" ${OUT:+"$OUT/gpu-$stamp-inductor.log"}
      fi
      ;;
    sdpa)
      run sdpa "$limit" "$python" -m benchmarks.sdpa --device cuda --dtype fp16 --out "$results" ${OUT:+"$OUT"}
      ;;
    fastpath)
      # with the sdpa step's table from this run: also the variant pinning each head size to its fastest kernel
      table=$(find "$results" -maxdepth 1 -name 'sdpa-cuda-fp16-*.json' -newer "$started" 2>/dev/null | sort | tail -1)
      run fastpath "$limit" "$python" -m benchmarks.fast_path --device cuda --precision fp16 \
        ${table:+--sdpa-table "$table"} --out "$results" ${OUT:+"$OUT"}
      ;;
    fastpath-inductor)
      run fastpath-inductor "$limit" "$python" -m benchmarks.fast_path --device cuda --precision fp16 --inductor \
        --variants "default (sdpa+fuse_qkv)" --out "$results" ${OUT:+"$OUT"}
      ;;
    paritygap)
      run paritygap "$limit" "$python" -m benchmarks.parity_gap --device cuda --steps 20 --diffusers-fp16 \
        --out "$results"
      [[ -n ${OUT:-} ]] && cp "$results"/parity-gap-sd15-random-cuda.* "$OUT"/ 2>/dev/null
      ;;
    tiny)
      # fp16 parity where random SD1.5-sized weights may overflow: the tiny preset, same cases
      run tiny "$limit" "$python" -m benchmarks --device cuda --preset tiny --steps 20 --repeats 1 --timeout 100 \
        --cases torch:fp32:off torch:fp16:off torch:fp16:loop torch:fp16:loop:compile=default:compiled_networks=fused_step \
        inductor:fp16:loop:compiled_networks=fused_step --deadline $((limit - 10)) --out "$results" ${OUT:+"$OUT"}
      ;;
    profile-inductor)
      run profile-inductor "$limit" "$python" -m benchmarks.profile --device cuda --repeats 5 --backends "inductor fp16" \
        --out "$results" ${OUT:+"$OUT"}
      ;;
    profile-compile-max)
      run profile-compile-max "$limit" "$python" -m benchmarks.profile --device cuda --repeats 5 \
        --backends "torch fp16 + torch.compile max-autotune" --out "$results" ${OUT:+"$OUT"}
      ;;
    compile-cache)
      # the same torch.compile'd case in two processes sharing a fresh sdcn_trt cache: the first compiles, the
      # second starts from the compile cache (the bench table's build column is each process's compile time);
      # then the step's blocks compiled apart (regional compilation), cold in a cache of its own
      third=$((limit / 3))
      # fresh compile caches, the weights cache shared (a fresh one would draw the SD1.5 weights in each slot)
      base="${SDCN_TRT_CACHE:-$HOME/.cache/sdcn_trt}"
      mkdir -p "$base/weights" "$results/compile-cache-$$" "$results/compile-cache-blocks-$$"
      ln -sfn "$base/weights" "$results/compile-cache-$$/weights"
      ln -sfn "$base/weights" "$results/compile-cache-blocks-$$/weights"
      SDCN_TRT_CACHE="$results/compile-cache-$$" run compile-cache-first "$third" "$python" -m benchmarks --device cuda \
        --steps 20 --repeats 2 --timeout $((third - 10)) \
        --cases torch:fp16:loop:compile=default:compiled_networks=fused_step --out "$results" ${OUT:+"$OUT"}
      SDCN_TRT_CACHE="$results/compile-cache-$$" run compile-cache-second "$third" "$python" -m benchmarks --device cuda \
        --steps 20 --repeats 2 --timeout $((third - 10)) \
        --cases torch:fp16:loop:compile=default:compiled_networks=fused_step --out "$results" ${OUT:+"$OUT"}
      SDCN_TRT_CACHE="$results/compile-cache-blocks-$$" run compile-cache-blocks "$third" "$python" -m benchmarks \
        --device cuda --steps 20 --repeats 2 --timeout $((third - 10)) \
        --cases torch:fp16:loop:compile=default:compiled_networks=fused_step:compile_scope=blocks \
        --out "$results" ${OUT:+"$OUT"}
      rm -rf "$results/compile-cache-$$" "$results/compile-cache-blocks-$$"  # the links go, not the weights
      ;;
    aoti)
      # the inductor backend's fused-step package: built (progress in the log), loaded, run inside the loop graph
      run aoti "$limit" "$python" -m benchmarks --device cuda --steps 20 --repeats 3 --timeout $((limit - 20)) \
        --cases inductor:fp16:loop:compiled_networks=fused_step --out "$results" ${OUT:+"$OUT"}
      ;;
    startup)
      # each case a new process from the sd15-random preset's cached weights (shared with the other steps):
      # the torch.compile'd networks cold, then from their caches (the goal's row); the report is written
      # after every case. AOTInductor's start-up cases ("inductor fp16") build four SD1.5 packages, more than
      # this limit holds: by hand, `python -m benchmarks.startup --device cuda --cases "inductor fp16"`
      base="${SDCN_TRT_CACHE:-$HOME/.cache/sdcn_trt}"
      mkdir -p "$base/weights"
      run startup "$limit" "$python" -m benchmarks.startup --device cuda --preset sd15-random --weights "$base/weights" \
        --cases "compiled fp16" --timeout $((limit / 2 - 10)) --work "${TMPDIR:-/tmp}/sdcn-startup-$$" \
        --out "$results" ${OUT:+"$OUT"}
      ;;
    samplers)
      # each sampler's loop captured once untimed (--warmup), then 3 timed replays per sampler and step count;
      # the report's speed line puts every sampler at 10 steps against ddim at 20
      run samplers "$limit" "$python" -m benchmarks.samplers --preset sd15-random --device cuda --precision fp16 \
        --cuda-graph loop --images 1 --steps 10 20 --warmup --repeats 3 --out "$results" ${OUT:+"$OUT"}
      ;;
  esac
done
echo "gpu_check: $((SECONDS - start)) s of the $budget s budget"
