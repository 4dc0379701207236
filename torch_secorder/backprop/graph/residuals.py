"""The second-order term of a node that autograd can differentiate twice, as signed columns.

For a per-sample function f with inputs x and dloss/doutput g, the term is R_n = d2(g_n . f(x_n))/dx_n2
(all inputs together: a product x * y couples them). A batched double backward with the unit tangent
e_j in every sample at once gives column j of every R_n (samples do not mix). R is made of blocks with no
entry between them (attention's heads, a softmax's rows): D_in such products give its pattern and so its
blocks; a tangent with a unit in every block at once then gives one column of each block, so the blocks' Hessians
take as many products as the largest block has features. Each block's eigendecomposition gives its signed
columns R_n = sum_v sign(l_v) (sqrt|l_v| q_v)(sqrt|l_v| q_v)^T.
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


def _products(leaves, grads, live, tangents_for, count):
    """Batched double backwards, one per chunk (start, stop) of `count`: yields (start, stop, (N, k, D) products),
    tangents_for(start, stop) giving the (k, N, D) tangents (over the inputs' per-sample features concatenated)."""
    sizes = [x[0].numel() for x in leaves]
    offsets = [sum(sizes[:k]) for k in range(len(sizes))]
    samples = leaves[0].shape[0]
    for start, stop in count:
        tangent = tangents_for(start, stop)
        tangents = [
            tangent[:, :, offsets[k] : offsets[k] + sizes[k]].reshape(stop - start, *leaves[k].shape) for k in live
        ]
        with torch.enable_grad():
            products = torch.autograd.grad(
                [grads[k] for k in live], leaves, tangents, retain_graph=True, is_grads_batched=True, allow_unused=True
            )
        result = leaves[0].new_zeros(samples, stop - start, sum(sizes))
        for k, product in enumerate(products):
            if product is not None:
                result[:, :, offsets[k] : offsets[k] + sizes[k]] = product.reshape(stop - start, samples, -1).transpose(
                    0, 1
                )
        yield start, stop, result


def _chunks(total, step):
    return [(start, min(total, start + step)) for start in range(0, total, step)]


def block_labels(function, inputs, output_grad, max_columns):
    """The blocks the per-sample Hessians of g . f are made of (connected groups of features: the D x D pattern of
    entries nonzero in any sample, from D products), as a (D,) tensor of labels; None when f is linear."""
    leaves, grads, live = _first_derivatives(function, inputs, output_grad)
    if not live:
        return None
    return _blocks(leaves, grads, live, _step(inputs, max_columns))


def block_bytes(labels, samples):
    """The memory of the blocks' Hessians with their eigendecompositions: about 4 float64 copies."""
    sizes = torch.unique(labels, return_counts=True)[1]
    return int(samples * (sizes.double() ** 2).sum() * 8 * 4)


def _step(inputs, max_columns):
    # each batched tangent keeps the function's own intermediates (attention: its score matrices), several
    # times its inputs: an eighth of the columns a pull would take at once
    return max(1, min(sum(x[0].numel() for x in inputs), max_columns // 8))


def _blocks(leaves, grads, live, step):
    """(D,) labels: the least feature index of each feature's connected group in the term's pattern."""
    total = sum(x[0].numel() for x in leaves)
    samples = leaves[0].shape[0]
    pattern = torch.zeros(total, total, dtype=torch.bool, device=leaves[0].device)

    def units(start, stop):
        tangent = leaves[0].new_zeros(stop - start, samples, total)
        rows = torch.arange(stop - start, device=tangent.device)
        tangent[rows, :, start + rows] = 1
        return tangent

    for start, stop, products in _products(leaves, grads, live, units, _chunks(total, step)):
        pattern[start:stop] = (products != 0).any(0)
    pattern |= pattern.T.clone()
    pattern |= torch.eye(total, dtype=torch.bool, device=pattern.device)
    labels = torch.arange(total, device=pattern.device)
    while True:  # each feature takes the least label among its neighbours until none changes
        lowest = torch.where(pattern, labels.unsqueeze(0), total).amin(1)
        lowest = lowest[lowest]  # and its label's own label: a long chain of features takes log steps, not its length
        if torch.equal(lowest, labels):
            return labels
        labels = lowest


def per_sample_hessian_blocks(function, inputs, output_grad, max_columns, labels=None):
    """[(members (B, s), Hessians (N, B, s, s))] per block size s: the per-sample Hessians of g . f over the
    inputs' per-sample features concatenated, split into the blocks they are made of (the heads of attention, the
    rows of a softmax: no entry between two blocks), or None when f is linear in the inputs. The blocks are found
    with D products; their Hessians then take as many products as the largest block has features (one tangent
    holds a unit in every block at once: their products do not overlap)."""
    leaves, grads, live = _first_derivatives(function, inputs, output_grad)
    if not live:
        return None
    samples, total = inputs[0].shape[0], sum(x[0].numel() for x in inputs)
    step = _step(inputs, max_columns)
    labels = _blocks(leaves, grads, live, step) if labels is None else labels
    _, block_of, block_sizes = torch.unique(labels, return_inverse=True, return_counts=True)
    order = torch.argsort(block_of, stable=True)  # features grouped by block, in order within each
    starts = torch.cumsum(block_sizes, 0) - block_sizes
    rank = torch.empty_like(order)
    rank[order] = torch.arange(total, device=order.device) - starts[block_of[order]]  # place within its block
    largest = int(block_sizes.max())

    def combined(start, stop):  # tangent r: a unit on the feature of rank r in every block
        tangent = leaves[0].new_zeros(stop - start, samples, total)
        for r in range(start, stop):
            tangent[r - start, :, rank == r] = 1
        return tangent

    products = leaves[0].new_zeros(samples, largest, total)  # products[n, r, j]: column rank r of j's block, row j
    for start, stop, chunk in _products(leaves, grads, live, combined, _chunks(largest, step)):
        products[:, start:stop] = chunk
    result = []
    for size in torch.unique(block_sizes).tolist():
        blocks = (block_sizes == size).nonzero()[:, 0]
        members = order.reshape(-1)[
            (starts[blocks].unsqueeze(1) + torch.arange(size, device=order.device).unsqueeze(0)).reshape(-1)
        ].reshape(len(blocks), size)
        # hessian[n, b, i, r] = products[n, r, members[b, i]]
        hessian = products[:, :size][:, :, members].permute(0, 2, 3, 1)
        result.append((members, (hessian + hessian.transpose(2, 3)) / 2))
    return result


def per_sample_hessian_columns(function, inputs, output_grad, max_columns, labels=None):
    """Signed column chunks ({input position: (N, V, D_k)}, signs (N, V)) whose signed outer products sum to R_n:
    each block's eigendecomposition, its columns placed on the block's features."""
    blocks = per_sample_hessian_blocks(function, inputs, output_grad, max_columns, labels)
    if blocks is None:
        return
    sizes = [x[0].numel() for x in inputs]
    total, samples = sum(sizes), inputs[0].shape[0]
    while blocks:
        members, hessian = blocks.pop(0)  # not held while its columns are swept down
        dtype = hessian.dtype
        if not bool(hessian.any()):
            continue
        eigenvalues, eigenvectors = symmetric_eigen(hessian)  # (N, B, s), (N, B, s, s) in float64
        del hessian
        magnitude = eigenvalues.abs()
        kept = (magnitude > _RELATIVE_ZERO * magnitude.amax()).any(0).nonzero()  # (block, eigenvector) pairs
        scaled = (eigenvectors * magnitude.sqrt().unsqueeze(2)).to(dtype)  # column k of block b: scaled[n, b, :, k]
        signs_all = torch.sign(eigenvalues).to(dtype)
        del eigenvalues, eigenvectors, magnitude
        step = max(1, max_columns)
        for start in range(0, kept.shape[0], step):
            pairs = kept[start : start + step]
            block, k = pairs[:, 0], pairs[:, 1]
            columns = scaled.new_zeros(samples, len(pairs), total)
            values = scaled.permute(1, 3, 0, 2)[block, k].transpose(0, 1)  # (N, V, s)
            columns.scatter_(2, members[block].unsqueeze(0).expand(samples, -1, -1), values)
            signs = signs_all[:, block, k]
            piece, offset = {}, 0
            for index, size in enumerate(sizes):
                piece[index] = columns[:, :, offset : offset + size]
                offset += size
            yield piece, signs
