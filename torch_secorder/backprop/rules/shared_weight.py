"""Pieces shared by layers whose weight is applied at many positions (Conv, Linear on (N, *, in))."""

import torch

from ... import ops


def pair_products_over_positions(signed, other, inputs, per_sample=False):
    """2 sum_v s_v (B^T l_v)(B^T r_v) for a weight shared over positions (a Linear over extra axes, a convolution
    on its patches), without per-sample projections: sum_{p, q} A[o, p, q] x_p x_q with A[o, p, q] =
    sum_v s_v l_vop r_voq, N O P^2 entries where the projections take N V O K. signed (s l) and other (r):
    (N, V, O, P); inputs (N, P, K). Returns (weight (N?, O, K), bias (N?, O))."""
    reduce = "n" if per_sample else ""
    coupling = torch.matmul(signed.permute(0, 2, 3, 1), other.permute(0, 2, 1, 3))  # (N, O, P, P)
    mixed = torch.matmul(coupling, inputs.unsqueeze(1))  # (N, O, P, K)
    weight = 2 * torch.einsum(f"nopk,npk->{reduce}ok", mixed, inputs)
    bias = 2 * torch.einsum(f"nvo,nvo->{reduce}o", signed.sum(3), other.sum(3))
    return weight, bias


def shared_weight_diagonal(curvature, inputs, out_channels, positions_first, per_sample=False):
    """diag of a weight W (O, K) used as z[n, o, p] = sum_k W[o, k] inputs[n, k, p]:

        sum_n sum_{p, q} H_n[(o, p), (o, q)] inputs[n, k, p] inputs[n, k, q]      -> (O, K)

    (N, O, K) without the sum over n when per_sample. The curvature's features are ordered (O, P), or
    (P, O) when positions_first.
    """
    result = "nok" if per_sample else "ok"
    samples, _, positions = inputs.shape
    total = None

    def add(value):
        nonlocal total
        total = value if total is None else total + value

    def by_channel(tensor):  # (..., D) -> (..., O, P)
        if positions_first:
            return tensor.reshape(*tensor.shape[:-1], positions, out_channels).transpose(-1, -2)
        return tensor.reshape(*tensor.shape[:-1], out_channels, positions)

    if curvature.dense is not None:
        layout = (positions, out_channels) if positions_first else (out_channels, positions)
        dense = curvature.dense.reshape(samples, *layout * 2)
        if positions_first:  # (N, P, O, Q, O) -> (N, O, P, Q): the blocks that share an output channel
            blocks = torch.diagonal(dense, dim1=2, dim2=4).permute(0, 3, 1, 2)
        else:  # (N, O, P, O, Q)
            blocks = torch.diagonal(dense, dim1=1, dim2=3).permute(0, 3, 1, 2)
        add(torch.einsum(f"nopq,nkp,nkq->{result}", blocks, inputs, inputs))
        return total
    if curvature.has_factors:  # (N, V, O, P)
        add(factor_weight_diagonal(by_channel(curvature.factors), curvature.signs, inputs, per_sample=per_sample))
    if curvature.diag is not None:
        add(torch.einsum(f"nop,nkp->{result}", by_channel(curvature.diag), inputs * inputs))
    return total


def shared_bias_diagonal(curvature, x, positions, out_channels, positions_first, per_sample=False):
    """diag of a bias b (O,) added at every position, z[n, o, p] += b[o]: the weight formula with one input
    channel of ones (x: the layer input, for their dtype and device). (O,), or (N, O) per_sample."""
    ones = x.new_ones(x.shape[0], 1, positions)
    return shared_weight_diagonal(curvature, ones, out_channels, positions_first, per_sample=per_sample)[..., 0]


def factor_weight_diagonal(factors, signs, inputs, max_elements=1 << 24, force_pairs=False, per_sample=False):
    """sum_n sum_v signs (factors[n, v] @ inputs[n]^T)^2, factors (N, V, O, P), inputs (N, K, P) -> (O, K).

    Two ways with the same numbers: the compiled op forms each (V O, K) projection and squares it, about
    N V O K P multiply-adds. Expanding the square over position pairs instead,
        sum_{p <= q} (2 - [p = q]) (sum_v signs S[v, o, p] S[v, o, q]) (X[k, p] X[k, q]),
    costs about N O K P (P + 1) / 2: cheaper when few positions meet many columns (deep convolutions
    on small feature maps, P = 1 to 16 against V = 10 classes), where the projections are mostly
    memory traffic. force_pairs: always the pairs (tests). per_sample: (N, O, K), the same two ways
    without the sum over n (the projections batched over samples instead of the compiled op)."""
    samples, width, out_channels, positions = factors.shape
    pairs = positions * (positions + 1) // 2
    # Measured on CPU (N = 32, O K = 74k-590k): the kernel's cost follows its (V O, K) products while P is
    # small (its GEMMs are skinny) and V O K P beyond P = 8; the pairs' follows O K T at a lower rate.
    # the pairs' Gram blocks cost O P^2 V more: never cheaper than the projections where P >= K (a bias: K = 1,
    # over 16 tokens it was 3x slower on BERT's columns)
    if (3 * pairs >= width * max(8, positions) or positions >= inputs.shape[1] or samples == 0) and not force_pairs:
        if per_sample:
            return _per_sample_projections(factors, signs, inputs, max_elements)
        return ops.affine_weight_diagonal(factors, signs, inputs)
    first, second = torch.triu_indices(positions, positions, device=factors.device)
    twice = torch.where(first == second, 1.0, 2.0).to(factors.dtype)
    signed = factors if signs is None else factors * signs.reshape(samples, width, 1, 1)
    features = inputs.shape[1]
    # per sample: its factors read once more in (O, P, V) order, the (O, P, P) Gram blocks and the (K, T) products
    per_sample_elements = width * out_channels * positions + out_channels * positions * positions + features * pairs
    step = max(1, max_elements // max(1, per_sample_elements))
    result = factors.new_zeros((samples, out_channels, features) if per_sample else (out_channels, features))
    for start in range(0, samples, step):
        stop = min(samples, start + step)
        # (n, O): sum_v signs S[v, p] S[v, q] as a product over v (no (n, V, O, T) intermediate: V is the number of
        # columns, thousands where curved nodes sit above)
        gram = torch.matmul(
            signed[start:stop].permute(0, 2, 3, 1), factors[start:stop].permute(0, 2, 1, 3)
        )  # (n, O, P, P)
        coupling = gram[:, :, first, second] * twice  # (n, O, T)
        products = inputs[start:stop, :, first] * inputs[start:stop, :, second]  # (n, K, T)
        if per_sample:
            torch.bmm(coupling, products.transpose(1, 2), out=result[start:stop])  # (n, O, K)
            continue
        coupling = coupling.transpose(0, 1).reshape(out_channels, -1)  # (O, n T)
        result.addmm_(coupling, products.permute(0, 2, 1).reshape(-1, features))
    return result


def _per_sample_projections(factors, signs, inputs, max_elements):
    """sum_v signs (factors[n, v] @ inputs[n]^T)^2 for each n: (N, O, K), samples in chunks whose (n, V O, K)
    projections stay within max_elements."""
    samples, width, out_channels, positions = factors.shape
    features = inputs.shape[1]
    step = max(1, max_elements // max(1, width * out_channels * features))
    parts = []
    for start in range(0, samples, step):
        stop = min(samples, start + step)
        projected = torch.bmm(
            factors[start:stop].reshape(stop - start, width * out_channels, positions),
            inputs[start:stop].transpose(1, 2),
        ).reshape(stop - start, width, out_channels, features)
        squared = projected * projected
        if signs is not None:
            squared = squared * signs[start:stop].reshape(stop - start, width, 1, 1)
        parts.append(squared.sum(1))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def channelwise_diagonal(curvature, values, positions_first=False, per_sample=False):
    """diag of a per-channel scale a_c used as z[n, c, p] = a_c * values[n, c, p] (BatchNorm's weight; LayerNorm's,
    with its features as channels and its rows as positions):

        sum_n sum_{p, q} H_n[(c, p), (c, q)] values[n, c, p] values[n, c, q]      -> (C,)

    The curvature's features are ordered (C, P), or (P, C) when positions_first (read through views).
    (N, C) without the sum over n when per_sample.
    """
    samples, channels, positions = values.shape
    layout = (positions, channels) if positions_first else (channels, positions)

    def by_channel(tensor, axis):  # the (C, P) or (P, C) features starting at `axis` as (C, P)
        tensor = tensor.reshape(*tensor.shape[:axis], *layout, *tensor.shape[axis + 1 :])
        return tensor.transpose(axis, axis + 1) if positions_first else tensor

    total = values.new_zeros(samples, channels) if per_sample else values.new_zeros(channels)
    if curvature.dense is not None:
        dense = by_channel(by_channel(curvature.dense, 2), 1)  # (N, C, P, C, Q)
        blocks = torch.diagonal(dense, dim1=1, dim2=3).permute(0, 3, 1, 2)  # (N, C, P, Q)
        return torch.einsum(f"ncpq,ncp,ncq->{'nc' if per_sample else 'c'}", blocks, values, values)
    if curvature.has_factors:
        factors = by_channel(curvature.factors, 2)  # (N, V, C, P)
        if per_sample:
            projected = (factors * values.unsqueeze(1)).sum(3)  # (N, V, C)
            squared = projected * projected
            if curvature.signs is not None:
                squared = squared * curvature.signs.unsqueeze(2)
            total = total + squared.sum(1)
        else:
            total = total + ops.channel_weight_diagonal(factors, curvature.signs, values)
    if curvature.diag is not None:
        total = total + (by_channel(curvature.diag, 1) * values * values).sum(dim=2 if per_sample else (0, 2))
    return total


def pooled_weight_diagonal(curvature, inputs, out_channels, per_sample=False):
    """shared_weight_diagonal for factors kept on max-pooling selections (Curvature.selection):
    only the selected positions of each output channel take part, so the products shrink by the
    pooling factor and the pooled columns are never scattered back to full size. (N, O, K) when
    per_sample."""
    indices, _ = curvature.selection
    compact = curvature.compact_factors
    samples, width = compact.shape[:2]
    columns = compact.reshape(samples, width, out_channels, -1)  # (N, V, O, Q)
    total = ops.selected_weight_diagonal(columns, curvature.signs, indices, inputs, per_sample)
    if curvature.diag is not None:
        total = total + torch.einsum(
            f"nop,nkp->{'nok' if per_sample else 'ok'}",
            curvature.diag.reshape(samples, out_channels, -1),
            inputs * inputs,
        )
    return total


def pooled_bias_diagonal(curvature, out_channels, per_sample=False):
    """Bias diagonal from factors on selections: sum_n sum_v signs (sum_q S[n, v, o, q])^2 (+ the diagonal part);
    (N, O) without the sum over n when per_sample."""
    compact = curvature.compact_factors
    samples, width = compact.shape[:2]
    sums = compact.reshape(samples, width, out_channels, -1).sum(3)
    squared = sums * sums
    if curvature.signs is not None:
        squared = squared * curvature.signs.unsqueeze(2)
    total = squared.sum(dim=1 if per_sample else (0, 1))
    if curvature.diag is not None:
        total = total + curvature.diag.reshape(samples, out_channels, -1).sum(dim=2 if per_sample else (0, 2))
    return total
