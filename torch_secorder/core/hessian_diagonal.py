"""Public API: exact Hessian diagonals of a scalar loss with respect to parameters."""

import time
import warnings
from contextlib import contextmanager
from typing import Callable, List, Optional

import torch
from torch import Tensor
from torch.nn import Module

from ..backprop import Unsupported, backprop_hessian_diagonal
from . import dispatch, validation
from .batched_hvp import DEFAULT_MEMORY_BUDGET, batched_hessian_diagonal, saved_tensor_bytes

__all__ = ["hessian_diagonal", "model_hessian_diagonal"]


def hessian_diagonal(
    func: Callable[[], Tensor],
    params: List[Tensor],
    v: Optional[List[Tensor]] = None,
    create_graph: bool = False,
    strict: bool = False,
    *,
    method: str = "auto",
    chunk_size: Optional[int] = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: Optional[Callable[[int, int], None]] = None,
) -> List[Tensor]:
    """Compute the diagonal elements of the Hessian matrix.

    This function computes the diagonal elements of the Hessian matrix by using
    double backward for each parameter element (batched: many entries per
    double backward).

    Args:
        func: A callable that returns a scalar tensor (the loss).
        params: List of parameters with respect to which the Hessian is computed.
        v: Optional list of vectors to use for computing the diagonal. If None,
            computes the true diagonal. If provided, computes v_i * H_ii for each i.
        create_graph: If True, the computational graph will be constructed,
            allowing for higher-order derivatives.
        strict: If True, an error will be raised if any parameter does not
            require grad or the loss does not depend on it; if False such
            parameters get zeros.
        method: "auto" or "autograd" (the exact batched Hessian-vector-product
            method, valid for any twice-differentiable function).
        chunk_size: unit vectors per batched double backward; None chooses it
            from memory_budget.
        memory_budget: bytes one chunk's temporaries may take (default 1 GiB).
        progress: optional callback progress(done_entries, total_entries).

    Returns:
        List of tensors containing the diagonal elements of the Hessian for each
        parameter, each with the shape, dtype and device of its parameter.
    """
    if not callable(func):
        raise TypeError(f"func must be a callable returning the loss, got {type(func).__name__}")
    with torch.inference_mode(False):  # inference_mode switches autograd off: the call runs outside it
        return _hessian_diagonal(
            func, params, v, create_graph, strict, "func",
            method=method, chunk_size=chunk_size, memory_budget=memory_budget, progress=progress,
        )


def model_hessian_diagonal(
    model: Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    create_graph: bool = False,
    strict: bool = False,
    *,
    method: str = "auto",
    chunk_size: Optional[int] = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: Optional[Callable[[int, int], None]] = None,
) -> List[Tensor]:
    """Hessian diagonal of loss_fn(model(inputs), targets) for every tensor in model.parameters().

    loss_fn may be an nn.Module loss (nn.CrossEntropyLoss()) or a function
    (F.mse_loss). inputs may be a tensor or a tuple of positional model
    arguments. The model keeps its train/eval mode, and its buffers (such as
    BatchNorm running statistics) are restored after the forward pass.
    Other arguments are those of hessian_diagonal.
    """
    input_tuple = validation.check_model_arguments(model, loss_fn, inputs, targets)
    validation.check_method(method)
    validation.check_chunking(chunk_size, memory_budget)
    validation.check_progress(progress)
    validation.check_not_inference_tensors(model)
    with torch.inference_mode(False):  # inference_mode switches autograd off: the call runs outside it
        # data made under inference_mode may feed autograd once copied outside it (a cheap clone)
        input_tuple = tuple(_normal_tensor(tensor) for tensor in input_tuple)
        return _model_hessian_diagonal(model, loss_fn, input_tuple, _normal_tensor(targets), create_graph, strict,
                                       method, chunk_size, memory_budget, progress)


def _model_hessian_diagonal(model, loss_fn, input_tuple, targets, create_graph, strict, method, chunk_size,
                            memory_budget, progress):
    params = list(model.parameters())
    if method != "autograd":
        chain, reason = dispatch.backprop_plan(model, loss_fn, input_tuple)
        if reason is None:
            try:
                return _backprop(chain, model, loss_fn, input_tuple[0], targets, params, create_graph, strict,
                                 memory_budget, progress)
            except Unsupported as error:  # what only the forward pass shows (shapes); nothing was computed yet
                reason = str(error)
        reason = f"Hessian backpropagation does not support {reason}"
        if method == "backprop":
            raise NotImplementedError(f"method='backprop': {reason}; use method='auto' or 'autograd'")
        warnings.warn(f"torch_secorder: {reason}; using the generic autograd method (exact, slower)"
                      f"{_projection(model, loss_fn, input_tuple, targets, params)}", RuntimeWarning, stacklevel=3)

    def loss_func():
        return loss_fn(model(*input_tuple), targets)

    with _buffers_restored(model):
        return _hessian_diagonal(
            loss_func, params, None, create_graph, strict, "loss_fn",
            method="autograd", chunk_size=chunk_size, memory_budget=memory_budget, progress=progress,
        )


PROJECTION_THRESHOLD = 1000  # Hessian-vector products (each about a gradient) beyond which the fallback says how long


def _projection(model, loss_fn, input_tuple, targets, params):
    """'; projected ...' for the fallback warning when the generic method will take more than about 1,000
    gradients: one gradient is timed (a small price next to what follows), else ''."""
    entries = sum(p.numel() for p in params if p.requires_grad)
    if entries <= PROJECTION_THRESHOLD:
        return ""
    active = [p for p in params if p.requires_grad]
    try:
        with _buffers_restored(model), torch.enable_grad():
            for _ in range(2):  # the second one warm
                start = time.perf_counter()
                loss = loss_fn(model(*input_tuple), targets)
                if loss.requires_grad:
                    torch.autograd.grad(loss, active, allow_unused=True)
                if loss.is_cuda:
                    torch.cuda.synchronize(loss.device)
                seconds = time.perf_counter() - start
    except Exception:  # noqa: BLE001  (the method itself reports what is wrong)
        return ""
    # measured on CPU: a batched Hessian-vector product cost 0.1 to 2 gradients (less on small models)
    return (f"; projected roughly {_duration(entries * seconds)}: {entries} Hessian-vector products (one per "
            f"parameter entry), each 0.1 to 2 times a gradient ({seconds * 1e3:.1f} ms here)")


def _duration(seconds):
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def _check_strict_requires_grad(params):
    for index, param in enumerate(params):
        if not param.requires_grad:
            raise RuntimeError(
                f"params[{index}] (shape {tuple(param.shape)}) does not require grad; "
                "pass strict=False to get zeros for it"
            )


def _backprop(chain, model, loss_fn, inputs, targets, params, create_graph, strict, memory_budget, progress):
    if strict:
        _check_strict_requires_grad(params)
    with _buffers_restored(model):
        diagonals = backprop_hessian_diagonal(chain, loss_fn, inputs, targets, params,
                                              create_graph=create_graph, memory_budget=memory_budget)
    if progress is not None:
        total = sum(p.numel() for p in params)
        progress(total, total)
    return diagonals


def _hessian_diagonal(func, params, v, create_graph, strict, source, *, method, chunk_size, memory_budget, progress):
    validation.check_method(method, for_model=source == "loss_fn")
    validation.check_chunking(chunk_size, memory_budget)
    validation.check_progress(progress)
    params = validation.check_params(params)
    v = validation.check_v(v, params)
    if strict:
        _check_strict_requires_grad(params)

    with torch.enable_grad(), _inference_tensors_explained(source), _attention_twice_differentiable():
        loss = func()
        validation.check_scalar_loss(loss, source)
        loss = loss.reshape(())
        grads = _first_order_grads(loss, params)
        if strict:
            for index, grad in enumerate(grads):
                if grad is None:
                    raise RuntimeError(
                        f"the loss does not depend on params[{index}] (shape {tuple(params[index].shape)}); "
                        "pass strict=False to get zeros for it"
                    )
        diagonals = batched_hessian_diagonal(
            loss, params, grads,
            create_graph=create_graph, chunk_size=chunk_size,
            graph_bytes=saved_tensor_bytes(loss), memory_budget=memory_budget, progress=progress,
        )
    if v is not None:
        diagonals = [vec * diag for vec, diag in zip(v, diagonals)]
    if not create_graph:
        diagonals = [diag.detach() for diag in diagonals]
    return diagonals


def _first_order_grads(loss, params):
    """Gradients with a graph (for the second derivative); None where the loss does not depend on a parameter."""
    grads = [None] * len(params)
    active = [index for index, param in enumerate(params) if param.requires_grad]
    if loss.requires_grad and active:
        found = torch.autograd.grad(loss, [params[i] for i in active], create_graph=True, allow_unused=True)
        for index, grad in zip(active, found):
            grads[index] = grad
    return grads


def _attention_twice_differentiable():
    """scaled_dot_product_attention's fused kernels (flash, memory-efficient) have no double backward: the
    generic method records the forward with the math backend, which has (same numbers up to rounding)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def _normal_tensor(tensor):
    return tensor.clone() if tensor.is_inference() else tensor


@contextmanager
def _inference_tensors_explained(source):
    """A loss built from tensors made under torch.inference_mode cannot be differentiated: say so plainly."""
    try:
        yield
    except RuntimeError as error:
        if "Inference tensor" not in str(error):
            raise
        raise RuntimeError(
            f"{source} uses a tensor created under torch.inference_mode(), which autograd cannot differentiate "
            "through (torch.inference_mode disables autograd): create it outside inference_mode, or .clone() it "
            "outside"
        ) from error


@contextmanager
def _buffers_restored(model):
    """Puts buffers (BatchNorm running stats, counters) back as they were: computing a Hessian must not train."""
    saved = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, copy in saved:
                buffer.copy_(copy)
