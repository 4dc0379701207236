#!/usr/bin/env bash
# Downloads BackPACK and its pure-Python dependencies as wheels into .gpu_wheels/ (ignored by git),
# for the GPU machine, which has no network: name .gpu_wheels in the device call's `carry`.
# torchvision, which BackPACK lists, is not needed by DiagHessian and is left out on purpose (timm and
# transformers run without it).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu_wheels
python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu_wheels \
  backpack-for-pytorch==1.7.1 einops==0.8.2 unfoldNd==0.2.3 einconv==0.1.0
ls -l .gpu_wheels
# timm and transformers with their dependencies, for the GPU machine's Python (3.12) and platform, into zoo/
mkdir -p .gpu_wheels/zoo
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .gpu_wheels/zoo \
  timm==1.0.31 huggingface_hub==2.4.0 safetensors pyyaml transformers==5.25.0 tokenizers==0.23.3 regex httpx2 \
  httpcore2 truststore anyio h11 idna tqdm packaging numpy
ls -l .gpu_wheels/zoo
