#!/usr/bin/env bash
# One-shot GPU check (benchmarks/GPU.md): build the package with its CUDA extension, then run
# benchmarks/gpu_check.py. Meant for one call of about 5 minutes on a bare H100/H200 machine with
# PyTorch, Triton, nvcc, CMake, ninja, scikit-build-core and pybind11 preinstalled and no network.
# Writes to $OUT: build.log, nvidia_smi.csv, gpu_check.json, gpu_check.md (4 files).
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
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    -I"$inc" -I"$pbi" -Icsrc/cuda csrc/cuda/decode.cu csrc/cuda/bindings.cpp \
    -o "personamoe/_C_cuda$ext" >>"$OUT/build.log" 2>&1 && echo "build: nvcc fallback ok"
  ln -sfn ../kernels personamoe/kernels
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import personamoe._C_cuda as m; print('personamoe._C_cuda: CUDA runtime', m.runtime_version())" \
  || echo "personamoe._C_cuda does not import: the cuda backend will be reported unavailable"

left=$((TOTAL - ($(date +%s) - start)))
echo "gpu_check.py with ${left}s left"
timeout --signal=INT $((left + 5)) $PY benchmarks/gpu_check.py --out "$OUT" --budget "$left"
rc=$?
echo "gpu_check.py exit $rc; results in $OUT"
exit $rc
