"""nn.LayerNorm: y = w * (x - mean) / sqrt(var + eps) + b over the last dims (rows), per sample.

Affine in w and b, so their diagonals come from the columns at the output alone. In x it is curved:
its second-order term is one (D x D) block per row, R = d2(g . y)/dx2, in closed form as signed
columns (a diagonal and four columns per row, row_residual_columns), each living in one row."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..curvature import Curvature
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
            for columns, signs in self.residual_columns(record, context.max_columns):
                yield Curvature(x.shape[1:], columns, signs)

    def residual_columns(self, record, max_columns):
        module, x = record.module, record.input
        rows = _rows(module, x)
        samples, count, features = rows.shape
        weight = None if module.weight is None else module.weight.reshape(-1)
        grad = record.output_grad.reshape(samples * count, features)
        columns, signs = row_residual_columns(rows.reshape(samples * count, features), grad, weight, module.eps)
        width = columns.shape[1]
        columns = columns.reshape(samples, count, width, features)
        signs = signs.reshape(samples, count * width)
        # row r's columns are zero outside row r: (N, R * V, R * D)
        per_row = max(1, max_columns // max(1, width))
        for start in range(0, count, per_row):
            stop = min(count, start + per_row)
            block = columns.new_zeros(samples, stop - start, width, count, features)
            index = torch.arange(stop - start, device=x.device)
            block[:, index, :, start + index, :] = columns[:, start:stop].transpose(0, 1)
            yield block.reshape(samples, (stop - start) * width, -1), signs[:, start * width : stop * width]


def row_residual_columns(rows, grad, weight, eps):
    """Signed columns of R = d2(g . layer_norm(x))/dx2 for each row x (M, D), in closed form.

    With x^ = (x - mean) / s, s = sqrt(var + eps), a = g * w, m = a . x^, k = -1 / (D s^2) and
    u = a - mean(a) - (m / D) x^:
        R = k [m (I - 1 1^T / D - x^ x^^T / D) + u x^^T + x^ u^T].
    The first part is k m times a projector Pi (onto what is orthogonal to 1 and x^) plus the rank-one rest
    (1 - |x^|^2 / D) x^ x^^T / |x^|^2 that eps leaves: D columns sqrt|k m| Pi e_i and one along x^, all of one
    sign (k m), so nothing cancels (as unit columns minus 1 and x^ it did, far below float32 rounding, where
    the rows below carry mostly 1 and x^: BERT's residual stream). u x^^T + x^ u^T is
    ((b u + x^ / b)(...)^T - (b u - x^ / b)(...)^T) / 2 with b = sqrt(|x^| / |u|), one length for both (with
    |u| << |x^|, a tiny layer scale after the norm, unbalanced squares cancel too).
    Returns (M, D + 3, D) columns and (M, D + 3) signs."""
    features = rows.shape[1]
    centered = rows - rows.mean(dim=1, keepdim=True)
    scale = (centered.pow(2).mean(dim=1, keepdim=True) + eps).sqrt()
    normalized = centered / scale
    a = grad if weight is None else grad * weight
    m = (a * normalized).sum(dim=1, keepdim=True)  # (M, 1)
    u = a - a.mean(dim=1, keepdim=True) - m / features * normalized
    k = -1.0 / (features * scale * scale)  # (M, 1)
    lengths_u, lengths_x = u.norm(dim=1, keepdim=True), normalized.norm(dim=1, keepdim=True)
    direction = torch.where(lengths_x > 0, normalized / lengths_x.clamp_min(torch.finfo(rows.dtype).tiny), 0.0)
    eye = torch.eye(features, dtype=rows.dtype, device=rows.device)
    projector = eye - 1.0 / features - direction.unsqueeze(2) * direction.unsqueeze(1)  # (M, D, D), symmetric
    km = (k * m).abs().sqrt()
    rest = (km * km * (1 - lengths_x * lengths_x / features).clamp_min(0)).sqrt()  # the rank-one rest eps leaves
    balance = torch.where(
        (lengths_u > 0) & (lengths_x > 0),
        (lengths_x / lengths_u.clamp_min(torch.finfo(rows.dtype).tiny)).sqrt(),
        torch.ones_like(lengths_u),
    )
    half = (k.abs() / 2).sqrt()
    extra = torch.stack(
        [rest * direction, half * (balance * u + normalized / balance), half * (balance * u - normalized / balance)],
        dim=1,
    )  # (M, 3, D)
    columns = torch.cat([km.unsqueeze(2) * projector, extra], dim=1)
    sign_km, sign_k = torch.sign(k * m), torch.sign(k)
    signs = torch.cat([sign_km.expand(-1, features + 1), sign_k, -sign_k], dim=1)
    return columns, signs
