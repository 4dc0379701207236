"""Where the loss meets both engines: the loss evaluated once on the model output, and the curvature the
request starts from there (the loss's per-sample Hessian factor, or the Fisher's columns)."""

from typing import Any, Callable, Tuple

from torch import Tensor

from .._errors import Unsupported
from ..losses import CurvatureRequest, Loss, check_scalar_loss, fisher_columns
from .curvature import Curvature


def evaluate_loss(loss: Loss, loss_fn: Callable, output: Tensor, targets: Tensor) -> Tuple[Tensor, Tensor]:
    """(the loss's value, the targets as it saw them): loss_fn itself runs once, so its own checks (class
    indices in range, shapes) fire here too. Raises Unsupported where the pair has no exact rule."""
    reading = loss.reading
    if reading is not None:  # the loss function's own ops on the targets (the engine ran those on the output)
        targets = reading.targets_for(targets, output, loss.class_axis)
    if targets.is_floating_point() and targets.dtype != output.dtype:
        # as F.mse_loss does: the loss of the promoted targets (F.cross_entropy and BCE would round parts of
        # it to the targets' precision; the engine's numbers are the exact ones)
        targets = targets.to(output.dtype)
    reason = loss.output_reason(output, targets)
    if reason is not None:
        raise Unsupported(reason)
    if reading is not None:
        value = type(loss).function(output, targets, **loss.options)  # what loss_fn computes, read from its ops
    else:
        value = loss_fn(loss.loss_input(output), targets)
    check_scalar_loss(value, "loss_fn")
    return value, targets


def output_origin(
    request: CurvatureRequest, loss: Loss, output: Tensor, targets: Tensor, loss_fn: Callable, **options: Any
) -> Curvature:
    """The curvature the request starts from at the model output (for NLL: at the LogSoftmax input); options
    go to Loss.output_factor."""
    if request.kind in ("hessian", "ggn"):
        factor = loss.output_factor(output, targets, **options)
        return Curvature(output.shape[1:], factors=factor.factors, signs=factor.signs, diag=factor.diag)
    return Curvature(output.shape[1:], factors=fisher_columns(request, loss, output, targets, loss_fn))
