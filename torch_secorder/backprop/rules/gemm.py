"""The engine's 2-D matrix products: torch.mm, or oneDNN on request (TORCH_SECORDER_CPU_GEMM=onednn).

torch.mm on the CPU calls MKL, which takes its AVX2 code path on CPUs that are not Intel's: on the
2-core AMD Zen 5 machine of benchmarks/results it ran float32 GEMMs at 218 GFLOP/s (2048^3) where
oneDNN, also inside torch, ran 476; on the engine's shapes (640 x 256 x 256) 387 -> 180 us. Same
float32 arithmetic, another summation order. It is not the default: oneDNN's first use in a process
costs 5-7 MiB for good (its JIT kernels), which on small models is more than a call's own memory
(measured: the sigmoid MLP's Monte-Carlo Fisher then peaked above BackPACK's), and the speed-up is
MKL's AVX2 path on AMD CPUs only (Intel CPUs not measured). Where it is asked for, it serves float32
CPU products of at least MIN_MULTIPLY_ADDS that autograd need not differentiate, while
torch.backends.mkldnn.enabled; everything else is torch.mm. The setting is read once, at the first
product.
"""

import os

import torch

MIN_MULTIPLY_ADDS = 1 << 20  # below this the oneDNN call's fixed cost (~15 us) outweighs its speed

_onednn = None  # read at the first product: whether float32 CPU products go through oneDNN


def mm(a, b):
    """a (M, K) @ b (K, N)."""
    if (
        a.device.type == "cpu"
        and a.dtype == torch.float32
        and b.dtype == torch.float32
        and a.shape[0] * a.shape[1] * b.shape[1] >= MIN_MULTIPLY_ADDS
        and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))
        and _use_onednn()
        and torch.backends.mkldnn.enabled
    ):
        # the op computes a @ weight^T (weight (N, K)), for any strides; it has no autograd formula
        return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")
    return a @ b


def _use_onednn():
    global _onednn
    if _onednn is None:
        _onednn = _decide(os.environ.get("TORCH_SECORDER_CPU_GEMM", ""))
    return _onednn


def _decide(setting):
    if setting not in ("", "onednn", "torch"):
        raise ValueError(f"TORCH_SECORDER_CPU_GEMM must be 'onednn' or 'torch', got {setting!r}")
    return (
        setting == "onednn" and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )
