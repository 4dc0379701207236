"""Pure-torch references of the compiled ops: same signatures, same numbers.

They are what the tests compare the kernels with, what runs when a graph is
needed (they are differentiable; the kernels are not), and what runs when no
compiled module can be loaded.
"""

import torch


def _is_mean(reduction):
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return reduction == "mean"


def _per_sample_rows(tensor):
    if tensor.dim() == 0:
        raise ValueError("input must have a batch dimension, got a 0-D tensor")
    return tensor.reshape(tensor.shape[0], tensor.shape[1:].numel())


def _diagonal_sqrt_factor(diag):
    return torch.diag_embed(_per_sample_rows(diag).sqrt())


# ---------------------------------------------------------------- backend kernels
def softmax_hessian_diag(logits, scale):
    p = torch.softmax(logits, dim=1)
    return scale.unsqueeze(1) * p * (1 - p)


def softmax_hessian_sqrt(logits, scale):
    p = torch.softmax(logits, dim=1)
    root_p = p.sqrt()
    factor = torch.diag_embed(root_p) - p.unsqueeze(2) * root_p.unsqueeze(1)
    return scale.sqrt()[:, None, None] * factor


def softmax_hessian_columns(logits, scale):
    """C - 1 columns per sample whose outer products sum to scale * (diag(p) - p p^T), p = softmax(logits):
    the rank of that Hessian, one column fewer to pull through the whole model than a square root.

    With q = sqrt(p), diag(p) - p p^T = diag(q) (I - q q^T) diag(q), and I - q q^T is the sum of u u^T over
    the columns u of the Householder reflection H = I - w w^T / (1 + q_k), w = q + e_k, other than column
    k (H maps q to -e_k; k = the most likely class keeps 1 + q_k >= 1). logits (N, C), scale (N,) >= 0
    -> (N, C - 1, C)."""
    samples, classes = logits.shape
    q = torch.softmax(logits, dim=1).sqrt()
    if classes == 1:
        return logits.new_zeros(samples, 0, 1)
    top = q.argmax(dim=1)
    w = q.clone()
    w[torch.arange(samples, device=q.device), top] += 1
    denominator = 1 + q.gather(1, top.unsqueeze(1))  # (N, 1)
    reflection = torch.eye(classes, dtype=q.dtype, device=q.device) - w.unsqueeze(2) * (w / denominator).unsqueeze(1)
    keep = torch.ones(samples, classes, dtype=torch.bool, device=q.device)
    keep[torch.arange(samples, device=q.device), top] = False
    basis = reflection.transpose(1, 2)[keep].reshape(samples, classes - 1, classes)  # rows: H's columns j != k
    return basis * (q * scale.sqrt().unsqueeze(1)).unsqueeze(1)


def softmax_sampled_columns(logits, scale, uniforms):
    """Per draw m the class y that uniforms[n, m] picks from p = softmax(logits[n]) by inverse CDF (the first class
    whose cumulative probability exceeds u times the row's total, so rounding never reaches past the last class
    nor onto a class of probability 0), and the column sqrt(scale[n] / M) (p - e_y): (N, M, C)."""
    draws = uniforms.shape[1]
    probabilities = torch.softmax(logits, dim=1)
    cumulative = probabilities.cumsum(dim=1)
    drawn = torch.searchsorted(cumulative, uniforms * cumulative[:, -1:], right=True)  # (N, M)
    root = (scale / draws).sqrt().reshape(-1, 1, 1)
    columns = (probabilities * root[:, 0]).unsqueeze(1).expand(-1, draws, -1).clone()
    columns.scatter_add_(2, drawn.unsqueeze(2), (-root).expand(-1, draws, 1))
    return columns


def sigmoid_hessian_diag(logits, scale):
    # sigmoid(x) * sigmoid(-x) keeps its digits where 1 - sigmoid(x) would not.
    return scale * torch.sigmoid(logits) * torch.sigmoid(-logits)


# ---------------------------------------------------------------- losses
def mse_loss_hessian_diag(input, reduction="mean"):
    value = 2.0 / max(1, input.numel()) if _is_mean(reduction) else 2.0  # an empty input has no entries to fill
    return torch.full_like(input, value, memory_format=torch.contiguous_format)


def mse_loss_hessian_sqrt(input, reduction="mean"):
    return _diagonal_sqrt_factor(mse_loss_hessian_diag(input, reduction))


def cross_entropy_sample_scale(input, target, weight=None, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
    """Per-sample factor s_n with Hessian_n = s_n (diag(p_n) - p_n p_n^T)."""
    mean = _is_mean(reduction)
    if input.dim() != 2:
        raise ValueError(f"input must be (N, C) logits, got shape {tuple(input.shape)}")
    classes = input.shape[1]
    w = torch.ones(classes, dtype=input.dtype, device=input.device) if weight is None else weight.to(input.dtype)
    if target.is_floating_point():  # class probabilities
        smoothed = target.to(input.dtype) * (1 - label_smoothing) + label_smoothing / classes
        scale = (smoothed * w).sum(1)
        return scale / input.shape[0] if mean else scale
    valid = target != ignore_index
    torch._assert_async(
        ~(valid & ((target < 0) | (target >= classes))).any(),
        "cross_entropy_hessian: target holds a class index outside [0, C) that is not ignore_index",
    )
    target_weight = torch.where(valid, w[torch.where(valid, target, 0)], 0)
    scale = (1 - label_smoothing) * target_weight + label_smoothing * w.mean() * valid
    if not mean:
        return scale
    # samples that contribute nothing stay 0, also when every target is ignored (PyTorch's gradient is 0 there)
    return torch.where(scale == 0, torch.zeros_like(scale), scale / target_weight.sum())


def _check_nonnegative(scale, op):
    torch._assert_async(
        (scale >= 0).all(),
        f"{op}: a negative per-sample scale (negative weight, pos_weight or target "
        "probability) has no real square-root factor; use the _diag op",
    )


def cross_entropy_hessian_diag(input, target, weight=None, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
    scale = cross_entropy_sample_scale(input, target, weight, ignore_index, label_smoothing, reduction)
    return softmax_hessian_diag(input, scale)


def cross_entropy_hessian_sqrt(input, target, weight=None, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
    scale = cross_entropy_sample_scale(input, target, weight, ignore_index, label_smoothing, reduction)
    if weight is not None or target.is_floating_point():  # otherwise scale >= 0 by construction
        _check_nonnegative(scale, "cross_entropy_hessian_sqrt")
    return softmax_hessian_sqrt(input, scale)


def bce_with_logits_hessian_diag(input, target, weight=None, pos_weight=None, reduction="mean"):
    mean = _is_mean(reduction)
    if target.shape != input.shape:
        raise ValueError(f"target must have the shape of input {tuple(input.shape)}, got {tuple(target.shape)}")
    scale = torch.ones_like(input)
    if pos_weight is not None:
        scale = scale + (pos_weight.to(input.dtype) - 1) * target.to(input.dtype)
    if weight is not None:
        scale = scale * weight.to(input.dtype)
    if mean:
        scale = scale / input.numel()
    return sigmoid_hessian_diag(input, scale.expand_as(input))


def bce_with_logits_hessian_sqrt(input, target, weight=None, pos_weight=None, reduction="mean"):
    diag = bce_with_logits_hessian_diag(input, target, weight, pos_weight, reduction)
    if weight is not None or pos_weight is not None:  # otherwise diag >= 0 by construction
        _check_nonnegative(diag, "bce_with_logits_hessian_sqrt")
    return _diagonal_sqrt_factor(diag)


# ---------------------------------------------------------------- Hessian-backprop contractions
def factor_diagonal(factors, signs=None):
    """sum_v signs[n, v] factors[n, v, d]^2: the diagonal of S^T diag(signs) S, (N, D)."""
    squared = factors * factors
    if signs is not None:
        squared = squared * signs.unsqueeze(2)
    return squared.sum(1)


def affine_weight_diagonal(factors, signs, inputs, samples_per_chunk=8):
    """sum_n sum_v signs[n, v] (sum_p factors[n, v, o, p] inputs[n, k, p])^2, (O, K).

    factors (N, V, O, P), signs (N, V) or None, inputs (N, K, P). Chunked over samples so that
    the (n, v, o, k) products are never all in memory at once.
    """
    samples, _, out_channels, _ = factors.shape
    total = factors.new_zeros(out_channels, inputs.shape[1])
    for start in range(0, samples, samples_per_chunk):
        stop = min(samples, start + samples_per_chunk)
        products = torch.einsum("nvop,nkp->nvok", factors[start:stop], inputs[start:stop])
        squared = products * products
        if signs is not None:
            squared = squared * signs[start:stop, :, None, None]
        total = total + squared.sum(dim=(0, 1))
    return total


def selected_weight_diagonal(factors, signs, indices, inputs, per_sample=False, samples_per_chunk=8):
    """affine_weight_diagonal where output channel o of sample n uses only positions indices[n, o]:
    sum_n sum_v signs[n, v] (sum_q factors[n, v, o, q] inputs[n, k, indices[n, o, q]])^2, (O, K);
    (N, O, K) without the sum over n when per_sample.

    factors (N, V, O, Q), indices (N, O, Q), inputs (N, K, P).
    """
    samples, _, out_channels, selected = factors.shape
    parts = []
    total = factors.new_zeros(out_channels, inputs.shape[1])
    for start in range(0, samples, samples_per_chunk):
        stop = min(samples, start + samples_per_chunk)
        rows = inputs[start:stop].transpose(1, 2)  # (n, P, K)
        index = indices[start:stop].reshape(stop - start, -1, 1).expand(-1, -1, rows.shape[2])
        gathered = rows.gather(1, index).reshape(stop - start, out_channels, selected, rows.shape[2])  # (n, O, Q, K)
        products = torch.einsum("nvoq,noqk->nvok", factors[start:stop], gathered)
        squared = products * products
        if signs is not None:
            squared = squared * signs[start:stop, :, None, None]
        if per_sample:
            parts.append(squared.sum(1))
        else:
            total = total + squared.sum(dim=(0, 1))
    if per_sample:
        return torch.cat(parts) if parts else factors.new_zeros(0, out_channels, inputs.shape[1])
    return total


def channel_weight_diagonal(factors, signs, values):
    """sum_n sum_v signs[n, v] (sum_p factors[n, v, c, p] values[n, c, p])^2, (C,): the diagonal of a
    per-channel scale. factors (N, V, C, P), signs (N, V) or None, values (N, C, P)."""
    projected = torch.einsum("nvcp,ncp->nvc", factors, values)
    squared = projected * projected
    if signs is not None:
        squared = squared * signs.unsqueeze(2)
    return squared.sum(dim=(0, 1))
