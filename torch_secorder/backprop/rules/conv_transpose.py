"""nn.ConvTranspose1d/2d/3d (groups = 1): the adjoint of a convolution, linear in its input.

Its weight W (C_in, C_out, k...) meets column c (in the output space) through the patches of c
taken like a convolution with the same stride / padding / dilation would take them: the projection
is sum_p x[n, i, p] unfold(c)[n, (o, k), p], the convolution case with input and columns swapped."""

import types

import torch.nn as nn

from ... import ops
from .columns import linear_transpose_columns
from .conv import CONV_TRANSPOSE, batched_input_reason, unfold
from .registry import Rule, one_sample_at_a_time, register
from .shared_weight import shared_weight_diagonal


@register(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
class ConvTransposeRule(Rule):
    mixing = True

    def unsupported_reason(self, module):
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
        if module.groups != 1:
            return "groups > 1"
        return None

    def unsupported_input_reason(self, module, x):
        return batched_input_reason(module, x)

    def param_diagonals(self, record, curvature, per_sample=False):
        if per_sample:
            return one_sample_at_a_time(self, record, curvature)
        module, x, z = record.module, record.input, record.output
        samples, out_channels = x.shape[0], module.out_channels
        positions = z[0].numel() // out_channels
        results = []
        if record.wants(module.weight):
            geometry = types.SimpleNamespace(
                kernel_size=module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride
            )
            total = None
            for columns, signs in curvature.signed_factor_chunks(max(1, curvature.width or 1 << 62)):
                width = columns.shape[1]
                patches = unfold(geometry, columns.reshape(samples * width, *z.shape[1:]))  # (N V, O K, P_in)
                repeated = (
                    x.reshape(samples, 1, x.shape[1], -1)
                    .expand(-1, width, -1, -1)
                    .reshape(samples * width, 1, x.shape[1], -1)
                )
                flat_signs = None if signs is None else signs.reshape(samples * width, 1)
                part = ops.affine_weight_diagonal(repeated, flat_signs, patches)  # (C_in, O K)
                total = part if total is None else total + part
            assert total is not None  # the loop ran: at least one column chunk
            results.append((module.weight, total.reshape(module.weight.shape)))
        if record.wants(module.bias):
            ones = x.new_ones(samples, 1, positions)
            results.append(
                (module.bias, shared_weight_diagonal(curvature, ones, out_channels, positions_first=False)[:, 0])
            )
        return results

    def propagate(self, record, curvature, context):
        module = record.module
        output_padding = module.output_padding

        def function(inp):
            return CONV_TRANSPOSE[len(module.kernel_size)](
                inp, module.weight, None, module.stride, module.padding, output_padding, module.groups, module.dilation
            )

        yield from linear_transpose_columns(function, record.input, curvature, context.max_columns)
