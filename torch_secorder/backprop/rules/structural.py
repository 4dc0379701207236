"""Modules that only reshape or pass through: the curvature is the same, seen with the input's shape."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import Rule, register


@register(nn.Flatten, nn.Unflatten, nn.Identity)
class ReshapeRule(Rule):
    def unsupported_input_reason(self, module, x):
        axis = getattr(module, "start_dim", getattr(module, "dim", 1))
        if isinstance(axis, int) and x.dim() > 0 and axis % x.dim() == 0:
            return f"an input of shape {tuple(x.shape)} whose batch axis it would reshape"
        return None

    def reads_only_diagonal(self, record):
        return True

    def propagate(self, record, curvature, context):
        yield curvature.reshaped(record.input.shape[1:])


# the draw each dropout module makes, made on a tensor of ones: the same random numbers as on its input (the draw
# depends on the shape, dtype and device only), and the same path (CUDA's fused kernel is not the in-place one)
_DRAWS = {nn.Dropout: F.dropout, nn.Dropout1d: F.dropout1d, nn.Dropout2d: F.dropout2d, nn.Dropout3d: F.dropout3d}


def _draw(module):
    """The functional draw of a dropout module's class or its nearest base among them (a subclass that keeps the
    forward), or None (AlphaDropout)."""
    return next((_DRAWS[cls] for cls in type(module).__mro__ if cls in _DRAWS), None)


@register(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
class DropoutRule(ReshapeRule):
    """In eval mode (or p = 0) the identity. In train mode x times the mask it draws over 1 - p: linear, with the
    draw the model's own forward would make next (each forward pass of a call starts from the random state the
    call began with, _forward_pass.same_random_draws)."""

    def unsupported_reason(self, module):
        if module.training and module.p > 0 and _draw(module) is None:
            return f"{type(module).__name__}(p={module.p}) in training mode (its draw is affine, not a mask)"
        return None

    def forward(self, module, x):
        if not (module.training and module.p > 0):
            return super().forward(module, x)
        scale = _draw(module)(torch.ones_like(x), module.p, True, module.inplace)
        return x * scale, scale

    def propagate(self, record, curvature, context):
        reshaped = curvature.reshaped(record.input.shape[1:])
        scale = record.extras
        yield reshaped if scale is None else reshaped.scaled(scale.reshape(scale.shape[0], -1))
