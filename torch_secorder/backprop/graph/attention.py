"""nn.MultiheadAttention read as the ops it computes, so that its projections get the Linear rule.

PyTorch's forward (F.multi_head_attention_forward) branches on shapes, masks and fast paths that a symbolic
trace cannot follow. For the calls a vision or text transformer makes (no masks, or a causal one; projections of
equal size; no extra key/value biases; no attention dropout while training) the trace reads this function
instead: the input projection through F.linear, heads split and merged by reshapes, attention through
scaled_dot_product_attention (or an explicit softmax when the averaged weights are asked for), the output
projection through F.linear. The engine checks once per plan that the traced graph gives the model's own output
(trace.check_call), so a decomposition that differed from PyTorch's would make it step aside, never be wrong.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def decomposable(module, args, kwargs):
    """True when module(*args, **kwargs) is a call this decomposition computes exactly as PyTorch does."""
    if type(module) is not nn.MultiheadAttention or len(args) + len(kwargs) < 3:
        return False
    call = dict(zip(("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask"), args), **kwargs)
    options_plain = (
        call.get("key_padding_mask") is None
        and call.get("attn_mask") is None
        and isinstance(call.get("need_weights", True), bool)
        and isinstance(call.get("average_attn_weights", True), bool)
        and call.get("is_causal", False) is False
    )
    return (
        options_plain
        and module._qkv_same_embed_dim
        and module.bias_k is None
        and not module.add_zero_attn
        and not (module.training and module.dropout > 0)
    )


def multi_head_attention(
    module,
    query,
    key,
    value,
    key_padding_mask=None,
    need_weights=True,
    attn_mask=None,
    average_attn_weights=True,
    is_causal=False,
):
    """What module(query, key, value, ...) returns, written in ops the engine has rules for (see decomposable)."""
    if not module.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    heads, width = module.num_heads, module.head_dim
    weight, bias = module.in_proj_weight, module.in_proj_bias
    if query is key and key is value:  # self-attention: one projection, as PyTorch computes it
        q, k, v = F.linear(query, weight, bias).chunk(3, dim=-1)
    else:  # one use of the packed weight (a parameter used at one place): the blocks each tensor needs
        packed = F.linear(torch.cat([query, key, value], dim=1), weight, bias)
        first, second, size = query.shape[1], query.shape[1] + key.shape[1], module.embed_dim
        q, k, v = packed[:, :first, :size], packed[:, first:second, size : 2 * size], packed[:, second:, 2 * size :]
    q, k, v = (t.unflatten(-1, (heads, width)).transpose(1, 2) for t in (q, k, v))  # (N, heads, L, width)
    if need_weights:
        scores = (q * width**-0.5) @ k.transpose(-2, -1)
        probabilities = scores.softmax(dim=-1)
        attended = probabilities @ v
        averaged = probabilities.mean(dim=1) if average_attn_weights else probabilities
    else:
        attended = F.scaled_dot_product_attention(q, k, v)
        averaged = None
    merged = attended.transpose(1, 2).flatten(2)  # (N, L, heads * width)
    output = F.linear(merged, module.out_proj.weight, module.out_proj.bias)
    if not module.batch_first:
        output = output.transpose(0, 1)
    return output, averaged
