"""The second-order term of scaled_dot_product_attention in its inputs, in closed form.

Per sample and head, O = P V with P = softmax(S + M) row by row and S = scale Q K^T; g = dloss/dO. With
A = g V^T and a = P * (A - rowsum(P * A)) (dloss/dS), the Hessian of g . O in (Q, K, V) is, exactly:

- softmax, per row i: diag(a_i) - p_i a_i^T - a_i p_i^T in S, pulled to (Q, K) through the linear map
  dS = scale (dQ K^T + Q dK^T): one signed unit column per score (sqrt|a_ij| scale (k_j at q_i, q_i at k_j)) and
  one pair per row (J^T p_i, J^T a_i) of sign -1;
- V against (Q, K): the pair (d/d(Q, K) of dloss/dv_jc, e_jc) per entry of V; d/dS_ib of it is
  g_ic p_ib (delta_jb - p_ij);
- Q against K (S is bilinear): the pair (scale a[:, j] at q[:, e], e_je at k) per entry of K;
- nothing within V (the output is linear in it).

So attention costs L S unit columns and L + S (E + Ev) pairs per head, formed from the call's own tensors, instead
of the dense (L E + S E + S Ev)^2 block per head that batched double backwards would form and decompose
(residuals.py): a 3072 x 3072 block per head at width 64 over 16 tokens. Grouped-query attention (enable_gqa)
is read as keys and values repeated over their heads' groups: their columns are summed back over each group.
"""

import math

import torch

from ..curvature import index_chunks

_SIGNATURE = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def bound_call(args, kwargs):
    """{argument name: value} of a scaled_dot_product_attention call, or None where it has an argument this
    module does not know (a later PyTorch's)."""
    if len(args) > len(_SIGNATURE) or any(name not in _SIGNATURE for name in kwargs):
        return None
    call = dict(_DEFAULTS)
    call.update(zip(_SIGNATURE, args))
    call.update(kwargs)
    return call if all(name in call for name in ("query", "key", "value")) else None


def closed_form_applies(call):
    """True when the call is one whose term attention_terms computes: no dropout, queries, keys and values of
    (N, *heads, length, width) with the same batch and heads (or grouped heads with enable_gqa), a mask that is
    None, boolean or floating."""
    q, k, v, mask = call["query"], call["key"], call["value"], call["attn_mask"]
    if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in (q, k, v)):
        return False
    if not (isinstance(call["dropout_p"], (int, float)) and call["dropout_p"] == 0):
        return False
    if not isinstance(call["is_causal"], bool) or not isinstance(call["enable_gqa"], bool):
        return False
    if not (call["scale"] is None or isinstance(call["scale"], (int, float))):
        return False
    if mask is not None and not (
        isinstance(mask, torch.Tensor) and (mask.dtype == torch.bool or mask.is_floating_point())
    ):
        return False
    if call["is_causal"] and mask is not None:
        return False  # PyTorch refuses both
    if not (q.dim() == k.dim() == v.dim() >= 3) or k.shape[:-1] != v.shape[:-1] or q.shape[-1] != k.shape[-1]:
        return False
    scores = (*q.shape[:-1], k.shape[-2])
    if mask is not None and (mask.dim() > len(scores) or _broadcast(mask.shape, scores) != scores):
        return False  # a mask that would broadcast the output itself
    if q.shape[:-2] == k.shape[:-2]:
        return True
    grouped = call["enable_gqa"] and q.dim() == 4 and q.shape[0] == k.shape[0]
    return grouped and k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0


def _broadcast(*shapes):
    try:
        return tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError:
        return None


def term_columns(call):
    """The columns per sample the term sends down (pairs count twice): for the cost prediction."""
    q, k, v = call["query"], call["key"], call["value"]
    heads = math.prod(q.shape[1:-2])
    length, source, width, value_width = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    return heads * (length * source + 2 * (length + source * (width + value_width)))


def _probabilities(call, q, k):
    """(scale, P) with P (N, H, L, S) as the call computes it (rows with every score masked: zeros)."""
    scale = call["scale"] if call["scale"] is not None else 1 / math.sqrt(q.shape[-1])
    scores = scale * (q @ k.transpose(-2, -1))
    mask = call["attn_mask"]
    if call["is_causal"]:
        length, source = scores.shape[-2:]
        mask = torch.ones(length, source, dtype=torch.bool, device=scores.device).tril()
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, -math.inf)
        else:
            scores = scores + mask
    return scale, torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)


def attention_terms(call, output_grad, positions, max_columns, pair_columns):
    """Chunks (left, right, signs) of the term, as residuals.per_sample_hessian_terms gives them: left and right
    {input position: (N, V, features)}, right None for signed squares; positions: the input positions of the
    query, key and value (equal where one tensor is two of them)."""
    q, k, v = call["query"], call["key"], call["value"]
    samples = q.shape[0]
    q_shape, k_shape, v_shape = q.shape, k.shape, v.shape
    heads = math.prod(q.shape[1:-2])
    groups = heads // max(1, math.prod(k.shape[1:-2]))
    # (N, H, length, width), keys and values repeated over their group's heads
    q = q.reshape(samples, heads, *q.shape[-2:])
    k = k.reshape(samples, -1, *k.shape[-2:]).repeat_interleave(groups, dim=1)
    v = v.reshape(samples, -1, *v.shape[-2:]).repeat_interleave(groups, dim=1)
    g = output_grad.reshape(samples, heads, *output_grad.shape[-2:])
    scale, p = _probabilities(call, q.reshape(q_shape), k.reshape(*q_shape[:-2], *k.shape[-2:]))
    p = p.reshape(samples, heads, *p.shape[-2:])
    products = g @ v.transpose(-2, -1)  # A = g V^T
    a = p * (products - (p * products).sum(-1, keepdim=True))  # dloss/dS
    length, source, width, value_width = q.shape[2], k.shape[2], q.shape[3], v.shape[3]
    to_q, to_k, to_v = positions

    def placed(q_part=None, k_part=None):
        """{position: (N, V, features)} from parts over the repeated heads (N, V, H, rows, width)."""
        columns = {}
        if q_part is not None:
            columns[to_q] = q_part.reshape(samples, q_part.shape[1], -1)
        if k_part is not None:  # back to the key's own heads: a sum over each group
            k_part = k_part.reshape(samples, k_part.shape[1], -1, groups, source, width).sum(3)
            flat = k_part.reshape(samples, k_part.shape[1], -1)
            columns[to_k] = columns[to_k] + flat if to_k in columns else flat
        return columns

    def units(position, flat_index, count, size):
        unit = q.new_zeros(samples, count, size)
        unit[:, torch.arange(count, device=q.device), flat_index] = 1
        return {position: unit}

    # the softmax's diagonal: one signed unit column per score, sqrt|a_ij| scale (k_j at q_i, q_i at k_j)
    for chunk in index_chunks((a != 0).any(0).nonzero(), max_columns):
        h, i, j = chunk.unbind(1)
        count, rows = len(h), torch.arange(len(h), device=q.device)
        weight = a[:, h, i, j]  # (N, V)
        root = scale * weight.abs().sqrt().unsqueeze(2)
        q_part = q.new_zeros(samples, count, heads, length, width)
        k_part = q.new_zeros(samples, count, heads, source, width)
        q_part[:, rows, h, i] = root * k[:, h, j]
        k_part[:, rows, h, j] = root * q[:, h, i]
        yield placed(q_part, k_part), None, torch.sign(weight)

    def pulled_row(h, i, w):
        """J^T of w (N, V, S) placed on row i of head h's scores."""
        rows = torch.arange(len(h), device=q.device)
        q_part = q.new_zeros(samples, len(h), heads, length, width)
        k_part = q.new_zeros(samples, len(h), heads, source, width)
        q_part[:, rows, h, i] = scale * torch.einsum("nvs,nvse->nve", w, k[:, h])
        k_part[:, rows, h] = scale * w.unsqueeze(3) * q[:, h, i].unsqueeze(2)
        return placed(q_part, k_part)

    # the softmax's rank-two part per row: -(p_i a_i^T + a_i p_i^T)
    for chunk in index_chunks((a != 0).any(3).any(0).nonzero(), pair_columns):
        h, i = chunk.unbind(1)
        left, right = pulled_row(h, i, p[:, h, i]), pulled_row(h, i, a[:, h, i])
        yield left, right, -q.new_ones(samples, len(h))

    # values against queries and keys: one pair per entry (h, j, c) of the (repeated) values
    value_entries = torch.stack(
        torch.meshgrid(*[torch.arange(n, device=q.device) for n in (heads, source, value_width)], indexing="ij"), -1
    ).reshape(-1, 3)
    value_step = max(1, pair_columns * width // max(1, source + width))  # (N, V, L, S) weights per chunk
    for chunk in index_chunks(value_entries, value_step):
        h, j, c = chunk.unbind(1)
        count, rows = len(h), torch.arange(len(h), device=q.device)
        p_h = p[:, h]  # (N, V, L, S)
        w = g.transpose(2, 3)[:, h, c] * p.transpose(2, 3)[:, h, j]  # g_ic p_ij: (N, V, L)
        k_mean = p_h @ k[:, h]  # sum_b p_ib k_b: (N, V, L, E)
        q_part = q.new_zeros(samples, count, heads, length, width)
        q_part[:, rows, h] = scale * w.unsqueeze(3) * (k[:, h, j].unsqueeze(2) - k_mean)
        weighted_q = w.unsqueeze(3) * q[:, h]  # (N, V, L, E)
        k_rows = -torch.einsum("nvls,nvle->nvse", p_h, weighted_q)
        k_rows[:, rows, j] += weighted_q.sum(2)
        k_part = q.new_zeros(samples, count, heads, source, width)
        k_part[:, rows, h] = scale * k_rows
        flat = ((h // groups) * source + j) * value_width + c
        yield placed(q_part, k_part), units(to_v, flat, count, v_shape[1:].numel()), q.new_ones(samples, count)

    # queries against keys (the scores are bilinear): one pair per entry (h, j, e) of the (repeated) keys
    key_entries = (a != 0).any(2).any(0).nonzero()  # (h, j) with a score that carries a gradient
    key_entries = torch.cat(
        [key_entries.repeat_interleave(width, 0), torch.arange(width, device=q.device).repeat(len(key_entries), 1)
         .reshape(-1, 1)], 1,
    )  # fmt: skip
    for chunk in index_chunks(key_entries, pair_columns):
        h, j, e = chunk.unbind(1)
        count, rows = len(h), torch.arange(len(h), device=q.device)
        q_part = q.new_zeros(samples, count, heads, length, width)
        q_part.permute(1, 2, 4, 0, 3)[rows, h, e] = scale * a.transpose(2, 3)[:, h, j].transpose(0, 1)
        flat = ((h // groups) * source + j) * width + e
        yield placed(q_part), units(to_k, flat, count, k_shape[1:].numel()), q.new_ones(samples, count)


__all__ = ["attention_terms", "bound_call", "closed_form_applies", "term_columns"]
