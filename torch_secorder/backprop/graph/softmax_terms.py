"""The second-order term of softmax along one axis, in closed form.

Per row p = softmax(x) with g = dloss/dp, the Hessian of g . p in x is diag(a) - p a^T - a p^T with
a = p * (g - g . p) (dloss/dx): one signed unit column per element (sqrt|a| at it) and one pair (p, a) of sign -1
per row, instead of each row's block found and eigendecomposed by batched double backwards (residuals.py).
"""

import torch

from ..curvature import index_chunks


def softmax_terms(x, dim, output_grad, max_columns, pair_columns):
    """Chunks (left, right, signs) as residuals.per_sample_hessian_terms gives them, for input position 0: left
    and right {0: (N, V, features)}, right None for signed squares."""
    samples = x.shape[0]
    p = torch.softmax(x, dim=dim)
    a = p * (output_grad - (output_grad * p).sum(dim, keepdim=True))
    flat_a = a.reshape(samples, -1)
    features = flat_a.shape[1]
    # the diagonal: unit columns where some sample has a nonzero entry
    for chunk in index_chunks((flat_a != 0).any(0).nonzero()[:, 0], max_columns):
        weight = flat_a[:, chunk]  # (N, V)
        columns = x.new_zeros(samples, len(chunk), features)
        columns[:, torch.arange(len(chunk), device=x.device), chunk] = weight.abs().sqrt()
        yield {0: columns}, None, torch.sign(weight)
    # the rank-two part: one pair per row (the other axes' positions), the row's entries along dim
    moved_p, moved_a = p.movedim(dim, -1), a.movedim(dim, -1)
    index = torch.arange(features, device=x.device).reshape(x.shape[1:]).movedim(dim - 1, -1)
    rows = index.reshape(-1, x.shape[dim])  # (rows, length): each row's flat features
    row_p, row_a = moved_p.reshape(samples, -1, x.shape[dim]), moved_a.reshape(samples, -1, x.shape[dim])
    for chunk in index_chunks((row_a != 0).any(2).any(0).nonzero()[:, 0], pair_columns):
        count, places = len(chunk), torch.arange(len(chunk), device=x.device).unsqueeze(1)
        left, right = x.new_zeros(samples, count, features), x.new_zeros(samples, count, features)
        left[:, places, rows[chunk]] = row_p[:, chunk]
        right[:, places, rows[chunk]] = row_a[:, chunk]
        yield {0: left}, {0: right}, -x.new_ones(samples, count)


__all__ = ["softmax_terms"]
