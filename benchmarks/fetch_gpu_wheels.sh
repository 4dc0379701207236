#!/usr/bin/env bash
# Downloads BackPACK and its pure-Python dependencies as wheels into .gpu_wheels/ (ignored by git),
# for the GPU machine, which has no network: name .gpu_wheels in the device call's `carry`.
# torchvision, which BackPACK lists, is not needed by DiagHessian and is left out on purpose.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu_wheels
python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu_wheels \
  backpack-for-pytorch==1.7.1 einops==0.8.2 unfoldNd==0.2.3 einconv==0.1.0
ls -l .gpu_wheels
