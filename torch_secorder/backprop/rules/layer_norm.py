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

    With x^ = (x - mean) / s, s = sqrt(var + eps), a = g * w, m = a . x^, P = I - 1 1^T / D and
    u = P a - (m / D) x^:
        R = -1 / (D s^2) [m I - (m / D) 1 1^T + u x^^T + x^ u^T - (m / D) x^ x^^T],
    that is a diagonal k m I (k = -1 / (D s^2)) plus four columns: 1 and x^ (sign -k m), and
    (a u + x^ / a), (a u - x^ / a) (signs k, -k) from u x^^T + x^ u^T = ((a u + x^ / a)(...)^T - (a u - x^ / a)(...)^T)
    / 2, a = sqrt(|x^| / |u|) per row.
    Returns (M, D + 4, D) columns and (M, D + 4) signs."""
    features = rows.shape[1]
    centered = rows - rows.mean(dim=1, keepdim=True)
    scale = (centered.pow(2).mean(dim=1, keepdim=True) + eps).sqrt()
    normalized = centered / scale
    a = grad if weight is None else grad * weight
    m = (a * normalized).sum(dim=1, keepdim=True)  # (M, 1)
    u = a - a.mean(dim=1, keepdim=True) - m / features * normalized
    k = -1.0 / (features * scale * scale)  # (M, 1)
    diagonal = (k * m).expand(-1, features)  # the k m I part, as scaled unit columns
    unit = torch.diag_embed(diagonal.abs().sqrt())  # (M, D, D)
    rank_one = (k * m / features).abs().sqrt()  # for -(k m / D)(1 1^T + x^ x^^T)
    half = (k.abs() / 2).sqrt()
    # u x^^T + x^ u^T split with u and x^ brought to one length (a u, x^ / a): with |u| << |x^| (a tiny
    # layer scale after the norm) the two squares would cancel to far below their rounding
    lengths_u, lengths_x = u.norm(dim=1, keepdim=True), normalized.norm(dim=1, keepdim=True)
    balance = torch.where(
        (lengths_u > 0) & (lengths_x > 0), (lengths_x / lengths_u.clamp_min(1e-300)).sqrt(), torch.ones_like(lengths_u)
    )
    extra = torch.stack(
        [
            rank_one * torch.ones_like(normalized),
            rank_one * normalized,
            half * (balance * u + normalized / balance),
            half * (balance * u - normalized / balance),
        ],
        dim=1,
    )  # (M, 4, D)
    columns = torch.cat([unit, extra], dim=1)
    sign_km, sign_k = torch.sign(k * m), torch.sign(k)
    signs = torch.cat([torch.sign(diagonal), -sign_km, -sign_km, sign_k, -sign_k], dim=1)
    return columns, signs
