"""nn.Conv1d/2d/3d: stride, padding (numbers or 'same'), dilation, groups; zero padding mode."""

import math
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..curvature import Curvature
from .columns import fold_columns, linear_transpose_columns
from .registry import Rule, register, unbatched_input_reason
from .shared_weight import (
    factor_weight_diagonal,
    pair_products_over_positions,
    pooled_bias_diagonal,
    pooled_weight_diagonal,
    shared_bias_diagonal,
    shared_weight_diagonal,
)

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_TRANSPOSE = {  # also the forward of ConvTranspose (conv_transpose.py)
    1: F.conv_transpose1d,
    2: F.conv_transpose2d,
    3: F.conv_transpose3d,
}


def unfold(module, x):
    """Input patches (N, C * prod(kernel), P), ordered like the flattened weight (C, kernel...).

    im2col (F.unfold) for 2-D convolutions with numeric padding; otherwise a convolution with
    one-hot kernels, which works for 1, 2 and 3 spatial dimensions and every stride / padding
    (also 'same') / dilation the module itself accepts."""
    channels, kernel = x.shape[1], module.kernel_size
    if len(kernel) == 2 and not isinstance(module.padding, str):
        return F.unfold(x, kernel, module.dilation, module.padding, module.stride)  # im2col, same ordering
    taps = 1
    for size in kernel:
        taps *= size
    one_hot = (
        torch.eye(taps, dtype=x.dtype, device=x.device)
        .reshape(taps, 1, *kernel)
        .repeat(channels, 1, *([1] * len(kernel)))
    )
    patches = _CONV[len(kernel)](x, one_hot, None, module.stride, module.padding, module.dilation, channels)
    return patches.reshape(x.shape[0], channels * taps, -1)


def tap_major_patches(module, x):
    """Input patches (N, P, taps, C): what each output position reads through each kernel tap, channels
    innermost. One strided copy of the padded input in channels-last layout: on CPU 3-25x cheaper than
    F.unfold's (N, C taps, P) plus the (N, P, K) copy the weight kernels read (measured on the benchmark CNN)."""
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    pads = _padding(module, kernel, dilation)
    channels_last = x.movedim(1, -1)  # (N, *spatial, C), a view
    if any(before or after for before, after in pads):  # zeros around, the input copied in once
        spatial = [size + before + after for size, (before, after) in zip(x.shape[2:], pads)]
        padded = x.new_zeros(x.shape[0], *spatial, x.shape[1])
        padded[(slice(None), *[slice(before, before + size) for size, (before, _) in zip(x.shape[2:], pads)])] = (
            channels_last
        )
    else:
        padded = channels_last.contiguous()
    out_sizes = [
        (size - d * (k - 1) - 1) // s + 1 for size, k, s, d in zip(padded.shape[1:-1], kernel, stride, dilation)
    ]
    steps = padded.stride()[1:-1]
    position_strides = [step * s for step, s in zip(steps, stride)]
    tap_strides = [step * d for step, d in zip(steps, dilation)]
    windows = padded.as_strided(
        (x.shape[0], *out_sizes, *kernel, x.shape[1]), (padded.stride(0), *position_strides, *tap_strides, 1)
    )
    return windows.reshape(x.shape[0], math.prod(out_sizes), math.prod(kernel), x.shape[1])


def _padding(module, kernel, dilation):
    """(before, after) zeros per spatial dimension, as the module pads ('same' puts the odd one after)."""
    if module.padding == "valid":
        return [(0, 0)] * len(kernel)
    if module.padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return [(total // 2, total - total // 2) for total in totals]
    return [(p, p) for p in module.padding]


def _weight_order(diagonal, taps, channels):
    """(..., O, taps * C) tap-major columns -> (..., O, C * taps), the flattened weight's order."""
    return diagonal.unflatten(-1, (taps, channels)).transpose(-1, -2).flatten(-2)


def _group_curvature(curvature, out_channels, positions, start, stop):
    """The curvature restricted to output channels [start, stop)."""
    if start == 0 and stop == out_channels:
        return curvature
    samples = curvature.samples
    shape = (stop - start, positions)
    if curvature.dense is not None:
        dense = curvature.dense.reshape(samples, out_channels, positions, out_channels, positions)
        dense = dense[:, start:stop, :, start:stop, :].reshape(samples, (stop - start) * positions, -1)
        return Curvature(shape, dense=dense)
    factors = diag = None
    if curvature.has_factors:
        width = curvature.width
        factors = curvature.factors.reshape(samples, width, out_channels, positions)[:, :, start:stop].reshape(
            samples, width, -1
        )
    if curvature.diag is not None:
        diag = curvature.diag.reshape(samples, out_channels, positions)[:, start:stop].reshape(samples, -1)
    return Curvature(shape, factors, curvature.signs, diag)


def _grouped_weight_diagonal(curvature, patches, groups, positions, per_sample):
    """The weight diagonal of a grouped convolution, every group at once: each (sample, group) pair is a sample of
    its own to the shared-weight formulas (RegNet's 46 groups were 46 Python calls). patches (N, P, taps, C),
    factors and diagonal (not dense) -> (N?, O, taps * C / groups), tap-major."""
    samples = patches.shape[0]
    taps, per_group_in = patches.shape[2], patches.shape[3] // groups
    out_channels = math.prod(curvature.feature_shape) // positions
    per_group_out = out_channels // groups
    inputs = patches.reshape(samples, positions, taps, groups, per_group_in).permute(0, 3, 2, 4, 1)
    inputs = inputs.reshape(samples * groups, taps * per_group_in, positions)  # (N G, K, P)
    total = None
    if curvature.has_factors:
        width = curvature.width
        factors = curvature.factors.reshape(samples, width, groups, per_group_out, positions).transpose(1, 2)
        factors = factors.reshape(samples * groups, width, per_group_out, positions)
        signs = None if curvature.signs is None else curvature.signs.repeat_interleave(groups, dim=0)
        total = factor_weight_diagonal(factors, signs, inputs, per_sample=True)  # (N G, O / G, K)
    if curvature.diag is not None:
        diag = curvature.diag.reshape(samples * groups, per_group_out, positions)
        term = torch.einsum("nop,nkp->nok", diag, inputs * inputs)
        total = term if total is None else total + term
    assert total is not None, "a curvature has factors, a diagonal or a dense form"
    total = total.reshape(samples, out_channels, -1)
    return total if per_sample else total.sum(0)


def batched_input_reason(module, x):
    """Convolutions (and their transposes) read axis 0 as the batch: an unbatched input must not reach the rule."""
    return unbatched_input_reason(x, dims=(len(module.kernel_size) + 2,))


# output positions up to which a convolution forms its pairs' products from the (N, O, P, P) couplings
PAIR_POSITIONS = 64


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(Rule):
    mixing = True
    forward_methods: Tuple[str, ...] = ("forward", "_conv_forward")

    def unsupported_reason(self, module):
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (only 'zeros' has an exact rule)"
        return None

    def unsupported_input_reason(self, module, x):
        return batched_input_reason(module, x)

    def param_diagonals(self, record, curvature, per_sample=False):
        module, x, z = record.module, record.input, record.output
        samples, out_channels = x.shape[0], module.out_channels
        positions = z[0].numel() // out_channels
        results = []
        leading = (samples,) if per_sample else ()
        if curvature.selection is not None and module.groups == 1:  # factors still on selections
            if record.wants(module.weight):
                patches = tap_major_patches(module, x)
                taps, channels = patches.shape[2:]
                inputs = patches.flatten(2).transpose(1, 2)  # (N, taps C, P), a view
                diag = pooled_weight_diagonal(curvature, inputs, out_channels, per_sample)
                diag = _weight_order(diag, taps, channels)
                results.append((module.weight, diag.reshape(*leading, *module.weight.shape)))
            if record.wants(module.bias):
                results.append((module.bias, pooled_bias_diagonal(curvature, out_channels, per_sample)))
            return results
        if record.wants(module.weight):
            patches = tap_major_patches(module, x)
            groups = module.groups
            taps, per_group_in = patches.shape[2], patches.shape[3] // groups
            per_group_out = out_channels // groups
            curvature = curvature.with_full_factors() if groups > 1 else curvature  # scattered once, not per group
            if groups > 1 and curvature.dense is None:
                diag = _grouped_weight_diagonal(curvature, patches, groups, positions, per_sample)
            else:  # one group, or a dense curvature: group by group
                blocks = []
                for g in range(groups):
                    start, stop = g * per_group_out, (g + 1) * per_group_out
                    part = _group_curvature(curvature, out_channels, positions, start, stop)
                    inputs = patches[..., g * per_group_in : (g + 1) * per_group_in].flatten(2).transpose(1, 2)
                    block = shared_weight_diagonal(part, inputs, per_group_out, False, per_sample=per_sample)
                    blocks.append(block)
                diag = torch.cat(blocks, len(leading))
            diag = _weight_order(diag, taps, per_group_in)  # tap-major columns, each group's the same way
            results.append((module.weight, diag.reshape(*leading, *module.weight.shape)))
        if record.wants(module.bias):
            bias = shared_bias_diagonal(curvature, x, positions, out_channels, False, per_sample)
            results.append((module.bias, bias))
        return results

    def forms_pairs(self, record):
        """pair_diagonals forms the products (one group, few output positions: a squeeze-excitation's 1x1
        convolutions on pooled maps), else the engine takes per-sample projections."""
        positions = record.output[0].numel() // record.module.out_channels
        return record.module.groups == 1 and positions <= PAIR_POSITIONS

    def pair_diagonals(self, record, left, right, signs, per_sample=False):
        """[(parameter, 2 sum_v s_v (B^T l_v)(B^T r_v))] for pairs of columns (N, V, O, *out) at the output, as
        the Linear rule forms them over positions (its patches the inputs): sum_{p, q} A[o, p, q] x_p x_q with
        A[o, p, q] = sum_v s_v l_vop r_voq, N O P^2 entries; None where forms_pairs is not."""
        if not self.forms_pairs(record):
            return None
        module, x = record.module, record.input
        samples, width, out_channels = left.shape[0], left.shape[1], module.out_channels
        patches = tap_major_patches(module, x)
        taps, channels = patches.shape[2:]
        inputs = patches.flatten(2)  # (N, P, taps C)
        signed = left.reshape(samples, width, out_channels, -1) * signs.reshape(samples, width, 1, 1)
        other = right.reshape(samples, width, out_channels, -1)
        weight, bias = pair_products_over_positions(signed, other, inputs, per_sample)
        leading = (samples,) if per_sample else ()
        results = []
        if record.wants(module.weight):
            weight = _weight_order(weight, taps, channels).reshape(*leading, *module.weight.shape)
            results.append((module.weight, weight))
        if module.bias is not None and record.wants(module.bias):
            results.append((module.bias, bias))
        return results

    def propagate(self, record, curvature, context):
        module, x = record.module, record.input
        spatial = len(module.kernel_size)
        if isinstance(module.padding, str):  # 'same' may pad unevenly: let autograd find the transpose

            def function(inp):
                return _CONV[spatial](
                    inp, module.weight, None, module.stride, module.padding, module.dilation, module.groups
                )

            yield from linear_transpose_columns(function, x, curvature, context.max_columns)
            return
        out_spatial = record.output.shape[2:]
        # the transposed convolution that lands exactly on the input size
        output_padding = [
            x.shape[2 + i]
            - (
                (out_spatial[i] - 1) * module.stride[i]
                - 2 * module.padding[i]
                + module.dilation[i] * (module.kernel_size[i] - 1)
                + 1
            )
            for i in range(spatial)
        ]

        def transpose(batch):  # (B, O, *out_spatial) -> (B, C, *in_spatial)
            return CONV_TRANSPOSE[spatial](
                batch,
                module.weight,
                None,
                module.stride,
                module.padding,
                output_padding,
                module.groups,
                module.dilation,
            )

        for columns, signs in curvature.signed_factor_chunks(context.max_columns):
            folded, unfold_back = fold_columns(columns)
            yield Curvature(x.shape[1:], unfold_back(transpose(folded.reshape(-1, *record.output.shape[1:]))), signs)
