"""Max pooling (selects one input per output: diagonals stay diagonal) and average pooling (mixes)."""

import torch.nn as nn
import torch.nn.functional as F

from .curvature import Curvature
from .registry import Rule, register
from .shared_weight import linear_transpose_columns

_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _pool_with_indices(module, x):
    """The pooled output and, for every output, the flat spatial index of the input it copies."""
    output, indices = _MAX_POOL[x.dim() - 2](x, module.kernel_size, module.stride, module.padding, module.dilation,
                                             ceil_mode=module.ceil_mode, return_indices=True)
    return output, indices.reshape(x.shape[0], x.shape[1], -1)


def _scatter_to_inputs(values, indices, x):
    """J^T values for the selection J: values (N, V, C * outputs) -> (N, V, C * inputs), adding where
    overlapping windows picked the same input."""
    samples, channels = x.shape[0], x.shape[1]
    width = values.shape[1]
    per_channel = x[0, 0].numel()
    result = values.new_zeros(width, samples, channels, per_channel)  # (V, N, ...) like the other transposes
    result.scatter_add_(3, indices.unsqueeze(0).expand(width, -1, -1, -1),
                        values.transpose(0, 1).reshape(width, samples, channels, -1))
    return result.reshape(width, samples, -1).transpose(0, 1)


@register(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
class MaxPoolRule(Rule):
    def forward(self, module, x):
        return _pool_with_indices(module, x)  # the indices are what propagate needs

    def propagate(self, record, curvature, context):
        x, indices = record.input, record.extras
        if curvature.dense is not None:
            for columns, signs in curvature.signed_factor_chunks(context.max_columns):
                yield Curvature(x.shape[1:], _scatter_to_inputs(columns, indices, x), signs)
            return
        # J^T diag(d) J = diag(J^T d): every output copies a single input
        diag = None
        if curvature.diag is not None:
            diag = _scatter_to_inputs(curvature.diag.unsqueeze(1), indices, x)[:, 0]
        if curvature.factors is None:
            yield Curvature(x.shape[1:], diag=diag)
            return
        for index, (columns, signs) in enumerate(curvature.factor_chunks(context.max_columns)):
            yield Curvature(x.shape[1:], _scatter_to_inputs(columns, indices, x), signs, diag if index == 0 else None)


@register(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
class AveragePoolRule(Rule):
    mixing = True

    def propagate(self, record, curvature, context):
        yield from linear_transpose_columns(record.module, record.input, curvature, context.max_columns)
