"""Modules that only reshape or pass through: the curvature is the same, seen with the input's shape."""

import torch.nn as nn

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


@register(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
class DropoutRule(ReshapeRule):
    def unsupported_reason(self, module):
        if module.training and module.p > 0:
            return f"{type(module).__name__}(p={module.p}) in training mode is random; call model.eval() or use p=0"
        return None
