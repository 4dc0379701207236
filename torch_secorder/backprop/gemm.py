"""The engine's 2-D matrix products, on AMD CPUs through oneDNN.

torch.mm on the CPU calls MKL, which takes its AVX2 code path on CPUs that are not Intel's: on the
2-core AMD Zen 5 machine of benchmarks/results it ran float32 GEMMs at 218 GFLOP/s (2048^3) where
oneDNN, also inside torch, ran 476; on the engine's shapes (640 x 256 x 256: 387 -> 180 us) about
twice as fast too. Same float32 arithmetic, another summation order. Everywhere else (Intel CPUs,
float64, CUDA, small products, anything autograd must differentiate, torch.backends.mkldnn.enabled
switched off) it is torch.mm.

TORCH_SECORDER_CPU_GEMM=onednn or =torch in the environment forces one or the other for float32 CPU
products (read once, at the first product).
"""

import os

import torch

MIN_MULTIPLY_ADDS = 1 << 20  # below this the oneDNN call's fixed cost (~15 us) outweighs its speed

_onednn = None  # decided at the first product: whether float32 CPU products go through oneDNN


def mm(a, b):
    """a (M, K) @ b (K, N)."""
    if (a.device.type == "cpu" and a.dtype == torch.float32 and b.dtype == torch.float32
            and a.shape[0] * a.shape[1] * b.shape[1] >= MIN_MULTIPLY_ADDS
            and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))
            and _use_onednn() and torch.backends.mkldnn.enabled):
        # the op computes a @ weight^T (weight (N, K)), for any strides; it has no autograd formula
        return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")
    return a @ b


def _use_onednn():
    global _onednn
    if _onednn is None:
        _onednn = _decide(os.environ.get("TORCH_SECORDER_CPU_GEMM", ""))
    return _onednn


def _decide(setting):
    available = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    if setting not in ("", "onednn", "torch"):
        raise ValueError(f"TORCH_SECORDER_CPU_GEMM must be 'onednn' or 'torch', got {setting!r}")
    if setting:
        return setting == "onednn" and available
    return available and torch.backends.mkl.is_available() and cpu_vendor() == "AuthenticAMD"


def cpu_vendor():
    """The CPU's vendor string (GenuineIntel, AuthenticAMD, ...) where Linux says it, else ''."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""
