"""The second-order term of a node that autograd can differentiate twice, as signed columns.

For a per-sample function f with inputs x and dloss/doutput g, the term is R_n = d2(g_n . f(x_n))/dx_n2
(all inputs together: a product x * y couples them). A batched double backward with the unit tangent
e_j in every sample at once gives column j of every R_n (samples do not mix). R is made of blocks with no
entry between them (attention's heads, a softmax's rows): D_in such products give its pattern and so its
blocks; a tangent with a unit in every block at once then gives one column of each block, so the blocks' Hessians
take as many products as the largest block has features. A block's part within one input gives signed columns
by its eigendecomposition, sum_v sign(l_v) (sqrt|l_v| q_v)(sqrt|l_v| q_v)^T; its part between two inputs gives
pairs of a column and a unit vector (per_sample_hessian_terms).
"""

import torch

from ..curvature import eigen_columns, index_chunks

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


def per_sample_hessian_terms(function, inputs, output_grad, max_columns, pair_columns, labels=None):
    """Chunks (left, right, signs) whose terms sum to R_n: right None for signed squares of left's columns
    ({input position: (N, V, D_k)}, signs (N, V)), else pairs (l r^T + r l^T) of left's and right's columns
    (sign +1). Each block is cut along the inputs: its part within one input by that part's eigendecomposition
    (squares), its part C between inputs k and l as sum_j (C[:, j] at k, e_j at l), over the features j of the
    smaller side: no decomposition, and exact in float32. The whole block's eigenvectors would mix the inputs,
    and their squares cancel in float32 below maps that grow one input's directions far more than the other's
    (the product of Llama's queries and keys: 265x the generic method's error on the query projection)."""
    blocks = per_sample_hessian_blocks(function, inputs, output_grad, max_columns, labels)
    if blocks is None:
        return
    sizes = [x[0].numel() for x in inputs]
    offsets = [sum(sizes[:k]) for k in range(len(sizes))]
    boundaries = torch.tensor(offsets[1:], dtype=torch.long, device=inputs[0].device)
    samples = inputs[0].shape[0]
    while blocks:
        members, hessian = blocks.pop(0)  # not held while its columns are swept down
        scale = hessian.abs().amax()
        if not bool(scale > 0):
            continue
        floor = _RELATIVE_ZERO * scale  # |entries| bound the spectrum from below: smaller is rounding noise
        # a block's members ascend, so each input's features are one stretch of it: blocks with the same
        # number of features from each input are cut alike
        owner = torch.bucketize(members, boundaries, right=True)  # (B, s)
        counts = torch.stack([(owner == k).sum(1) for k in range(len(sizes))], 1)  # (B, inputs)
        for split in torch.unique(counts, dim=0):
            chosen = (counts == split).all(1).nonzero()[:, 0]
            ends = torch.cumsum(split, 0).tolist()
            stretches = [(k, end - int(split[k]), end) for k, end in enumerate(ends) if int(split[k]) > 0]
            part = hessian if len(chosen) == hessian.shape[1] else hessian[:, chosen]  # a copy: a few splits
            local = [members[chosen, a:b] - offsets[k] for k, a, b in stretches]  # (B', s_k) within input k
            for index, (k, a, b) in enumerate(stretches):
                yield from _squares(part[:, :, a:b, a:b], local[index], k, sizes[k], floor, max_columns)
                for other, (j, c, d) in enumerate(stretches[index + 1 :], start=index + 1):
                    cross = part[:, :, a:b, c:d]
                    if b - a >= d - c:  # units on the smaller side: fewer pairs
                        sides = (cross, local[index], k, sizes[k]), (local[other], j, sizes[j])
                    else:
                        sides = (cross.transpose(2, 3), local[other], j, sizes[j]), (local[index], k, sizes[k])
                    yield from _unit_pairs(*sides, samples, floor, pair_columns)
        del hessian


def _placed(values, rows, size):
    """(N, V, size): values (N, V, s) on the features rows (V, s) of one input."""
    columns = values.new_zeros(*values.shape[:2], size)
    return columns.scatter_(2, rows.unsqueeze(0).expand(values.shape[0], -1, -1), values)


def _squares(within, rows, position, size, floor, step):
    """Signed squares of the eigendecomposition of within (N, B, s, s), the part of the blocks in one input."""
    if not bool(within.any()):
        return
    for block, values, signs in eigen_columns(within, lambda magnitude: floor, step, within.dtype):
        yield {position: _placed(values, rows[block], size)}, None, signs


def _unit_pairs(full_side, unit_side, samples, floor, step):
    """Pairs (C[:, j], e_j) over the columns j of cross (N, B, s, t), the part of the blocks between two inputs."""
    cross, rows, position, size = full_side
    unit_rows, unit_position, unit_size = unit_side
    kept = (cross.abs() > floor).any(2).any(0).nonzero()  # (block, column) pairs not zero in every sample
    for chunk in index_chunks(kept, step):
        block, j = chunk.unbind(1)
        values = cross.permute(1, 3, 0, 2)[block, j].transpose(0, 1)  # (N, V, s)
        units = cross.new_zeros(samples, len(block), unit_size)
        units[:, torch.arange(len(block), device=units.device), unit_rows[block, j]] = 1
        signs = cross.new_ones(samples, len(block))
        yield {position: _placed(values, rows[block], size)}, {unit_position: units}, signs
