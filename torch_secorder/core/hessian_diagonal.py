"""Public API: exact Hessian diagonals of a scalar loss with respect to parameters."""

from typing import Callable, List, Optional

import torch
from torch import Tensor
from torch.nn import Module

from .._forward_pass import library_call
from ..losses import CurvatureRequest
from ..memory import block_cache_scope
from . import _validation as validation
from ._batched_hvp import DEFAULT_MEMORY_BUDGET
from ._generic import generic_hessian_diagonal
from ._model_curvature import model_diagonal

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
    # inference_mode switches autograd off: run outside it; library_call: no trace runs meanwhile
    with torch.inference_mode(False), block_cache_scope(), library_call():
        return generic_hessian_diagonal(
            func,
            params,
            v,
            create_graph,
            strict,
            "func",
            method=method,
            chunk_size=chunk_size,
            memory_budget=memory_budget,
            progress=progress,
        )


def model_hessian_diagonal(
    model: Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,  # the documented signature (spec); tuples and dicts are taken too (see ModelInputs)
    targets: Tensor,
    create_graph: bool = False,
    strict: bool = False,
    *,
    method: str = "auto",
    chunk_size: Optional[int] = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: Optional[Callable[[int, int], None]] = None,
    per_sample: bool = False,
    return_loss: bool = False,
    flat: bool = False,
    all_reduce: bool = False,
    backward: bool = False,
) -> List[Tensor]:
    """Hessian diagonal of loss_fn(model(inputs), targets) for every tensor in model.parameters().

    loss_fn may be an nn.Module loss (nn.CrossEntropyLoss()) or a function
    (F.mse_loss). inputs may be a tensor or a tuple of positional model
    arguments. The model keeps its train/eval mode, and its buffers (such as
    BatchNorm running statistics) are restored after the forward pass.
    inputs may also be a dict (model(**inputs) is called: Hugging Face-style batches) or positional
    arguments that are nested tuples / lists / dicts of tensors.
    per_sample: one diagonal per sample, (N, *param.shape) each: the Hessian of sample n's term of the
    loss (with the loss's reduction scaling, so they sum to the batch's diagonal).
    return_loss: returns (loss, diagonals), the loss as computed on the way (detached).
    flat: one vector over the parameters that require grad, in model.parameters() order (per sample:
    (N, that many)) instead of one tensor per parameter.
    all_reduce: data parallel (torch.distributed initialised, each rank its shard of the batch): every rank
    gets the diagonal of the global batch's loss, 'mean' and 'sum' respected.
    backward: one call for a curvature step: also accumulates the gradient of the same loss into each
    parameter's .grad, as loss.backward() would (from the engine's own forward pass; the global batch's with
    all_reduce), and returns (loss, diagonals).
    Other arguments are those of hessian_diagonal.
    """
    validation.check_flag(per_sample, "per_sample")
    return model_diagonal(
        "model_hessian_diagonal",
        model,
        loss_fn,
        inputs,
        targets,
        CurvatureRequest("hessian", per_sample=per_sample),
        create_graph=create_graph,
        strict=strict,
        method=method,
        chunk_size=chunk_size,
        memory_budget=memory_budget,
        progress=progress,
        return_loss=return_loss,
        flat=flat,
        all_reduce=all_reduce,
        backward=backward,
    )
