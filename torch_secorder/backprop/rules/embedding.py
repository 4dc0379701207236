"""nn.Embedding: y[n, t] = W[ids[n, t]]. The input is integers, so nothing propagates below it.

Per sample, column c projects onto the weight as P[r] = sum of c[t] over the positions t with ids[n, t] = r
(a token repeated in one sample adds up before squaring), so the diagonal is
sum_n sum_v sign (P_nv[r])^2. The projections are formed only for the (sample, token) pairs that occur."""

import torch
import torch.nn as nn

from .registry import Rule, one_sample_at_a_time, register, unbatched_input_reason


@register(nn.Embedding)
class EmbeddingRule(Rule):
    def unsupported_reason(self, module):
        if module.max_norm is not None:
            return "max_norm (it renormalises the weight in place during the forward)"
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq=True (its gradient is not the derivative of its output)"
        return None

    def unsupported_input_reason(self, module, x):
        return unbatched_input_reason(x, at_least=1)

    def reads_only_diagonal(self, record):
        return False

    def param_diagonals(self, record, curvature, per_sample=False):
        if per_sample:
            return one_sample_at_a_time(self, record, curvature)
        module, ids = record.module, record.input
        if not record.wants(module.weight):
            return []
        rows = _Rows(module, ids)
        total = module.weight.new_zeros(module.weight.shape)
        if curvature.diag is not None:
            diag = curvature.diag.reshape(-1, module.weight.shape[1])[rows.keep]
            total.index_add_(0, ids.reshape(-1)[rows.keep], diag)
        for columns, signs in curvature.column_parts():
            sums = rows.projections(columns)
            squared = sums * sums
            if signs is not None:
                squared = squared * signs.transpose(0, 1)[:, rows.sample_of].unsqueeze(2)
            total.index_add_(0, rows.rows_of, squared.sum(0))
        return [(module.weight, total)]

    def pair_diagonals(self, record, left, right, signs, per_sample=False):
        """[(weight, 2 sum_v s_v P_v(l) P_v(r))] for pairs of columns, with the same compact projections."""
        module, ids = record.module, record.input
        if not record.wants(module.weight):
            return []
        if per_sample:
            return [
                (module.weight, torch.stack([self.pair_diagonals(record.sample(n), left[n : n + 1], right[n : n + 1],
                                                                 signs[n : n + 1])[0][1] for n in range(ids.shape[0])]))
            ]  # fmt: skip
        rows = _Rows(module, ids)
        products = 2 * rows.projections(left) * rows.projections(right)
        products = products * signs.transpose(0, 1)[:, rows.sample_of].unsqueeze(2)
        total = module.weight.new_zeros(module.weight.shape)
        return [(module.weight, total.index_add_(0, rows.rows_of, products.sum(0)))]

    def propagate(self, record, curvature, context):
        raise NotImplementedError("nothing lies below an embedding: its input is integer indices")


class _Rows:
    """The (sample, row) pairs a batch of ids reads, and columns projected onto them: per sample, the sum of the
    column over the positions reading each row (padding_idx's row gets no gradient: no curvature either)."""

    def __init__(self, module, ids):
        samples = ids.shape[0]
        self.vocabulary, self.features = module.weight.shape
        keys = torch.arange(samples, device=ids.device).unsqueeze(1) * self.vocabulary + ids.reshape(samples, -1)
        keep = ids.reshape(samples, -1) != module.padding_idx if module.padding_idx is not None else None
        self.keep = torch.ones_like(keys, dtype=torch.bool).reshape(-1) if keep is None else keep.reshape(-1)
        unique, self.inverse = torch.unique(keys.reshape(-1)[self.keep], return_inverse=True)
        self.rows_of, self.sample_of = unique % self.vocabulary, unique // self.vocabulary
        self.count, self.samples, self.positions = unique.numel(), samples, keys.shape[1]

    def projections(self, columns):
        """(V, rows read, features) from columns (N, V, positions x features)."""
        width = columns.shape[1]
        values = columns.reshape(self.samples, width, self.positions, self.features).transpose(0, 1)
        values = values.reshape(width, self.samples * self.positions, self.features)[:, self.keep]
        return values.new_zeros(width, self.count, self.features).index_add_(1, self.inverse, values)
