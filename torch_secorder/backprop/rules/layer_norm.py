"""nn.LayerNorm: y = w * (x - mean) / sqrt(var + eps) + b over the last dims (rows), per sample.

Affine in w and b, so their diagonals come from the columns at the output alone. In x it is curved:
its second-order term is one (D x D) block per row, R = d2(g . y)/dx2, in closed form as signed
columns (D + 1 per row) and one signed pair per row (row_residual_terms), each living in one row."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..curvature import Curvature, balanced_squares
from .columns import linear_transpose_columns
from .registry import Rule, register, unbatched_input_reason
from .shared_weight import channelwise_diagonal


def _rows(module, x):
    """x as (N, R, D): R rows of the D normalised features per sample."""
    features = 1
    for size in module.normalized_shape:
        features *= size
    return x.reshape(x.shape[0], -1, features)


@register(nn.LayerNorm)
class LayerNormRule(Rule):
    mixing = True

    def needs_output_grad(self, module):
        return True

    def unsupported_input_reason(self, module, x):
        return unbatched_input_reason(x, at_least=len(module.normalized_shape) + 1)

    def _normalized(self, module, x):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)

    def param_diagonals(self, record, curvature, per_sample=False):
        module, x = record.module, record.input
        wants_weight, wants_bias = record.wants(module.weight), record.wants(module.bias)
        if not (wants_weight or wants_bias):
            return []
        normalized = _rows(module, self._normalized(module, x))
        results = []
        for param, values, wanted in (
            (module.weight, normalized, wants_weight),
            (module.bias, torch.ones_like(normalized), wants_bias),
        ):
            if wanted:  # feature d of every row is one "channel", the rows its positions
                diagonal = channelwise_diagonal(
                    curvature, values.transpose(1, 2), positions_first=True, per_sample=per_sample
                )
                results.append((param, diagonal.reshape(*diagonal.shape[:-1], *param.shape)))
        return results

    def propagate(self, record, curvature, context):
        module, x = record.module, record.input

        def function(inp):
            return F.layer_norm(inp, module.normalized_shape, module.weight, module.bias, module.eps)

        yield from linear_transpose_columns(function, x, curvature, context.max_columns)
        if curvature.primary:
            # the chain engine squares every column: a pair as two balanced squares (the graph engine keeps the
            # product, graph/engine.py)
            for left, right, signs in self.residual_terms(
                record, context.max_columns, max(1, context.max_columns // 2)
            ):
                if right is not None:
                    squares, signs = balanced_squares({0: left}, {0: right}, signs)
                    left = squares[0]
                yield Curvature(x.shape[1:], left, signs)

    def residual_terms(self, record, max_columns, pair_columns):
        module, x = record.module, record.input
        rows = _rows(module, x)
        samples, count, features = rows.shape
        weight = None if module.weight is None else module.weight.reshape(-1)
        grad = record.output_grad.reshape(samples * count, features)
        columns, signs, (left, right, pair_signs) = row_residual_terms(
            rows.reshape(samples * count, features), grad, weight, module.eps
        )
        width = columns.shape[1]
        signs = signs.reshape(samples, count, width)
        for start, stop, block in _row_blocks(columns.reshape(samples, count, width, features), max_columns):
            yield block, None, signs[:, start:stop].reshape(samples, -1)
        left, right = left.reshape(samples, count, 1, features), right.reshape(samples, count, 1, features)
        pair_signs = pair_signs.reshape(samples, count)
        for (start, stop, lefts), (_, _, rights) in zip(
            _row_blocks(left, pair_columns), _row_blocks(right, pair_columns)
        ):
            yield lefts, rights, pair_signs[:, start:stop]


def _row_blocks(columns, max_columns):
    """(start, stop, block) for per-row columns (N, R, W, D): row r's columns are zero outside row r, so a chunk
    of rows start:stop is (N, (stop - start) * W, R * D), at most about max_columns columns."""
    samples, count, width, features = columns.shape
    per_row = max(1, max_columns // max(1, width))
    for start in range(0, count, per_row):
        stop = min(count, start + per_row)
        block = columns.new_zeros(samples, stop - start, width, count, features)
        index = torch.arange(stop - start, device=columns.device)
        block[:, index, :, start + index, :] = columns[:, start:stop].transpose(0, 1)
        yield start, stop, block.reshape(samples, (stop - start) * width, -1)


def row_residual_terms(rows, grad, weight, eps):
    """R = d2(g . layer_norm(x))/dx2 for each row x (M, D), in closed form, as signed columns plus one signed pair.

    With x^ = (x - mean) / s, s = sqrt(var + eps), a = g * w, m = a . x^, k = -1 / (D s^2) and
    u = a - mean(a) - (m / D) x^:
        R = k [m (I - 1 1^T / D - x^ x^^T / D) + u x^^T + x^ u^T].
    The first part is k m times a projector Pi (onto what is orthogonal to 1 and x^) plus the rank-one rest
    (1 - |x^|^2 / D) x^ x^^T / |x^|^2 that eps leaves: D columns sqrt|k m| Pi e_i and one along x^, all of one
    sign (k m), so nothing cancels (as unit columns minus 1 and x^ it did, far below float32 rounding, where
    the rows below carry mostly 1 and x^: BERT's residual stream). u x^^T + x^ u^T stays a pair (l r^T + r l^T,
    l = sqrt|k| u, r = sqrt|k| x^, sign of k): its diagonal below is 2 (J l)(J r), a product. As a difference of
    two squares it cancelled far below float32 rounding where J x^ >> J u, whatever the balance at the row
    (DeiT's patch embedding, under the last norm: 140x the generic method's float32 error).
    Returns (columns (M, D + 1, D), signs (M, D + 1)) and the pair (left (M, D), right (M, D), signs (M,))."""
    features = rows.shape[1]
    centered = rows - rows.mean(dim=1, keepdim=True)
    scale = (centered.pow(2).mean(dim=1, keepdim=True) + eps).sqrt()
    normalized = centered / scale
    a = grad if weight is None else grad * weight
    m = (a * normalized).sum(dim=1, keepdim=True)  # (M, 1)
    u = a - a.mean(dim=1, keepdim=True) - m / features * normalized
    k = -1.0 / (features * scale * scale)  # (M, 1)
    lengths_x = normalized.norm(dim=1, keepdim=True)
    direction = torch.where(lengths_x > 0, normalized / lengths_x.clamp_min(torch.finfo(rows.dtype).tiny), 0.0)
    eye = torch.eye(features, dtype=rows.dtype, device=rows.device)
    projector = eye - 1.0 / features - direction.unsqueeze(2) * direction.unsqueeze(1)  # (M, D, D), symmetric
    km = (k * m).abs().sqrt()
    rest = (km * km * (1 - lengths_x * lengths_x / features).clamp_min(0)).sqrt()  # the rank-one rest eps leaves
    columns = torch.cat([km.unsqueeze(2) * projector, (rest * direction).unsqueeze(1)], dim=1)
    signs = torch.sign(k * m).expand(-1, features + 1)
    root = k.abs().sqrt()
    return columns, signs, (root * u, root * normalized, torch.sign(k).reshape(-1))
