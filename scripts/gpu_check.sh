#!/usr/bin/env bash
# What only a GPU can show, within 9 minutes on a fresh device machine (nothing compiled is carried over),
# steps in order of value, each with its own time limit and the whole script a budget
# (GPU_CHECK_BUDGET seconds, default 540); a step that would start with < 20 s left is skipped:
#   env        the GPU and the toolchain the inductor backend needs
#   inductor   AOTInductor's load strategies, each in a child, on the SD1.5-sized text encoder; the first
#              that loads is exported for the steps after (benchmarks/inductor_probe.py)
#   profile    where a step's time goes: kernel table of one full step inside a CUDA graph, torch fp16
#              plain and with GroupNorm+SiLU fused + channels_last (benchmarks/profile.py)
#   sdpa       each SDPA kernel (flash, efficient, cudnn, math, auto) alone at every attention shape of the
#              step, the fastest per head size 40 / 80 / 160 (benchmarks/sdpa.py; seconds)
#   schedules  full, eps=10, control=10, deepcache=3 and the contest winners' patterns on torch fp16 under
#              the whole-loop graph, tiny-trained quality beside each (benchmarks/schedules.py)
#   fastpath   each FastPath switch alone, one step inside a CUDA graph (benchmarks/fast_path.py), and the
#              SDPA kernel pinned per head size to the sdpa step's fastest (when that step ran)
#   paritygap  diffusers fp16 against ours, with CLIP in fp32 and fp16 (benchmarks/parity_gap.py)
#   bench      the contest workload (sd15-random, 256x384, CFG batch 2, 20 steps), each case in its own
#              process: torch fp32 / fp16 + loop graph, torch fp16 + loop graph with the fused step under
#              torch.compile (JIT inductor: no package load), diffusers fp16 eager and under torch.compile, inductor
#              fp16 + loop graph compiling only the fused ControlNet+UNet step (compiled_networks=fused_step:
#              the step runs 20 times per image, CLIP and the VAE once, on torch fp16; each SD1.5-sized compile
#              takes minutes, and the 150 s per case cannot hold four)
#   tests      the GPU-marked tests (CUDA graphs, fp16, inductor, compiled GroupNorm+SiLU, TensorRT if present)
#   tiny       fp16 parity on the tiny preset (the inductor case again compiles the fused step only)
# and, by name only (compiles for minutes): profile-inductor and profile-compile (the kernel table of the
# inductor fp16 step and of the torch.compile'd one), fastpath-inductor (inductor without / with max_autotune,
# torch.compile default / max-autotune-no-cudagraphs, compile times). Logs, JSON and Markdown go to
# benchmarks/results/ and, when $OUT is set (the device machine), to $OUT as they are written.
#
# Usage, on a machine with a CUDA GPU and this package importable (the offline device machine:
# `source .device/env.sh` first, see ../shared/offline_gpu/prepare.sh):
#   bash scripts/gpu_check.sh                 # env inductor profile sdpa schedules fastpath paritygap bench tests tiny
#   bash scripts/gpu_check.sh env tests tiny profile-inductor   # a second machine: what the first had no time for
#   bash scripts/gpu_check.sh env batched     # B photos per call (benchmarks/batched.py), not in the defaults
# The inductor step tries AOTInductor's load strategies (benchmarks/inductor_probe.py), each in its own
# process, on the SD1.5-sized text encoder (the package that crashed the first GPU run), and exports
# SDCN_TRT_INDUCTOR_LOAD=<the first that loads> for the steps after it; its package stays in the cache.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
budget=${GPU_CHECK_BUDGET:-540}
steps=${*:-env inductor profile sdpa schedules fastpath paritygap bench tests tiny}
results=${GPU_CHECK_RESULTS:-benchmarks/results}  # the tests point it elsewhere
stamp=$(date +%Y%m%d-%H%M)
mkdir -p "$results" ${OUT:+"$OUT"}
# compiled packages outlive this script on a warm machine (git-ignored), so a second run skips compiles
export SDCN_TRT_CACHE=${SDCN_TRT_CACHE:-$PWD/.sdcn_cache} PYTHONUNBUFFERED=1
start=$SECONDS
started=$(mktemp)  # its time stamp tells this run's result files from earlier ones
trap 'rm -f "$started"' EXIT

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
  case $step in
    env)
      run env 60 bash -c "nvidia-smi; nvidia-smi --query-gpu=name,compute_cap,memory.total,clocks.max.sm --format=csv"
      cuda_home_from_pip >"$results/.cuda_home.txt" 2>&1  # not in a pipe: its exports must stay in this shell
      tee -a "$results/gpu-$stamp-env.log" ${OUT:+"$OUT/gpu-$stamp-env.log"} <"$results/.cuda_home.txt"
      rm -f "$results/.cuda_home.txt"
      run toolchain 60 "$python" - <<'PY'
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
    profile)
      run profile 100 "$python" -m benchmarks.profile --device cuda --repeats 5 \
        --backends "torch fp16" "torch fp16 + gn_silu + channels_last" --out "$results" ${OUT:+"$OUT"}
      ;;
    profile-compile)
      run profile-compile 300 "$python" -m benchmarks.profile --device cuda --repeats 5 \
        --backends "torch fp16 + torch.compile" --out "$results" ${OUT:+"$OUT"}
      ;;
    profile-inductor)
      run profile-inductor 300 "$python" -m benchmarks.profile --device cuda --repeats 5 --backends "inductor fp16" \
        --out "$results" ${OUT:+"$OUT"}
      ;;
    sdpa)
      run sdpa 60 "$python" -m benchmarks.sdpa --device cuda --dtype fp16 --out "$results" ${OUT:+"$OUT"}
      ;;
    schedules)
      # the fastest engine measured so far (torch fp16 + whole-loop graph: 251 ms/image on the H200)
      run schedules 100 "$python" -m benchmarks.schedules --device cuda --precision fp16 --cuda-graph loop \
        --steps 20 --repeats 3 --out "$results" ${OUT:+"$OUT"}
      ;;
    fastpath)
      # with the sdpa step's table from this run: also the variant pinning each head size to its fastest kernel
      table=$(find "$results" -maxdepth 1 -name 'sdpa-cuda-fp16-*.json' -newer "$started" 2>/dev/null | sort | tail -1)
      run fastpath 90 "$python" -m benchmarks.fast_path --device cuda --precision fp16 \
        ${table:+--sdpa-table "$table"} --out "$results" ${OUT:+"$OUT"}
      ;;
    fastpath-inductor)
      run fastpath-inductor 420 "$python" -m benchmarks.fast_path --device cuda --precision fp16 --inductor \
        --variants "default (sdpa+fuse_qkv)" --out "$results" ${OUT:+"$OUT"}
      ;;
    bench)
      # per case at most 150 s; torch.compile and inductor cases compile, so they come after the eager ones;
      # the inductor case compiles what it measures, the fused step, and runs CLIP and the VAE on torch fp16
      run bench 240 "$python" -m benchmarks --device cuda --steps 20 --repeats 3 --timeout 150 \
        --cases torch:fp32:off torch:fp16:loop diffusers:fp16:off \
        torch:fp16:loop:compile=default:compiled_networks=fused_step diffusers:fp16:off:reduce-overhead \
        diffusers:fp16:off:max-autotune-no-cudagraphs inductor:fp16:loop:compiled_networks=fused_step torch:fp16:off \
        --deadline $(($(left) - 20)) --out "$results" ${OUT:+"$OUT"}
      ;;
    paritygap)
      run paritygap 60 "$python" -m benchmarks.parity_gap --device cuda --steps 20 --diffusers-fp16 \
        --out "$results"
      [[ -n ${OUT:-} ]] && cp "$results"/parity-gap-sd15-random-cuda.* "$OUT"/ 2>/dev/null
      ;;
    tests)
      run tests 200 "$python" -m pytest -q -m "gpu or tensorrt" -rs -s tests/ -p no:cacheprovider
      ;;
    tiny)
      # fp16 parity where random SD1.5-sized weights may overflow: the tiny preset, same cases
      run tiny 120 "$python" -m benchmarks --device cuda --preset tiny --steps 20 --repeats 1 --timeout 100 \
        --cases torch:fp32:off torch:fp16:off torch:fp16:loop torch:fp16:loop:compile=default:compiled_networks=fused_step \
        inductor:fp16:loop:compiled_networks=fused_step \
        --deadline $(($(left) - 20)) --out "$results" ${OUT:+"$OUT"}
      ;;
    batched)
      # not in the default steps: B photos per call through the whole-loop graph (issue #21's goal: >= 20
      # images/s at B = 8), images/s, ms/image, peak memory and the difference from single calls per B
      run batched 300 "$python" -m benchmarks --device cuda --steps 20 --repeats 2 --timeout 240 \
        --cases torch:fp16:loop --batch-sizes 1 2 4 8 16 --deadline $(($(left) - 20)) --out "$results" ${OUT:+"$OUT"}
      ;;
    *) echo "unknown step '$step': choose from env inductor profile sdpa schedules fastpath paritygap bench tests tiny" \
         "profile-inductor profile-compile fastpath-inductor batched"; exit 2 ;;
  esac
done
echo "gpu_check: $((SECONDS - start)) s of the $budget s budget"
