#!/usr/bin/env bash
# The whole GPU check in one call, on the lent H100/H200 machine, from the repository root:
#   build for sm_90 -> full test suite with CUDA tests -> compute-sanitizer memcheck over the op
#   tests -> kernel and engine benchmarks on cuda. Everything lands in one results folder.
#   usage: bash benchmarks/gpu_check.sh [RESULTS_DIR]   (default: $OUT, else benchmarks/results/gpu)
# Before the call, on the session machine: bash benchmarks/fetch_gpu_wheels.sh, and carry .gpu_wheels.
set -uo pipefail
RESULTS=${1:-${OUT:-benchmarks/results/gpu}}
mkdir -p "$RESULTS"
SUMMARY="$RESULTS/summary.txt"
started=$(date +%s)
step() { echo "=== $1 ($(( $(date +%s) - started )) s)" | tee -a "$SUMMARY"; }
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1

step "device"
{ nvidia-smi; nvcc --version | tail -2
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} > "$RESULTS/device.txt" 2>&1
cat "$RESULTS/device.txt" | tail -3 | tee -a "$SUMMARY"

step "build (pip install --no-build-isolation --no-deps --no-index -e ., sm_90)"
if ! python3 -m pip install --no-build-isolation --no-deps --no-index -e . > "$RESULTS/build.log" 2>&1; then
  tail -40 "$RESULTS/build.log" | tee -a "$SUMMARY"; exit 1
fi
python3 - <<'PY' 2>&1 | tee -a "$SUMMARY" || exit 1
import torch
from torch_secorder import _extension, ops
info = _extension.info()
assert info["source"] == "prebuilt", info
x = torch.randn(4, 3, device="cuda")
assert ops.softmax_hessian_diag(x, torch.ones(4, device="cuda")).is_cuda  # a CUDA kernel is registered
print("extension:", info, "| CUDA kernels registered")
PY
if [ -d .gpu_wheels ]; then
  python3 -m pip install -q --no-index --no-deps .gpu_wheels/*.whl >> "$RESULTS/build.log" 2>&1 \
    && echo "BackPACK installed from .gpu_wheels" | tee -a "$SUMMARY"
fi

step "tests (CUDA tests must run, not skip)"
python3 -m pytest -q -rs tests > "$RESULTS/tests.log" 2>&1
echo "pytest exit $?" | tee -a "$SUMMARY"
tail -2 "$RESULTS/tests.log" | tee -a "$SUMMARY"
ran=$(python3 -m pytest -q --collect-only -k cuda tests 2>/dev/null | grep -c "cuda")
echo "tests parametrised on cuda: $ran collected" | tee -a "$SUMMARY"
grep -i "SKIPPED.*cuda\|no CUDA" "$RESULTS/tests.log" | head -5 | tee -a "$SUMMARY"

step "compute-sanitizer memcheck over the CUDA op tests"
if command -v compute-sanitizer > /dev/null; then
  timeout 240 compute-sanitizer --tool memcheck --error-exitcode 99 \
    python3 -m pytest -q -x -p no:cacheprovider tests/test_loss_curvature_ops.py tests/test_contraction_ops.py -k cuda \
    > "$RESULTS/memcheck.log" 2>&1
  echo "memcheck exit $? ($(grep -c 'Invalid\|ERROR SUMMARY: [1-9]' "$RESULTS/memcheck.log") error lines)" | tee -a "$SUMMARY"
  grep "ERROR SUMMARY" "$RESULTS/memcheck.log" | tail -1 | tee -a "$SUMMARY"
else
  echo "compute-sanitizer not found" | tee -a "$SUMMARY"
fi

step "kernel benchmarks (batch 256)"
python3 benchmarks/bench_kernels.py --device cuda --batch 256 --out "$RESULTS" > "$RESULTS/bench_kernels.log" 2>&1
tail -8 "$RESULTS/bench_kernels.log" | tee -a "$SUMMARY"

step "engine benchmarks (batch 256, then 1024)"
for batch in 256 1024; do
  python3 benchmarks/bench_backprop.py --device cuda --batch "$batch" --generic-limit 15 --out "$RESULTS" \
    > "$RESULTS/bench_backprop_$batch.log" 2>&1
  tail -6 "$RESULTS/bench_backprop_$batch.log" | tee -a "$SUMMARY"
done
step "done"
