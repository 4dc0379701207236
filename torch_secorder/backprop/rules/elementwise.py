"""Elementwise activations: J = diag(f'), plus a residual diag(g * f'') for curved ones."""

import torch
import torch.nn as nn

from .registry import Rule, register

# f'' = 0 almost everywhere: no residual term, no need for dloss/doutput.
PIECEWISE_LINEAR = (nn.ReLU, nn.LeakyReLU, nn.Hardtanh, nn.ReLU6, nn.Hardsigmoid)


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
    # the hard ones as PyTorch differentiates them (hardsigmoid_backward, hardswish_backward and its derivative);
    # autograd has no second derivative of hardsigmoid, so they must be closed forms
    if isinstance(module, nn.Hardsigmoid):
        return ((x > -3) & (x < 3)).to(x.dtype) / 6, None
    if isinstance(module, nn.Hardswish):
        first = torch.where(x < -3, torch.zeros_like(x), torch.where(x <= 3, x / 3 + 0.5, torch.ones_like(x)))
        second = ((x > -3) & (x < 3)).to(x.dtype) / 3 if want_second else None
        return first, second
    return None


def elementwise_derivatives(module, x, y, create_graph, want_second=True):
    """f'(x) and f''(x) of an elementwise module: closed forms where known, else by autograd (exact either way).
    want_second=False: f'' is not needed and comes back None."""
    known = _closed_form(module, x, y, want_second)
    if known is not None:
        return known
    with torch.enable_grad():
        inp = x if (create_graph and x.requires_grad) else x.detach().requires_grad_(True)
        out = module.forward(inp.clone() if getattr(module, "inplace", False) else inp)  # hooks ran in the forward
        (first,) = torch.autograd.grad(out.sum(), inp, create_graph=True)
        second = None
        if want_second and first.requires_grad and not isinstance(module, PIECEWISE_LINEAR):
            (second,) = torch.autograd.grad(first.sum(), inp, create_graph=create_graph, allow_unused=True)
    if not create_graph:
        first = first.detach()
        second = None if second is None else second.detach()
    return first, second


@register(
    nn.ReLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.LogSigmoid,
    nn.Hardtanh,
    nn.ReLU6,
    nn.Tanhshrink,
    nn.Softsign,
    nn.Hardsigmoid,
    nn.Hardswish,
)
class ElementwiseRule(Rule):
    def forward(self, module, x):
        output, extras = super().forward(module, x)
        if isinstance(module, nn.Hardsigmoid) and torch.is_grad_enabled() and x.requires_grad:
            # PyTorch's hardsigmoid_backward multiplies by 1/6 rounded to float32 (3e-8 off in float64): the
            # gradients the curved nodes below read must use the derivative the rule's Jacobian uses
            first, _ = _closed_form(module, x.detach(), None, want_second=False)
            output = output.detach() + (x - x.detach()) * first
        return output, extras

    def needs_output_grad(self, module):
        return not isinstance(module, PIECEWISE_LINEAR)

    def reads_only_diagonal(self, record):
        return True  # diag(J H J + diag(r)) = f'^2 diag(H) + r

    def propagate(self, record, curvature, context):
        samples = record.input.shape[0]
        # the residual goes with the primary piece only (the GGN has none anywhere)
        first, second = elementwise_derivatives(
            record.module, record.input, record.output, torch.is_grad_enabled(), want_second=curvature.primary
        )
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
