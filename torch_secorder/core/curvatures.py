"""The Hessian's neighbours: exact GGN diagonals and Fisher diagonals (Monte-Carlo or empirical), summed or per
sample, through the same dispatch as model_hessian_diagonal (the engine where it supports the model)."""

from typing import Callable, List, Optional

import torch
from torch import Tensor
from torch.nn import Module

from ..losses import CurvatureRequest
from . import _validation as validation
from ._batched_hvp import DEFAULT_MEMORY_BUDGET
from ._model_curvature import model_diagonal
from ._validation import ModelInputs

__all__ = ["model_ggn_diagonal", "model_fisher_diagonal"]

FISHER_KINDS = ("mc", "empirical")


def model_ggn_diagonal(
    model: Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: ModelInputs,
    targets: Tensor,
    create_graph: bool = False,
    strict: bool = False,
    *,
    per_sample: bool = False,
    method: str = "auto",
    chunk_size: Optional[int] = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: Optional[Callable[[int, int], None]] = None,
    return_loss: bool = False,
    flat: bool = False,
    all_reduce: bool = False,
    backward: bool = False,
) -> List[Tensor]:
    """Exact diagonal of the generalised Gauss-Newton matrix sum_n J_n^T H_n J_n of loss_fn(model(inputs),
    targets), J_n the Jacobian of sample n's output in the parameters and H_n the loss's Hessian in that
    output: the Hessian without the second derivatives of the model, positive semi-definite for MSE,
    cross-entropy, BCE-with-logits and NLL (with non-negative weights), which are the losses it supports.

    NLL after a final LogSoftmax is split at the logits (the same GGN as cross-entropy on the logits; NLL
    itself is linear in the log-probabilities). Arguments and return shapes are those of
    model_hessian_diagonal (per_sample, return_loss, flat, all_reduce, backward, dict inputs included).
    """
    validation.check_flag(per_sample, "per_sample")
    return model_diagonal(
        "model_ggn_diagonal",
        model,
        loss_fn,
        inputs,
        targets,
        CurvatureRequest("ggn", per_sample=per_sample),
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


def model_fisher_diagonal(
    model: Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: ModelInputs,
    targets: Tensor,
    kind: str = "mc",
    *,
    mc_samples: int = 1,
    generator: Optional[torch.Generator] = None,
    per_sample: bool = False,
    strict: bool = False,
    method: str = "auto",
    chunk_size: Optional[int] = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: Optional[Callable[[int, int], None]] = None,
    return_loss: bool = False,
    flat: bool = False,
    all_reduce: bool = False,
    backward: bool = False,
) -> List[Tensor]:
    """Diagonal of a Fisher information matrix of loss_fn(model(inputs), targets).

    kind="mc": the Monte-Carlo Fisher: for each sample, mc_samples labels drawn from the model's own
    likelihood (softmax of the logits for cross-entropy/NLL, Bernoulli(sigmoid) for BCE-with-logits, a
    unit Gaussian around the output for MSE), their loss gradients' squares averaged. An unbiased estimate
    of model_ggn_diagonal's result (same scaling); `generator` (a torch.Generator on the model's device)
    makes it reproducible.
    kind="empirical": the observed gradients instead, F^-1 sum_n g_n^2 with g_n the gradient of sample n's
    summed loss term and F what reduction='mean' divides by (N for cross-entropy, N * D for MSE): curvlinops'
    EFLinearOperator convention. Not an estimate of the GGN away from a minimum.

    Supported losses: MSE, cross-entropy, BCE-with-logits, NLL (as model_ggn_diagonal). Other arguments as
    model_hessian_diagonal (per_sample, return_loss, flat, all_reduce, backward, dict inputs included).
    """
    if kind not in FISHER_KINDS:
        raise ValueError(f"kind must be one of {FISHER_KINDS}, got {kind!r}")
    if not isinstance(mc_samples, int) or isinstance(mc_samples, bool) or mc_samples < 1:
        raise ValueError(f"mc_samples must be a positive int, got {mc_samples!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    validation.check_flag(per_sample, "per_sample")
    device = next((p.device for p in model.parameters()), None) if isinstance(model, Module) else None
    if generator is not None and device is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but the model's parameters are on {device}")
    request = CurvatureRequest(f"fisher_{kind}", per_sample=per_sample, mc_samples=mc_samples, generator=generator)
    return model_diagonal(
        "model_fisher_diagonal",
        model,
        loss_fn,
        inputs,
        targets,
        request,
        create_graph=False,
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
