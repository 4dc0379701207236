"""Max pooling (selects one input per output: diagonals stay diagonal) and average pooling (mixes)."""

import torch.nn as nn

from .curvature import Curvature, _split
from .registry import Rule, register
from .shared_weight import diagonal_through_selection, linear_transpose_columns, transpose_columns


@register(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
class MaxPoolRule(Rule):
    def propagate(self, record, curvature, context):
        max_columns = context.max_columns
        module, x = record.module, record.input

        def function(inp):
            return module(inp)  # linear in inp near x: the argmax pattern is fixed

        if curvature.dense is not None:
            yield from linear_transpose_columns(function, x, curvature, max_columns)
            return
        diag = None if curvature.diag is None else diagonal_through_selection(function, x, curvature)
        if curvature.factors is None:
            yield Curvature(x.shape[1:], diag=diag)
            return
        for index, (columns, signs) in enumerate(_split(curvature.factors, curvature.signs, max_columns)):
            yield Curvature(x.shape[1:], transpose_columns(function, x, columns), signs, diag if index == 0 else None)


@register(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
class AveragePoolRule(Rule):
    mixing = True

    def propagate(self, record, curvature, context):
        max_columns = context.max_columns
        yield from linear_transpose_columns(record.module, record.input, curvature, max_columns)
