"""Elementwise activations and BatchNorm in eval mode: J = diag(f'), plus a residual diag(g * f'') for curved ones."""

import torch
import torch.nn as nn

from .registry import Rule, register, registered_base
from .shared_weight import channelwise_diagonal

# f'' = 0 almost everywhere: no residual term, no need for dloss/doutput.
PIECEWISE_LINEAR = (nn.ReLU, nn.LeakyReLU, nn.Hardtanh, nn.ReLU6)


def _closed_form(module, x, y, want_second):
    """(f'(x), f''(x) or None) for the common activations, from the input x and output y; None if not known
    here. want_second=False: f'' is not needed (the GGN has no residual) and comes back None."""
    if isinstance(module, nn.ReLU):
        return (x > 0).to(x.dtype), None
    if isinstance(module, nn.LeakyReLU):
        return torch.where(x > 0, torch.ones_like(x), torch.full_like(x, module.negative_slope)), None
    if isinstance(module, nn.Tanh):
        first = 1 - y * y
        return first, (-2 * y * first if want_second else None)
    if isinstance(module, nn.Sigmoid):
        first = y * (1 - y)
        return first, (first * (1 - 2 * y) if want_second else None)
    return None


def elementwise_derivatives(module, x, y, create_graph, want_second=True):
    """f'(x) and f''(x) of an elementwise module: closed forms where known, else by autograd (exact either way).
    want_second=False: f'' is not needed and comes back None."""
    known = _closed_form(module, x, y, want_second)
    if known is not None:
        return known
    with torch.enable_grad():
        inp = x if (create_graph and x.requires_grad) else x.detach().requires_grad_(True)
        out = module(inp.clone() if getattr(module, "inplace", False) else inp)
        (first,) = torch.autograd.grad(out.sum(), inp, create_graph=True)
        second = None
        if want_second and first.requires_grad and not isinstance(module, PIECEWISE_LINEAR):
            (second,) = torch.autograd.grad(first.sum(), inp, create_graph=create_graph, allow_unused=True)
    if not create_graph:
        first = first.detach()
        second = None if second is None else second.detach()
    return first, second


@register(nn.ReLU, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.GELU, nn.SiLU,
          nn.Mish, nn.LogSigmoid, nn.Hardtanh, nn.ReLU6, nn.Tanhshrink, nn.Softsign)
class ElementwiseRule(Rule):
    def needs_output_grad(self, module):
        return not isinstance(module, PIECEWISE_LINEAR)

    def reads_only_diagonal(self, record):
        return True  # diag(J H J + diag(r)) = f'^2 diag(H) + r

    def propagate(self, record, curvature, context):
        samples = record.input.shape[0]
        # the residual goes with the primary piece only (the GGN has none anywhere)
        first, second = elementwise_derivatives(record.module, record.input, record.output, torch.is_grad_enabled(),
                                                want_second=curvature.primary)
        result = curvature.reshaped(record.input.shape[1:]).scaled(first.reshape(samples, -1))
        if second is not None and curvature.primary:
            result = result.plus_residual((record.output_grad * second).reshape(samples, -1))
        yield result

    def residual_diagonal(self, record):
        """The residual g * f'' at the input, (N, D), or None where f'' = 0."""
        if not self.needs_output_grad(record.module) or record.output_grad is None:
            return None
        _, second = elementwise_derivatives(record.module, record.input, record.output, torch.is_grad_enabled())
        return None if second is None else (record.output_grad * second).reshape(record.input.shape[0], -1)


_BATCHED_DIMS = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}


@register(*_BATCHED_DIMS)
class BatchNormEvalRule(Rule):
    """y = weight * (x - running_mean) / sqrt(running_var + eps) + bias, per channel: affine in x."""

    per_sample_native = True

    def unsupported_reason(self, module):
        if module.training or not module.track_running_stats or module.running_mean is None:
            return "BatchNorm in training mode (batch statistics couple the samples); call model.eval()"
        return None

    def unsupported_input_reason(self, module, x):
        expected = _BATCHED_DIMS[registered_base(module)]
        return None if x.dim() in expected else f"an unbatched input of shape {tuple(x.shape)}"

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
            results.append((module.weight, channelwise_diagonal(
                curvature, normalized.reshape(x.shape[0], x.shape[1], -1), per_sample=per_sample)))
        if record.wants(module.bias):
            ones = x.new_ones(x.shape[0], x.shape[1], x[0, 0].numel())
            results.append((module.bias, channelwise_diagonal(curvature, ones, per_sample=per_sample)))
        return results

    def propagate(self, record, curvature, context):
        x = record.input
        _, scale = self._per_channel(record.module, x)
        yield curvature.scaled(scale.expand_as(x).reshape(x.shape[0], -1))
