"""The generic exact method's core: the Hessian diagonal of a scalar built by a callable, by batched
double backward (batched_hvp.py), with the checks and contexts every caller needs."""

from contextlib import contextmanager
from typing import List, Optional

import torch

from .._forward_pass import attention_twice_differentiable, library_forward
from .._gradient_hooks import tensor_hooks_off
from ..losses import check_scalar_loss
from . import _validation as validation
from ._batched_hvp import batched_hessian_diagonal, saved_tensor_bytes


def check_strict_requires_grad(params):
    for index, param in enumerate(params):
        if not param.requires_grad:
            raise RuntimeError(
                f"params[{index}] (shape {tuple(param.shape)}) does not require grad; "
                "pass strict=False to get zeros for it"
            )


def generic_hessian_diagonal(
    func, params, v, create_graph, strict, source, *, method, chunk_size, memory_budget, progress
):
    validation.check_flag(create_graph, "create_graph")
    validation.check_flag(strict, "strict")
    validation.check_method(method, for_model=source == "loss_fn")
    validation.check_chunking(chunk_size, memory_budget)
    validation.check_progress(progress)
    params = validation.check_params(params)
    v = validation.check_v(v, params)
    if strict:
        check_strict_requires_grad(params)

    with (
        torch.enable_grad(),
        inference_tensors_explained(source),
        attention_twice_differentiable(),
        tensor_hooks_off(params),
    ):  # a hook on a parameter changes its gradient, not the function
        with library_forward():
            loss = func()
        check_scalar_loss(loss, source)
        loss = loss.reshape(())
        grads = first_order_grads(loss, params)
        if strict:
            for index, grad in enumerate(grads):
                if grad is None:
                    raise RuntimeError(
                        f"the loss does not depend on params[{index}] (shape {tuple(params[index].shape)}); "
                        "pass strict=False to get zeros for it"
                    )
        diagonals = batched_hessian_diagonal(
            loss,
            params,
            grads,
            create_graph=create_graph,
            chunk_size=chunk_size,
            graph_bytes=saved_tensor_bytes(loss),
            memory_budget=memory_budget,
            progress=progress,
        )
    check_nan_where_gradient_finite(diagonals, grads, source)
    if v is not None:
        diagonals = [vec * diag for vec, diag in zip(v, diagonals)]
    if not create_graph:
        diagonals = [diag.detach() for diag in diagonals]
    return diagonals


def check_nan_where_gradient_finite(diagonals, grads, source):
    """A batched double backward multiplies the zeros of its unit vectors by whatever the graph holds: an inf in
    the forward (an input holding inf) makes NaN at entries whose gradient, and exact diagonal, are finite.
    Never returned as numbers: an error says where."""
    for index, (diagonal, grad) in enumerate(zip(diagonals, grads)):
        if grad is None or not diagonal.is_floating_point() or not torch.isnan(diagonal).any():
            continue
        bad = int((torch.isnan(diagonal.detach()) & torch.isfinite(grad.detach())).sum())
        if bad:
            name = f"params[{index}]" if source == "func" else f"parameter {index} of model.parameters()"
            raise FloatingPointError(
                f"the generic method's double backward gave NaN at {bad} entries of {name} (shape "
                f"{tuple(diagonal.shape)}) where the gradient is finite: non-finite values in the forward (an inf "
                "in the inputs?) meet the zeros of its unit vectors there; method='backprop' keeps PyTorch's "
                "pattern where the engine supports the model"
            )


def first_order_grads(loss, params):
    """Gradients with a graph (for the second derivative); None where the loss does not depend on a parameter."""
    grads: List[Optional[torch.Tensor]] = [None] * len(params)
    active = [index for index, param in enumerate(params) if param.requires_grad]
    if loss.requires_grad and active:
        found = torch.autograd.grad(loss, [params[i] for i in active], create_graph=True, allow_unused=True)
        for index, grad in zip(active, found):
            grads[index] = grad
    return grads


def normal_inputs(inputs):
    """normal_tensor on every tensor of a (nested) input structure."""
    return torch.utils._pytree.tree_map(lambda v: normal_tensor(v) if isinstance(v, torch.Tensor) else v, inputs)


def normal_tensor(tensor):
    return tensor.clone() if tensor.is_inference() else tensor


@contextmanager
def inference_tensors_explained(source):
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
def buffers_restored(model):
    """Puts buffers (BatchNorm running stats, counters) back as they were: computing a Hessian must not train."""
    saved = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, copy in saved:
                buffer.copy_(copy)
