"""nn.Linear, also on inputs with extra axes (N, *, in): those positions share the weight."""

import torch
import torch.nn as nn

from .curvature import Curvature, concat_factors
from .registry import Rule, register
from .shared_weight import linear_transpose_columns, shared_weight_diagonal


@register(nn.Linear)
class LinearRule(Rule):
    def param_diagonals(self, record, curvature):
        module, x = record.module, record.input
        samples, out_features = x.shape[0], module.out_features
        results = []
        if x.dim() == 2:
            # diag_W[i, j] = sum_n H_n[i, i] x_nj^2 : only the diagonal of H is needed
            h = curvature.diagonal()
            if module.weight.requires_grad:
                results.append((module.weight, h.transpose(0, 1) @ (x * x)))
            if module.bias is not None and module.bias.requires_grad:
                results.append((module.bias, h.sum(0)))
            return results
        positions = x[0].numel() // x.shape[-1]
        inputs = x.reshape(samples, positions, -1).transpose(1, 2)  # (N, in, P)
        if module.weight.requires_grad:
            results.append((module.weight, shared_weight_diagonal(curvature, inputs, out_features, positions_first=True)))
        if module.bias is not None and module.bias.requires_grad:
            ones = x.new_ones(samples, 1, positions)
            results.append((module.bias, shared_weight_diagonal(curvature, ones, out_features, positions_first=True)[:, 0]))
        return results

    def propagate(self, record, curvature, max_columns):
        module, x = record.module, record.input
        if x.dim() != 2:  # positions: W^T per position, through the generic transpose
            yield from linear_transpose_columns(lambda inp: nn.functional.linear(inp, module.weight), x, curvature, max_columns)
            return
        weight = module.weight  # (out, in)
        in_features, out_features = module.in_features, module.out_features
        feature_shape = x.shape[1:]
        if curvature.dense is not None:
            yield Curvature(feature_shape, dense=weight.transpose(0, 1) @ curvature.dense @ weight)
            return
        width = curvature.width + (out_features if curvature.diag is not None else 0)
        if width > in_features and in_features <= max_columns:
            # factors would be wider than the layer: a dense (in x in) matrix is cheaper
            dense = None
            if curvature.factors is not None:
                projected = weight.transpose(0, 1) @ curvature.factors  # (N, in, V)
                weighted = projected if curvature.signs is None else projected * curvature.signs.unsqueeze(1)
                dense = weighted @ projected.transpose(1, 2)
            if curvature.diag is not None:
                part = (weight.transpose(0, 1) * curvature.diag.unsqueeze(1)) @ weight
                dense = part if dense is None else dense + part
            yield Curvature(feature_shape, dense=dense)
            return
        if width <= max_columns:
            parts = []
            if curvature.factors is not None:
                parts.append((weight.transpose(0, 1) @ curvature.factors, curvature.signs))
            if curvature.diag is not None:
                # W^T diag(d) W = sum_o sign(d_o) (sqrt|d_o| W[o])^T (sqrt|d_o| W[o])
                parts.append(((weight * curvature.diag.abs().sqrt().unsqueeze(2)).transpose(1, 2), torch.sign(curvature.diag)))
            factors, signs = concat_factors(parts)
            yield Curvature(feature_shape, factors, signs)
            return
        for columns, signs in curvature.signed_factor_chunks(max_columns):  # streamed
            yield Curvature(feature_shape, weight.transpose(0, 1) @ columns, signs)
