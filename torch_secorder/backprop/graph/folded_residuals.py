"""An elementwise activation's second-order term folded through the Linear layer below it.

A curved activation (GELU, SiLU, tanh) on z = x W^T + b has the term diag(r) at z, r = g * f''(z): one unit column
per feature of z. Pulled down through the Linear, those columns only ever meet W at each position separately, so
the term is, in closed form:

- for W and b: diag_W[o, i] += sum_p r[p, o] x[p, i]^2, diag_b[o] += sum_p r[p, o] (the Linear rule's own
  diagonal-curvature case);
- at x: per sample and position p the d_in x d_in matrix W^T diag(r_p) W, whose eigendecomposition gives d_in
  signed columns supported on position p.

So a transformer's MLP (d -> 4d -> GELU) sends d columns per token down instead of 4d, and the Linear itself is
not crossed by them at all. Used where the Linear widens (d_out >= 2 d_in) and uses its parameters at that place
only (a tied weight's projections must be summed over its uses before squaring: the engine's sweep does that).
"""

import torch

from ..curvature import Curvature, eigen_columns
from ..rules.elementwise import ElementwiseRule
from . import merges, node_ops

# an eigenvalue below this fraction of the largest is rounding noise of an exact zero
_RELATIVE_ZERO = 1e-13
# the widest input folded: each position's eigendecomposition costs about 10 d_in^3
_WIDEST_INPUT = 512


def linear_below(nodes, node, needed, shared, flops=None):
    """The Linear node below an elementwise curved node whose term folds through it (see the module), or None."""
    op = node.op
    if not isinstance(op, node_ops.ModuleOp) or not isinstance(op.rule, ElementwiseRule) or len(node.inputs) != 1:
        return None  # only an elementwise rule's whole term is its residual diagonal (LayerNorm's is not)
    return widening_linear(nodes[node.inputs[0]], needed, shared, flops)


def widening_linear(below, needed, shared, flops=None):
    """below when it is a Linear a diagonal term at its output folds through and, given one sample's multiply-adds
    at each node (counts.node_flops), folding costs less than the unit columns, else None."""
    if not isinstance(below.op, node_ops.ModuleOp) or not isinstance(below.op.module, torch.nn.Linear):
        return None
    if below.record is None or len(below.inputs) != 1 or not needed[below.inputs[0]] or below.op.batch_from:
        return None
    module, x = below.op.module, below.record.input
    if module.out_features < 2 * module.in_features or module.in_features > _WIDEST_INPUT or x.dim() < 2:
        return None
    if any(id(p) in shared for p in (module.weight, module.bias) if p is not None):
        return None
    if flops is not None and not _folding_pays(module, x, sum(flops[: below.inputs[0] + 1])):
        return None
    return below


def _folding_pays(module, x, beneath):
    """Per sample and position: d_out unit columns cross the Linear and everything beneath it (`beneath`: one
    sample's multiply-adds below the Linear's input), against d_in eigen-columns crossing what is beneath plus one
    d_in x d_in eigendecomposition (merges.eigen_price). Unpriced, a pre-norm MLP (width 64, hidden 128, 784
    inputs, batch 64) spent 900 of 2,114 ms in its folds' eigendecompositions; measured both ways, BERT and GPT-2
    at width 32 (d_in 32, 16 tokens) are faster folded, that MLP unfolded."""
    positions = x[0].numel() // module.in_features
    linear = positions * module.in_features * module.out_features
    unfolded = merges.SWEEP_PRICE * module.out_features * (linear + beneath)
    folded = merges.SWEEP_PRICE * module.in_features * beneath + merges.eigen_price(module.in_features)
    return folded < unfolded


def folded_terms(node, below, wanted, per_sample, max_columns):
    """([(parameter, its diagonal term)], chunks (columns at the Linear's input (N, V, D), signs (N, V))) of the
    elementwise node's term folded through `below` (linear_below)."""
    r = node.op.rule.residual_diagonal(node.record)
    if r is None:
        return [], iter(())
    return diagonal_folded(r, below, wanted, per_sample, max_columns)


def diagonal_folded(r, below, wanted, per_sample, max_columns):
    """folded_terms for a diagonal term diag(r) at the output of `below` (widening_linear)."""
    record = below.record
    record.wanted = wanted
    output = record.output
    curvature = Curvature(output.shape[1:], diag=r.reshape(output.shape[0], -1), primary=False)
    params = below.op.rule.param_diagonals(record, curvature, per_sample=per_sample)
    return params, _input_columns(record.input, below.op.module.weight, r.reshape(output.shape), max_columns)


def _input_columns(x, weight, r, max_columns):
    """Signed columns of W^T diag(r_p) W per sample and position p, placed at p."""
    samples, width = x.shape[0], x.shape[-1]
    positions = x[0].numel() // width
    w = weight.double()
    r = r.reshape(samples, positions, -1).double()
    matrices = torch.einsum("oi,npo,oj->npij", w, r, w)  # (N, P, d_in, d_in): one block per position

    def floor(magnitude):
        return _RELATIVE_ZERO * magnitude.amax()

    for position, values, signs in eigen_columns(matrices, floor, max_columns, x.dtype):
        count = len(position)
        columns = x.new_zeros(samples, count, positions, width)
        columns[:, torch.arange(count, device=x.device), position] = values
        yield columns.reshape(samples, count, -1), signs


__all__ = ["diagonal_folded", "folded_terms", "linear_below", "widening_linear"]
