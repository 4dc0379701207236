"""Loads the CMake-built libtorch_secorder.so (no Python module involved) and checks its ops against the references."""

import sys

import torch

from torch_secorder import reference_ops

torch.ops.load_library(sys.argv[1])
x = torch.randn(9, 6, dtype=torch.float64)
t = torch.randint(0, 6, (9,))
compiled = torch.ops.torch_secorder.cross_entropy_hessian_sqrt(x, t, None, -100, 0.1, "mean")
error = (compiled - reference_ops.cross_entropy_hessian_sqrt(x, t, label_smoothing=0.1)).abs().max().item()
threads = torch.ops.torch_secorder.parallel_threads_used(16)
assert error < 1e-14, error
assert threads == min(torch.get_num_threads(), 16), threads
print(f"CMake library OK: max error {error:.1e}, {threads} threads")
