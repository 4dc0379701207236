"""Python face of the compiled ops (torch.ops.torch_secorder.*).

Each function runs the compiled kernel when it is loaded and no graph is
needed; the kernels are not differentiable, so inputs that require grad (with
grad mode on) go to the pure-torch reference in reference_ops, as does
everything when no compiled module could be loaded.

Loss Hessians are per sample and with respect to the model output:
``*_diag`` has the shape of ``input``; ``*_sqrt`` is a factor S of shape
(N, K, K), K = input[0].numel(), with S[n] @ S[n].T the Hessian of sample n
(already scaled by the reduction, so the batch Hessian is their block sum).
"""

import contextlib
import threading
import warnings

import torch

from . import _extension, reference_ops

_local = threading.local()


def compiled_ops_loaded():
    """True when the C++/CUDA kernels are in use (see torch_secorder._extension)."""
    return _extension.load()


@contextlib.contextmanager
def references_only():
    """Within this block every op runs its pure-torch reference (for comparisons and benchmarks)."""
    previous = getattr(_local, "references_only", False)
    _local.references_only = True
    try:
        yield
    finally:
        _local.references_only = previous


# The backend kernel each op relies on; ops missing here are plain ATen compositions that run anywhere.
_BACKEND_KERNEL = {
    "softmax_hessian_diag": "softmax_hessian_diag",
    "softmax_hessian_sqrt": "softmax_hessian_sqrt",
    "softmax_hessian_columns": "softmax_hessian_columns",
    "softmax_sampled_columns": "softmax_sampled_columns",
    "sigmoid_hessian_diag": "sigmoid_hessian_diag",
    "cross_entropy_hessian_diag": "softmax_hessian_diag",
    "cross_entropy_hessian_sqrt": "softmax_hessian_sqrt",
    "bce_with_logits_hessian_diag": "sigmoid_hessian_diag",
    "bce_with_logits_hessian_sqrt": "sigmoid_hessian_diag",
    "factor_diagonal": "factor_diagonal",
    "affine_weight_diagonal": "affine_weight_diagonal",
    "selected_weight_diagonal": "selected_weight_diagonal",
    "channel_weight_diagonal": "channel_weight_diagonal",
}
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
_kernel_cache: dict = {}  # (op, device type) -> bool
_warned_devices: set = set()


def has_kernel(name, device_type):
    """True when the loaded build has a kernel for op `name` on this device type. Decided per device: a
    CPU-only build (or JIT build) on a machine with a GPU has no CUDA kernels, and CUDA tensors then
    use the references, with one warning per device type."""
    key = (name, device_type)
    if key not in _kernel_cache:
        backend = _BACKEND_KERNEL.get(name)
        dispatch_key = _DISPATCH_KEYS.get(device_type)
        if not _extension.load():
            return False  # no compiled ops at all: the one warning about that came from the loader
        if backend is None:
            available = True
        elif dispatch_key is None:
            available = False
        else:
            available = torch._C._dispatch_has_kernel_for_dispatch_key(f"torch_secorder::{backend}", dispatch_key)
        _kernel_cache[key] = available
        if not available and device_type not in _warned_devices and device_type != "meta":
            _warned_devices.add(device_type)
            warnings.warn(
                f"torch_secorder: the compiled ops have no {device_type} kernels in this build "
                f"({_extension.info()['source']}); {device_type} tensors use the pure-torch references "
                "(slower, same results)",
                RuntimeWarning,
                stacklevel=4,
            )
    return _kernel_cache[key]


def _compiled(name):
    return getattr(torch.ops.torch_secorder, name)


def _run(name, *args):
    tensors = [arg for arg in args if isinstance(arg, torch.Tensor)]
    needs_graph = torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors)
    # the kernels cover float32 and float64; half precision and friends use the references
    kernel_dtypes = all(
        tensor.dtype in (torch.float32, torch.float64) for tensor in tensors if tensor.is_floating_point()
    )
    if (
        not needs_graph
        and kernel_dtypes
        and not getattr(_local, "references_only", False)
        and _extension.load()
        and has_kernel(name, tensors[0].device.type)
    ):
        return _compiled(name)(*args)
    return getattr(reference_ops, name)(*args)


def _check_reduction(reduction):
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def softmax_hessian_diag(logits, scale):
    """Diagonal of scale[n] * (diag(p) - p p^T), p = softmax(logits[n]); logits (N, C), scale (N,)."""
    return _run("softmax_hessian_diag", logits, scale)


def softmax_hessian_sqrt(logits, scale):
    """Factor S (N, C, C) with S[n] S[n]^T = scale[n] * (diag(p) - p p^T)."""
    return _run("softmax_hessian_sqrt", logits, scale)


def softmax_hessian_columns(logits, scale):
    """The Hessian's rank in columns: (N, C - 1, C) whose outer products sum to scale[n] * (diag(p) - p p^T);
    one column fewer to pull through a model than softmax_hessian_sqrt. scale >= 0."""
    return _run("softmax_hessian_columns", logits, scale)


def softmax_sampled_columns(logits, scale, uniforms):
    """Monte-Carlo columns of scale[n] * (diag(p) - p p^T): per draw m the class y that uniforms[n, m] picks from
    softmax(logits[n]) by inverse CDF, and the column sqrt(scale[n] / M) (p - e_y). logits (N, C), scale (N,) >= 0,
    uniforms (N, M) in [0, 1) -> (N, M, C); the columns' outer products average to the Hessian over draws."""
    return _run("softmax_sampled_columns", logits, scale, uniforms)


def sigmoid_hessian_diag(logits, scale):
    """scale * sigmoid(logits) * (1 - sigmoid(logits)); scale has the shape of logits."""
    return _run("sigmoid_hessian_diag", logits, scale)


def mse_loss_hessian_diag(input, reduction="mean"):
    """Hessian diagonal of F.mse_loss(input, target, reduction=...) in input."""
    _check_reduction(reduction)
    return _run("mse_loss_hessian_diag", input, reduction)


def mse_loss_hessian_sqrt(input, reduction="mean"):
    _check_reduction(reduction)
    return _run("mse_loss_hessian_sqrt", input, reduction)


def cross_entropy_sample_scale(input, target, weight=None, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
    """Per-sample factor s (N,) of F.cross_entropy: Hessian_n = s[n] * (diag(p_n) - p_n p_n^T), reduction
    included; negative where class weights or target probabilities are."""
    _check_reduction(reduction)
    return _run("cross_entropy_sample_scale", input, target, weight, ignore_index, float(label_smoothing), reduction)


def cross_entropy_hessian_diag(input, target, weight=None, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
    """Per-sample Hessian diagonal of F.cross_entropy in the logits (N, C).

    target holds class indices (N,) or class probabilities (N, C).
    """
    _check_reduction(reduction)
    return _run("cross_entropy_hessian_diag", input, target, weight, ignore_index, float(label_smoothing), reduction)


def cross_entropy_hessian_sqrt(input, target, weight=None, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
    _check_reduction(reduction)
    return _run("cross_entropy_hessian_sqrt", input, target, weight, ignore_index, float(label_smoothing), reduction)


def bce_with_logits_hessian_diag(input, target, weight=None, pos_weight=None, reduction="mean"):
    """Hessian diagonal of F.binary_cross_entropy_with_logits in input (any shape (N, *))."""
    _check_reduction(reduction)
    return _run("bce_with_logits_hessian_diag", input, target, weight, pos_weight, reduction)


def bce_with_logits_hessian_sqrt(input, target, weight=None, pos_weight=None, reduction="mean"):
    _check_reduction(reduction)
    return _run("bce_with_logits_hessian_sqrt", input, target, weight, pos_weight, reduction)


def factor_diagonal(factors, signs=None):
    """Diagonal of S^T diag(signs) S per sample: factors (N, V, D), signs (N, V) or None -> (N, D)."""
    return _run("factor_diagonal", factors, signs)


def affine_weight_diagonal(factors, signs, inputs):
    """Weight diagonal of a shared-weight affine map (Conv, Linear over positions) from curvature factors:
    sum_n sum_v signs[n, v] (factors[n, v] @ inputs[n]^T)^2 with factors (N, V, O, P), inputs (N, K, P) -> (O, K)."""
    return _run("affine_weight_diagonal", factors, signs, inputs)


def selected_weight_diagonal(factors, signs, indices, inputs, per_sample=False):
    """affine_weight_diagonal for factors on max-pooling selections: output channel o of sample n
    uses only positions indices[n, o]; factors (N, V, O, Q), indices (N, O, Q), inputs (N, K, P) -> (O, K),
    or (N, O, K) without the sum over samples when per_sample."""
    return _run("selected_weight_diagonal", factors, signs, indices, inputs, per_sample)


def channel_weight_diagonal(factors, signs, values):
    """Diagonal of a per-channel scale (BatchNorm's, LayerNorm's weight) from curvature factors:
    sum_n sum_v signs[n, v] (sum_p factors[n, v, c, p] values[n, c, p])^2, factors (N, V, C, P),
    values (N, C, P) -> (C,). Any strides."""
    return _run("channel_weight_diagonal", factors, signs, values)
