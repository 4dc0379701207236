"""The gradient of the loss in the parameters from the engine's own forward pass: one call for a curvature step
(backward=True). Where the engine runs a first-order backward anyway (dloss/doutput at its curved nodes), the
parameters' gradients come from that same backward."""

from dataclasses import dataclass
from typing import List, Optional

import torch


@dataclass
class Gradients:
    params: list  # the parameters asked for (those that require grad)
    values: Optional[list] = None  # filled by the engine: one per parameter, None where the loss does not reach it


def backward_with(loss, activations, gradients: Optional[Gradients], create_graph=False) -> List[torch.Tensor]:
    """autograd.grad of loss at the activations and, where asked, at gradients.params, in one backward pass:
    returns the activations' gradients and fills gradients.values."""
    asked = gradients.params if gradients is not None and loss.requires_grad else []
    grads = (
        torch.autograd.grad(loss, list(activations) + list(asked), create_graph=create_graph, allow_unused=True)
        if activations or asked
        else ()
    )
    if gradients is not None:
        gradients.values = list(grads[len(activations) :]) if asked else [None] * len(gradients.params)
    return list(grads[: len(activations)])
