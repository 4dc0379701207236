"""Max pooling (selects one input per output: diagonals stay diagonal) and average pooling (mixes)."""

import torch.nn as nn
import torch.nn.functional as F

from ..curvature import Curvature, scatter_selected
from .columns import linear_transpose_columns
from .registry import Rule, register, registered_base, unbatched_input_reason

_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _pool_with_indices(module, x):
    """The pooled output and, for every output, the flat spatial index of the input it copies."""
    output, indices = _MAX_POOL[x.dim() - 2](
        x,
        module.kernel_size,
        module.stride,
        module.padding,
        module.dilation,
        ceil_mode=module.ceil_mode,
        return_indices=True,
    )
    return output, indices.reshape(x.shape[0], x.shape[1], indices.shape[2:].numel())


_SPATIAL_DIMS = {
    nn.MaxPool1d: 1,
    nn.MaxPool2d: 2,
    nn.MaxPool3d: 3,
    nn.AvgPool1d: 1,
    nn.AvgPool2d: 2,
    nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1,
    nn.AdaptiveAvgPool2d: 2,
    nn.AdaptiveAvgPool3d: 3,
}


def _batched_input_reason(module, x):
    return unbatched_input_reason(x, dims=(_SPATIAL_DIMS[registered_base(module)] + 2,))


def _as_tuple(value, x):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * (x.dim() - 2)


@register(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
class MaxPoolRule(Rule):
    def unsupported_reason(self, module):
        if module.return_indices:
            return "return_indices=True (its output is a tuple, not a tensor)"
        return None

    def unsupported_input_reason(self, module, x):
        return _batched_input_reason(module, x)

    def forward(self, module, x):
        return _pool_with_indices(module, x)  # the indices are what propagate needs

    def propagate(self, record, curvature, context):
        module, x, indices = record.module, record.input, record.extras
        if curvature.dense is not None:
            for columns, signs in curvature.signed_factor_chunks(context.max_columns):
                yield Curvature(x.shape[1:], scatter_selected(columns, indices, x[0, 0].numel()), signs)
            return
        # J^T diag(d) J = diag(J^T d): every output copies a single input
        diag = None
        if curvature.diag is not None:
            diag = scatter_selected(curvature.diag.unsqueeze(1), indices, x[0, 0].numel())[:, 0]
        if curvature.width == 0:
            yield Curvature(x.shape[1:], diag=diag)
            return
        # Windows that cannot overlap select each input at most once: the columns can stay on the
        # pooled grid (see Curvature.selection) until something needs them in full.
        spans = [(k - 1) * d + 1 for k, d in zip(_as_tuple(module.kernel_size, x), _as_tuple(module.dilation, x))]
        disjoint = all(span <= s for span, s in zip(spans, _as_tuple(module.stride, x)))
        for index, (columns, signs) in enumerate(curvature.factor_chunks(context.max_columns)):
            piece_diag = diag if index == 0 else None
            if disjoint:
                yield Curvature(x.shape[1:], columns, signs, piece_diag, selection=(indices, x[0, 0].numel()))
            else:
                yield Curvature(x.shape[1:], scatter_selected(columns, indices, x[0, 0].numel()), signs, piece_diag)


@register(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
class AveragePoolRule(Rule):
    mixing = True

    def unsupported_input_reason(self, module, x):
        return _batched_input_reason(module, x)

    def propagate(self, record, curvature, context):
        yield from linear_transpose_columns(record.module, record.input, curvature, context.max_columns)
