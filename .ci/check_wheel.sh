#!/usr/bin/env bash
# `pip wheel` must give a wheel that installs and imports in a clean venv holding only torch.
# usage: .ci/check_wheel.sh BUILD_PYTHON [TORCH_SPEC]
set -euo pipefail
BUILD_PYTHON=$1
TORCH_SPEC=${2:-torch==2.13.0}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$BUILD_PYTHON" -m pip wheel -q --no-build-isolation --no-deps -w "$work/dist" .
ls "$work"/dist
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q "$TORCH_SPEC"
"$work/venv/bin/pip" install -q "$work"/dist/torch_secorder-*.whl
cd "$work"  # away from the source tree: import the installed package
"$work/venv/bin/python" - <<'PY'
import torch
import torch_secorder
from torch_secorder import _extension, ops, reference_ops
info = _extension.info()
assert info["source"] == "prebuilt", info
x, t = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0])
assert torch.allclose(ops.cross_entropy_hessian_diag(x, t), reference_ops.cross_entropy_hessian_diag(x, t), rtol=1e-12)
w = torch.tensor([1.0, 2.0], requires_grad=True)
assert torch.equal(torch_secorder.hessian_diagonal(lambda: (w ** 3).sum(), [w])[0], torch.tensor([6.0, 12.0]))
print("wheel OK:", torch_secorder.__file__, info)
PY
