#!/usr/bin/env bash
# One-shot GPU check (benchmarks/GPU.md): build the package with its CUDA extension, then run
# benchmarks/gpu_check.py. Meant for one call of about 5 minutes on a bare H100/H200 machine with
# PyTorch, Triton, nvcc, CMake, ninja, scikit-build-core and pybind11 preinstalled and no network.
# Writes to $OUT: build.log, nvidia_smi.csv, canary.json, canary.log, gpu_check.json, gpu_check.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
TOTAL=${GPU_CHECK_SECONDS:-290}
start=$(date +%s)

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw \
  --format=csv >"$OUT/nvidia_smi.csv" 2>&1 || true
cat "$OUT/nvidia_smi.csv"

# Build only the lent card's architecture (one SASS, no PTX): compute capability "9.0" -> 90.
cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
if ! [[ $cc =~ ^[0-9]+$ ]]; then
  cc=$(timeout 60 $PY -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}')" \
    2>/dev/null || true)
fi
if [[ $cc =~ ^[0-9]+$ ]]; then
  ARCH=${GPU_CHECK_ARCH:-$cc}
else
  ARCH=${GPU_CHECK_ARCH:-90}
  echo "compute capability unknown: building for sm_$ARCH"
fi
echo "build: CUDA arch sm_$ARCH only"
export CMAKE_ARGS="${CMAKE_ARGS:+$CMAKE_ARGS }-DCMAKE_CUDA_ARCHITECTURES=$ARCH-real"
export PERSONAMOE_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
if $PY -m pip install --no-deps --no-build-isolation -e . >"$OUT/build.log" 2>&1; then
  echo "build: pip install -e . ok ($(($(date +%s) - start)) s)"
else
  # Without the build tools: compile the CUDA extension with nvcc alone and run from the tree.
  echo "build: pip install -e . FAILED, tail of build.log:"
  tail -20 "$OUT/build.log"
  ext=$($PY -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
  inc=$($PY -c "import sysconfig; print(sysconfig.get_paths()['include'])")
  pbi=$($PY -c "import pybind11; print(pybind11.get_include())")
  nvcc -O3 -std=c++17 --shared -Xcompiler -fPIC,-fvisibility=hidden --threads 0 \
    -gencode "arch=compute_$ARCH,code=sm_$ARCH" \
    -I"$inc" -I"$pbi" -Icsrc/cuda csrc/cuda/decode.cu csrc/cuda/bindings.cpp \
    -o "personamoe/_C_cuda$ext" >>"$OUT/build.log" 2>&1 && echo "build: nvcc fallback ok"
  ln -sfn ../kernels personamoe/kernels
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import personamoe._C_cuda as m; print('personamoe._C_cuda: CUDA runtime', m.runtime_version())" \
  || echo "personamoe._C_cuda does not import: the cuda backend will be reported unavailable"

# Canary: one small CUDA decode launch, then one Triton launch, in a process of its own with a
# short hard timeout (SIGINT cannot interrupt a hung kernel launch: SIGTERM, then SIGKILL 10 s
# later). It writes $OUT/canary.json before and after each launch; gpu_check.py reads it and leaves
# out a backend whose launch did not come back ok. Its Triton compile lands in the cache the main
# run reuses.
CANARY_SECONDS=${GPU_CHECK_CANARY_SECONDS:-90}
timeout -k 10 "$CANARY_SECONDS" $PY benchmarks/gpu_check.py --canary --out "$OUT" \
  >"$OUT/canary.log" 2>&1
crc=$?
case $crc in 124 | 137) crc="$crc (timed out, killed)" ;; esac
echo "canary exit $crc: $(cat "$OUT/canary.json" 2>/dev/null || echo 'no canary.json')"
tail -5 "$OUT/canary.log"

left=$((TOTAL - ($(date +%s) - start)))
echo "gpu_check.py with ${left}s left"
# gpu_check.py stops its own sections in time (--budget) and rewrites gpu_check.json/.md after
# every case; this hard limit (TERM, then KILL 10 s later) is for a hung kernel.
timeout -k 10 $((left + 10)) $PY benchmarks/gpu_check.py --out "$OUT" --budget "$left"
rc=$?
[ $rc -eq 124 ] || [ $rc -eq 137 ] && echo "gpu_check.py killed by the hard timeout"
echo "gpu_check.py exit $rc; results in $OUT"
exit $rc
