"""BatchNorm1d/2d/3d in eval mode (running statistics): an affine map per channel, J = diag(scale)."""

import torch
import torch.nn as nn

from .registry import Rule, register, registered_base, unbatched_input_reason
from .shared_weight import channelwise_diagonal


class FunctionalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """The module of an F.batch_norm call (timm's BatchNormAct2d, say): any (N, C, ...) input, as the function
    takes; the graph engine puts the call's own tensors on it (functional.py)."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


_BATCHED_DIMS = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,), FunctionalBatchNorm: (2, 3, 4, 5)}


@register(*_BATCHED_DIMS)
class BatchNormEvalRule(Rule):
    """y = weight * (x - running_mean) / sqrt(running_var + eps) + bias, per channel: affine in x."""

    def unsupported_reason(self, module):
        if module.training or not module.track_running_stats or module.running_mean is None:
            return "BatchNorm in training mode (batch statistics couple the samples); call model.eval()"
        return None

    def unsupported_input_reason(self, module, x):
        return unbatched_input_reason(x, dims=_BATCHED_DIMS[registered_base(module)])

    def reads_only_diagonal(self, record):
        return record.input.dim() == 2  # one position per channel

    @staticmethod
    def _per_channel(module, x):
        shape = [1, -1] + [1] * (x.dim() - 2)
        inv_std = torch.rsqrt(module.running_var + module.eps).reshape(shape)
        normalized = (x - module.running_mean.reshape(shape)) * inv_std
        scale = inv_std if module.weight is None else inv_std * module.weight.reshape(shape)
        return normalized, scale

    def param_diagonals(self, record, curvature, per_sample=False):
        module, x = record.module, record.input
        results = []
        if record.wants(module.weight):
            normalized, _ = self._per_channel(module, x)
            results.append(
                (
                    module.weight,
                    channelwise_diagonal(
                        curvature, normalized.reshape(x.shape[0], x.shape[1], -1), per_sample=per_sample
                    ),
                )
            )
        if record.wants(module.bias):
            ones = x.new_ones(x.shape[0], x.shape[1], x[0, 0].numel())
            results.append((module.bias, channelwise_diagonal(curvature, ones, per_sample=per_sample)))
        return results

    def propagate(self, record, curvature, context):
        x = record.input
        _, scale = self._per_channel(record.module, x)
        yield curvature.scaled(scale.expand_as(x).reshape(x.shape[0], -1))
