#!/usr/bin/env bash
# The whole GPU check in one device call (at most ~9.5 minutes: step limits sum to 580 s), from the repository root:
#   build -> tests (not slow; every device-parametrised test on cuda) -> compute-sanitizer memcheck of
#   the CUDA op tests -> kernel benchmarks -> engine benchmarks (one process, CUDA events after warm-up) ->
#   the graph engine on ResNet-18 at batch 128 -> one timm and one Hugging Face model (benchmarks/gpu_zoo.py)
#   -> the SophiaDiagonal example on cuda (loss curves PNG).
# Each step has its own time limit and reports its exit status and elapsed seconds. Everything lands
# in $OUT as two files: summary.txt and gpu_check.tar.gz (logs, benchmark JSON and markdown).
#   usage: bash benchmarks/gpu_check.sh [--dry-run]
# --dry-run: on a machine without a GPU, runs the plumbing with the CUDA steps skipped and the
# benchmarks shrunk (CPU, tiny batches); tests/test_gpu_check.py runs it so the script cannot rot.
# BackPACK, timm and transformers travel as wheels: bash benchmarks/fetch_gpu_wheels.sh here, then carry .gpu_wheels.
set -uo pipefail
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
WORK=$(mktemp -d)/gpu_check
mkdir -p "$OUT" "$WORK"
SUMMARY="$WORK/summary.txt"
started=$(date +%s)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
[ "$DRY" = 1 ] || export FORCE_CUDA=1

# shellcheck source=benchmarks/gpu_check_steps.sh
source "$(dirname "$0")/gpu_check_steps.sh"

say "gpu_check $( [ "$DRY" = 1 ] && echo '(dry run)') commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
step device 15 bash -c "nvidia-smi 2>&1 | head -15; nvcc --version 2>&1 | tail -2; $PYTHON -c \"import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)\""

if [ "$DRY" = 1 ]; then  # the same build, into a wheel: the installed package (maybe loaded by a test) stays as it is
  step build 120 "$PYTHON" -m pip wheel --no-build-isolation --no-deps --no-index -w "$WORK/wheel" . || finish 1
  rm -rf "$WORK/wheel"
else
  step build 120 "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e . || finish 1
fi
if [ "$DRY" = 1 ]; then
  skipped "cuda-kernels-registered"
  DEVICE=cpu
else
  step cuda-kernels-registered 20 "$PYTHON" -c "
import torch
from torch_secorder import _extension, ops
assert _extension.info()['source'] == 'prebuilt', _extension.info()
for name in ('softmax_hessian_diag', 'factor_diagonal', 'affine_weight_diagonal', 'selected_weight_diagonal',
             'channel_weight_diagonal'):
    assert ops.has_kernel(name, 'cuda'), name
print('CUDA kernels registered:', _extension.info())" || finish 1
  DEVICE=cuda
fi

# BackPACK and its pure-Python dependencies, from wheels, into a folder of their own (no network there)
if [ -d .gpu_wheels ]; then
  step backpack-wheels 20 "$PYTHON" -m pip install --no-index --no-deps --target "$WORK/site" .gpu_wheels/*.whl \
    && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
else
  say "=== backpack-wheels: no .gpu_wheels folder (BackPACK columns will say skipped)"
fi
if [ "$DRY" = 0 ] && [ -d .gpu_wheels/zoo ]; then  # numpy only where the machine has none: it must match torch's
  "$PYTHON" -c "import numpy" 2> /dev/null && ZOO_WHEELS=$(ls .gpu_wheels/zoo/*.whl | grep -v /numpy-) \
    || ZOO_WHEELS=$(ls .gpu_wheels/zoo/*.whl)
  # shellcheck disable=SC2086
  step zoo-wheels 15 "$PYTHON" -m pip install --no-index --no-deps --target "$WORK/site" $ZOO_WHEELS \
    && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi

if [ "$DRY" = 1 ]; then
  step tests 110 "$PYTHON" -m pytest -q -m "not slow" -p no:cacheprovider -k "traps and zero_size" tests
else
  TAIL=6 step tests 95 "$PYTHON" -m pytest -q -m "not slow" -p no:cacheprovider -rA tests
  say "    tests run on cuda: $(grep -c '^PASSED.*cuda' "$WORK/tests.log") passed, $(grep -c '^SKIPPED.*cuda\|^FAILED.*cuda' "$WORK/tests.log") skipped or failed"
fi

if [ "$DRY" = 1 ]; then
  skipped memcheck
elif command -v compute-sanitizer > /dev/null; then
  # without the caching allocator, an access past a tensor's end is outside any allocation and is caught
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 step memcheck 55 compute-sanitizer --tool memcheck --error-exitcode 99 \
    "$PYTHON" -m pytest -q -x -p no:cacheprovider tests/test_loss_curvature_ops.py tests/test_contraction_ops.py \
    tests/test_mc_sampling.py -k "cuda and not frequencies"
  case $? in
    0) say "    memcheck: no errors" ;;
    99) say "    memcheck: ERRORS found ($(grep -c 'Invalid' "$WORK/memcheck.log") invalid accesses)" ;;
    124|137) say "    memcheck: timed out (no verdict)" ;;
    *) say "    memcheck: the tests themselves failed under the sanitizer" ;;
  esac
else
  say "=== memcheck: compute-sanitizer not found"
fi

if [ "$DRY" = 1 ]; then
  KERNEL_BATCH=4; ENGINE_ARGS=(--batch 4 --only MLP); GRAPH_ARGS=(--batch 2 --only "as a class")
else
  KERNEL_BATCH=256; ENGINE_ARGS=(--batch 256 --batch 1024); GRAPH_ARGS=(--batch 128 --only ResNet-18)
fi
TAIL=14 step kernel-benchmarks 40 "$PYTHON" benchmarks/bench_kernels.py --device "$DEVICE" --batch "$KERNEL_BATCH" --out "$WORK"
# the generic method only when it projects under 2 s: it is timed 7 times (a guarded run, 3 per round)
TAIL=12 step engine-benchmarks 60 "$PYTHON" benchmarks/bench_backprop.py --device "$DEVICE" --in-process \
  --generic-limit 2 --rounds 2 --out "$WORK" "${ENGINE_ARGS[@]}"
# ResNet-18 (torchvision's definition, CIFAR size, eval) at batch 128: gradient, engine, BackPACK DiagGGNExact
TAIL=6 step graph-benchmarks 55 "$PYTHON" benchmarks/bench_graph.py --device "$DEVICE" --rounds 1 --generic-limit 5 \
  --out "$WORK" "${GRAPH_ARGS[@]}"
# timm's ViT and Hugging Face BERT: auto without a warning, its time against a gradient, float64 exactness
if [ "$DRY" = 1 ]; then ZOO_ARGS=(--only BERT); else ZOO_ARGS=(); fi
TAIL=6 step zoo-models 50 "$PYTHON" benchmarks/gpu_zoo.py --device "$DEVICE" --out "$WORK" "${ZOO_ARGS[@]}"
# the optimizer example (SophiaDiagonal vs Adam, CNN and transformer); its JSON and PNG go into the tar file
if [ "$DRY" = 1 ]; then EXAMPLE_ARGS=(--steps 4 --train-samples 64 --test-samples 16); else EXAMPLE_ARGS=(); fi
TAIL=5 step sophia-example 35 "$PYTHON" examples/sophia_training.py --device "$DEVICE" --out "$WORK/examples" \
  "${EXAMPLE_ARGS[@]}"
finish 0
