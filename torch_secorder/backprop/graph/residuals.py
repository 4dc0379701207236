"""The second-order term of a node that autograd can differentiate twice, as signed columns.

For a per-sample function f with inputs x and dloss/doutput g, the term is R_n = d2(g_n . f(x_n))/dx_n2
(all inputs together: a product x * y couples them). A batched double backward with the unit tangent
e_j in every sample at once gives column j of every R_n (samples do not mix), so R costs D_in
Hessian-vector products for the whole batch; its eigendecomposition gives the signed columns
R_n = sum_v sign(l_v) (sqrt|l_v| q_v)(sqrt|l_v| q_v)^T.
"""

import torch

from ..curvature import symmetric_eigen

# eigenvalues below this fraction of the largest are rounding noise of exact zeros (LayerNorm's mean and
# scale directions, say): their columns are dropped
_RELATIVE_ZERO = 1e-13


def _first_derivatives(function, inputs, output_grad):
    """(leaves, d(g . f)/d(inputs) with their graph, the indices of those that have a derivative themselves)."""
    leaves = [x.detach().requires_grad_(True) for x in inputs]
    with torch.enable_grad():
        scalar = (function(*leaves) * output_grad).sum()
        grads = torch.autograd.grad(scalar, leaves, create_graph=True, allow_unused=True)
    return leaves, grads, [index for index, grad in enumerate(grads) if grad is not None and grad.requires_grad]


def has_second_derivative(function, inputs, output_grad):
    """False when g . f is linear in the inputs (one backward pass tells)."""
    return bool(_first_derivatives(function, inputs, output_grad)[2])


def per_sample_hessian(function, inputs, output_grad, max_columns):
    """(N, D, D) per-sample Hessians of g . f over the inputs' per-sample features concatenated, or None
    when f is linear in them (no second derivative)."""
    leaves, grads, live = _first_derivatives(function, inputs, output_grad)
    if not live:
        return None
    samples = inputs[0].shape[0]
    sizes = [x[0].numel() for x in inputs]
    offsets = [sum(sizes[:k]) for k in range(len(sizes))]
    total = sum(sizes)
    hessian = inputs[0].new_zeros(samples, total, total)
    # each batched tangent keeps the function's own intermediates (attention: its score matrices), several
    # times its inputs: an eighth of the columns a pull would take at once
    step = max(1, min(total, max_columns // 8))
    for start in range(0, total, step):
        stop = min(total, start + step)
        tangents = []
        for k in live:
            tangent = inputs[k].new_zeros(stop - start, samples, sizes[k])
            rows = torch.arange(start, stop, device=tangent.device)
            inside = (rows >= offsets[k]) & (rows < offsets[k] + sizes[k])
            tangent[inside.nonzero()[:, 0], :, rows[inside] - offsets[k]] = 1
            tangents.append(tangent.reshape(stop - start, *inputs[k].shape))
        with torch.enable_grad():
            products = torch.autograd.grad(
                [grads[k] for k in live], leaves, tangents, retain_graph=True, is_grads_batched=True, allow_unused=True
            )
        for k, product in enumerate(products):
            if product is not None:
                hessian[:, start:stop, offsets[k] : offsets[k] + sizes[k]] = product.reshape(
                    stop - start, samples, -1
                ).transpose(0, 1)
    return (hessian + hessian.transpose(1, 2)) / 2


def per_sample_hessian_columns(function, inputs, output_grad, max_columns):
    """Signed column chunks ({input position: (N, V, D_k)}, signs (N, V)) whose signed outer products sum to R_n."""
    hessian = per_sample_hessian(function, inputs, output_grad, max_columns)
    if hessian is None or not bool(hessian.any()):
        return
    eigenvalues, eigenvectors = symmetric_eigen(hessian)  # in float64
    magnitude = eigenvalues.abs()
    kept = (magnitude > _RELATIVE_ZERO * magnitude.amax()).any(0).nonzero()[:, 0]
    columns = (eigenvectors[:, :, kept] * magnitude[:, kept].sqrt().unsqueeze(1)).transpose(1, 2)  # (N, V, D)
    columns, signs = columns.to(hessian.dtype), torch.sign(eigenvalues[:, kept]).to(hessian.dtype)
    del hessian, eigenvalues, eigenvectors, magnitude  # not held while the columns are swept down
    sizes = [x[0].numel() for x in inputs]
    for start in range(0, columns.shape[1], max(1, max_columns)):
        stop = start + max(1, max_columns)
        piece, offset = {}, 0
        for k, size in enumerate(sizes):
            piece[k] = columns[:, start:stop, offset : offset + size]
            offset += size
        yield piece, signs[:, start:stop]
