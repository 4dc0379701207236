"""Where the loss meets both engines: the loss evaluated once on the model output, and the curvature the
request starts from there (the loss's per-sample Hessian factor, or the Fisher's columns)."""

from typing import Any, Callable, Tuple

from torch import Tensor

from .._errors import Unsupported
from ..losses import CurvatureRequest, Loss, check_scalar_loss, fisher_columns
from .curvature import Curvature
from .diagonals import Diagonals


def evaluate_loss(loss: Loss, loss_fn: Callable, output: Tensor, targets: Tensor) -> Tuple[Tensor, Tensor]:
    """(the loss's value, the targets as it saw them): loss_fn itself runs once, so its own checks (class
    indices in range, shapes) fire here too. Raises Unsupported where the pair has no exact rule."""
    targets = loss.targets_for(output, targets)
    reason = loss.output_reason(output, targets)
    if reason is not None:
        raise Unsupported(reason)
    value = loss.evaluate(loss_fn, output, targets)
    check_scalar_loss(value, "loss_fn")
    return value, targets


def add_parameter_terms(loss: Loss, output: Tensor, targets: Tensor, diagonals: Diagonals) -> None:
    """The loss's own terms in tensors it reads besides the output (a penalty on parameters) into diagonals."""
    terms = loss.parameter_diagonals(output, targets)
    if terms and diagonals.samples is not None:
        raise Unsupported("per-sample diagonals of a loss function with a parameter term (it belongs to no sample)")
    for tensor, diagonal in terms:
        diagonals.add(tensor, diagonal)


def output_origin(
    request: CurvatureRequest, loss: Loss, output: Tensor, targets: Tensor, loss_fn: Callable, **options: Any
) -> Curvature:
    """The curvature the request starts from at the model output (for NLL: at the LogSoftmax input); options
    go to Loss.output_factor."""
    if request.kind in ("hessian", "ggn"):
        factor = loss.output_factor(output, targets, **options)
        return Curvature(output.shape[1:], factors=factor.factors, signs=factor.signs, diag=factor.diag)
    return Curvature(output.shape[1:], factors=fisher_columns(request, loss, output, targets, loss_fn))
