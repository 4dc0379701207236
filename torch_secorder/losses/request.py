"""Which curvature a call computes, and the Fisher's columns at the model output.

    hessian           the loss's per-sample Hessian in the output, plus every curved node's second-order term
    ggn               the loss's per-sample Hessian in the output only (J^T H J: positive semi-definite for
                      convex losses)
    fisher_mc         sampled gradients of the model's likelihood: y ~ p(y | f_n), column sqrt(s_n / M) grad_f
                      (-log p(y | f_n)); their outer products average to the GGN's output curvature
    fisher_empirical  the observed gradients: column sqrt(F) dL/df_n (F the loss's mean normaliser), so that
                      the result is F^-1 sum_n g_n g_n^T for the per-sample gradients g_n of the summed loss

All but the Hessian start from the loss alone; per_sample keeps each sample's contribution apart.
"""

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from .base import Loss

KINDS = ("hessian", "ggn", "fisher_mc", "fisher_empirical")


@dataclass(frozen=True)
class CurvatureRequest:
    kind: str = "hessian"
    per_sample: bool = False
    mc_samples: int = 1
    generator: Optional[torch.Generator] = None

    @property
    def residuals(self) -> bool:
        """True when curved nodes add their own second-order terms (the Hessian only)."""
        return self.kind == "hessian"


HESSIAN = CurvatureRequest()


def fisher_columns(
    request: CurvatureRequest, loss: Loss, output: Tensor, targets: Tensor, loss_fn: Callable, nll_logits: bool = True
) -> Tensor:
    """(N, M, D) columns whose outer products are the Fisher's curvature at the output, D = output[0].numel().
    The generic method calls this too, on the model's own output (log-probabilities for NLL: their softmax
    is the same distribution, and NLL's gradient through it is the same vector in parameter space);
    nll_logits: output holds what the loss function is not called on directly (loss.loss_input of it is)."""
    samples, features = output.shape[0], math.prod(output.shape[1:])
    if samples == 0:  # no samples: no columns (the sums they feed are empty)
        return output.new_zeros(0, 1, features)
    if request.kind == "fisher_empirical":
        with torch.enable_grad():
            leaf = output.detach().requires_grad_(True)
            if loss.reading is not None:  # the loss function's own ops ran on the engine's output already
                loss_value = type(loss).function(leaf, targets, **loss.options)
            else:
                loss_value = loss_fn(loss.loss_input(leaf) if nll_logits else leaf, targets)
            (grad,) = torch.autograd.grad(loss_value, leaf)
        return (grad * loss.mean_normaliser(output, targets) ** 0.5).reshape(samples, 1, features)
    return loss.sampled_columns(output.detach(), targets, request.mc_samples, request.generator)
