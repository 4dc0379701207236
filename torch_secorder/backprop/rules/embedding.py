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
        samples = ids.shape[0]
        vocabulary, features = module.weight.shape
        keys = torch.arange(samples, device=ids.device).unsqueeze(1) * vocabulary + ids.reshape(samples, -1)
        if module.padding_idx is not None:  # its row gets no gradient: no curvature either
            keep = ids.reshape(samples, -1) != module.padding_idx
        else:
            keep = torch.ones_like(keys, dtype=torch.bool)
        flat_keys = keys.reshape(-1)[keep.reshape(-1)]
        unique, inverse = torch.unique(flat_keys, return_inverse=True)
        rows_of = unique % vocabulary
        sample_of = unique // vocabulary
        total = module.weight.new_zeros(vocabulary, features)
        positions = keys.shape[1]
        if curvature.diag is not None:
            diag = curvature.diag.reshape(samples * positions, features)[keep.reshape(-1)]
            total.index_add_(0, ids.reshape(-1)[keep.reshape(-1)], diag)
        for columns, signs in curvature.column_parts():
            width = columns.shape[1]
            values = columns.reshape(samples, width, positions, features).transpose(0, 1)  # (V, N, T, E)
            values = values.reshape(width, samples * positions, features)[:, keep.reshape(-1)]
            sums = values.new_zeros(width, unique.numel(), features).index_add_(1, inverse, values)
            squared = sums * sums
            if signs is not None:
                squared = squared * signs.transpose(0, 1)[:, sample_of].unsqueeze(2)
            total.index_add_(0, rows_of, squared.sum(0))
        return [(module.weight, total)]

    def propagate(self, record, curvature, context):
        raise NotImplementedError("nothing lies below an embedding: its input is integer indices")
