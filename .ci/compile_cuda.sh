#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu with nvcc, compile only (no GPU here), so CUDA code cannot rot.
# Uses the CUDA headers that ship in the CPU torch wheel; usage: .ci/compile_cuda.sh PYTHON
set -euo pipefail
PYTHON=${1:-python3}
NVCC=${NVCC:-nvcc}
command -v "$NVCC" >/dev/null || { echo "nvcc not found (set NVCC=...)"; exit 1; }
includes=$("$PYTHON" -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))")
python_include=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
abi=$("$PYTHON" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for source in csrc/cuda/*.cu; do
  echo "nvcc -c $source (sm_90)"
  "$NVCC" -c "$source" -o "$out/$(basename "$source").o" $includes -I"$python_include" \
    -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -DTORCH_SECORDER_PYTHON_MODULE -D_GLIBCXX_USE_CXX11_ABI="$abi" \
    -std=c++20 -O3 --expt-relaxed-constexpr -Xcompiler -fPIC -Xcompiler -fopenmp \
    -gencode arch=compute_90,code=sm_90 -diag-suppress 3306 -Werror all-warnings
done
echo "CUDA compile check OK"
