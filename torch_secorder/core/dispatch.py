"""Which exact method model_hessian_diagonal uses, and why."""

from dataclasses import dataclass

import torch

from ..backprop import Unsupported, check_supported
from .validation import check_method


@dataclass(frozen=True)
class MethodChoice:
    method: str  # "backprop" or "autograd"
    reason: str

    def __str__(self):
        return f"{self.method}: {self.reason}"


def explain_method(model, loss_fn, inputs=None, method="auto"):
    """The method model_hessian_diagonal(model, loss_fn, inputs, ..., method=method) will use, and why.

    >>> explain_method(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)), nn.CrossEntropyLoss())
    MethodChoice(method='backprop', reason='every module and the loss have exact Hessian-backprop rules')
    """
    check_method(method)
    if method == "autograd":
        return MethodChoice("autograd", "method='autograd' was asked for")
    _, reason = backprop_plan(model, loss_fn, inputs)
    if reason is None:
        return MethodChoice("backprop", "every module and the loss have exact Hessian-backprop rules")
    return MethodChoice("autograd", f"Hessian backpropagation does not support {reason}")


def backprop_plan(model, loss_fn, inputs=None):
    """(chain, None) with the engine's (layers, loss spec) when it can run, else (None, why not)."""
    if isinstance(inputs, (tuple, list)) and len(inputs) != 1:
        return None, f"a model called with {len(inputs)} inputs (only chains of modules with one input)"
    if isinstance(inputs, (tuple, list)):
        inputs = inputs[0]
    if isinstance(inputs, torch.Tensor) and inputs.dim() == 0:
        return None, "0-D inputs"
    try:
        return check_supported(model, loss_fn), None
    except Unsupported as error:
        return None, str(error)
