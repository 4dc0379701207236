"""nn.Linear, also on inputs with extra axes (N, *, in): those positions share the weight."""

import torch
import torch.nn as nn

from ..curvature import Curvature, concat_factors, factor_diagonal
from .columns import fold_columns, linear_transpose_columns
from .gemm import mm
from .registry import Rule, register, unbatched_input_reason
from .shared_weight import pair_products_over_positions, shared_bias_diagonal, shared_weight_diagonal


def right_multiply(columns, weight):
    """columns (N, V, out) @ weight (out, in) as one 2-D product (a batched broadcast matmul is slower)."""
    folded, unfold_back = fold_columns(columns)
    return unfold_back(mm(folded, weight))


@register(nn.Linear)
class LinearRule(Rule):
    mixing = True

    def unsupported_input_reason(self, module, x):
        return unbatched_input_reason(x, at_least=2)

    def reads_only_diagonal(self, record):
        return record.input.dim() == 2  # diag_W = diag(H)^T x^2

    @staticmethod
    def input_diagonal(weight, curvature):
        """diag(W^T H W) without forming W^T H W: the shortcut when only diagonals are read below."""
        total = None
        if curvature.dense is not None:
            total = ((curvature.dense @ weight) * weight).sum(1)
        if curvature.has_factors:
            total = factor_diagonal(right_multiply(curvature.factors, weight), curvature.signs)
        if curvature.diag is not None:
            part = mm(curvature.diag, weight * weight)
            total = part if total is None else total + part
        return total

    def param_diagonals(self, record, curvature, per_sample=False):
        module, x = record.module, record.input
        samples, out_features = x.shape[0], module.out_features
        results = []
        if x.dim() == 2:
            # diag_W[i, j] = sum_n H_n[i, i] x_nj^2 : only the diagonal of H is needed
            h = curvature.full_diagonal()
            if record.wants(module.weight):
                squares = x * x
                results.append(
                    (
                        module.weight,
                        h.unsqueeze(2) * squares.unsqueeze(1) if per_sample else mm(h.transpose(0, 1), squares),
                    )
                )
            if record.wants(module.bias):
                results.append((module.bias, h if per_sample else h.sum(0)))
            return results
        positions = x[0].numel() // x.shape[-1]
        inputs = x.reshape(samples, positions, -1).transpose(1, 2)  # (N, in, P)
        if record.wants(module.weight):
            results.append(
                (
                    module.weight,
                    shared_weight_diagonal(
                        curvature, inputs, out_features, positions_first=True, per_sample=per_sample
                    ),
                )
            )
        if record.wants(module.bias):
            bias = shared_bias_diagonal(curvature, x, positions, out_features, True, per_sample)
            results.append((module.bias, bias))
        return results

    def pair_diagonals(self, record, left, right, signs, per_sample=False):
        """[(parameter, 2 sum_v s_v (B^T l_v)(B^T r_v))] for pairs of columns (N, V, *out) at the output, from the
        couplings over positions (shared_weight.pair_products_over_positions), without per-sample projections."""
        module, x = record.module, record.input
        samples, width = left.shape[:2]
        inputs = x.reshape(samples, -1, x.shape[-1])  # (N, P, K)
        positions = inputs.shape[1]
        signed = left.reshape(samples, width, positions, -1) * signs.reshape(samples, width, 1, 1)
        other = right.reshape(samples, width, positions, -1)
        weight, bias = pair_products_over_positions(signed.transpose(2, 3), other.transpose(2, 3), inputs, per_sample)
        results = []
        if record.wants(module.weight):
            results.append((module.weight, weight))
        if module.bias is not None and record.wants(module.bias):
            results.append((module.bias, bias))
        return results

    def propagate(self, record, curvature, context):
        max_columns = context.max_columns
        module, x = record.module, record.input
        if x.dim() != 2:  # positions: W^T per position, through the generic transpose
            yield from linear_transpose_columns(
                lambda inp: nn.functional.linear(inp, module.weight), x, curvature, max_columns
            )
            return
        weight = module.weight  # (out, in)
        in_features, out_features = module.in_features, module.out_features
        feature_shape = x.shape[1:]
        if context.diagonal_only:
            yield Curvature(feature_shape, diag=self.input_diagonal(weight, curvature))
            return
        if curvature.dense is not None:
            yield Curvature(feature_shape, dense=weight.transpose(0, 1) @ curvature.dense @ weight)
            return
        width = curvature.width + (out_features if curvature.diag is not None else 0)
        if context.mixing_below and width > 2 * in_features and in_features <= max_columns:
            # Factors much wider than the layer would make the next mixing layer pay for every
            # column: a dense (in x in) matrix keeps the cost linear in depth.
            dense = None
            if curvature.has_factors:
                projected = right_multiply(curvature.factors, weight)  # (N, V, in)
                dense = Curvature(feature_shape, projected, curvature.signs).to_dense()
            if curvature.diag is not None:
                part = (weight.transpose(0, 1) * curvature.diag.unsqueeze(1)) @ weight
                dense = part if dense is None else dense + part
            yield Curvature(feature_shape, dense=dense)
            return
        if width <= max_columns:
            parts = []
            if curvature.has_factors:
                parts.append((right_multiply(curvature.factors, weight), curvature.signs))
            if curvature.diag is not None:
                parts.append(scaled_rows(weight, curvature.diag))
            factors, signs = concat_factors(parts)
            yield Curvature(feature_shape, factors, signs)
            return
        # streamed: factor columns in chunks, then the diagonal part a block of W's rows at a time
        if curvature.has_factors:
            for columns, signs in curvature.factor_chunks(max_columns):
                yield Curvature(feature_shape, right_multiply(columns, weight), signs)
        if curvature.diag is not None:
            for start in range(0, out_features, max_columns):
                stop = min(out_features, start + max_columns)
                yield Curvature(feature_shape, *scaled_rows(weight[start:stop], curvature.diag[:, start:stop]))


def scaled_rows(weight, diag):
    """W^T diag(d) W = sum_o sign(d_o) (sqrt|d_o| W[o])^T (sqrt|d_o| W[o]): rows of W are columns.
    weight (O, in), diag (N, O) -> columns (N, O, in) and their signs (N, O)."""
    return weight * diag.abs().sqrt().unsqueeze(2), torch.sign(diag)
