"""Which curvature the engines compute, and the columns it starts from at the model output.

    hessian           the loss's per-sample Hessian in the output, plus every curved node's second-order term
    ggn               the loss's per-sample Hessian in the output only (J^T H J: positive semi-definite for
                      convex losses)
    fisher_mc         sampled gradients of the model's likelihood: y ~ p(y | f_n), column sqrt(s_n / M) grad_f
                      (-log p(y | f_n)); their outer products average to the GGN's output curvature
    fisher_empirical  the observed gradients: column sqrt(F) dL/df_n (F the loss's mean normaliser), so that
                      the result is F^-1 sum_n g_n g_n^T for the per-sample gradients g_n of the summed loss

All but the Hessian start from the loss alone; per_sample keeps each sample's contribution apart.
"""

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .. import ops
from .curvature import Curvature
from .losses import class_rows, output_curvature

@dataclass(frozen=True)
class CurvatureRequest:
    kind: str = "hessian"
    per_sample: bool = False
    mc_samples: int = 1
    generator: Optional[torch.Generator] = None
    record_loss: Optional[Callable] = field(default=None, compare=False)  # called with the loss the engine computed

    @property
    def residuals(self):
        """True when curved nodes add their own second-order terms (the Hessian only)."""
        return self.kind == "hessian"


HESSIAN = CurvatureRequest()


def output_origin(request, spec, output, targets, loss_fn, **options):
    """The curvature the request starts from at the model output (for nll: at the LogSoftmax input)."""
    if request.kind in ("hessian", "ggn"):
        return output_curvature(spec, output, targets, **options)
    return Curvature(output.shape[1:], factors=fisher_columns(request, spec, output, targets, loss_fn))


def fisher_columns(request, spec, output, targets, loss_fn, nll_logits=True):
    """(N, M, D) columns whose outer products are the Fisher's curvature at the output, D = output[0].numel().
    The generic method calls this too, on the model's own output (log-probabilities for NLL: their softmax
    is the same distribution, and NLL's gradient through it is the same vector in parameter space);
    nll_logits: for NLL, output holds the logits the engine split the final LogSoftmax from."""
    samples, features = output.shape[0], math.prod(output.shape[1:])
    if samples == 0:  # no samples: no columns (the sums they feed are empty)
        return output.new_zeros(0, 1, features)
    if request.kind == "fisher_empirical":
        with torch.enable_grad():
            leaf = output.detach().requires_grad_(True)
            loss = loss_fn(torch.log_softmax(leaf, dim=1) if spec.kind == "nll" and nll_logits else leaf, targets)
            (grad,) = torch.autograd.grad(loss, leaf)
        return (grad * mean_normaliser(spec, output, targets) ** 0.5).reshape(samples, 1, features)
    draws, generator = request.mc_samples, request.generator
    output = output.detach()
    if spec.kind == "mse":
        noise = torch.randn(samples, draws, features, dtype=output.dtype, device=output.device,
                            generator=generator)
        return noise * (2.0 / (mean_normaliser(spec, output, targets) * draws)) ** 0.5
    if spec.kind == "bce_with_logits":
        return _bernoulli_columns(spec, output, targets, draws, generator)
    return _categorical_columns(spec, output, targets, draws, generator)


def mean_normaliser(spec, output, targets):
    """What reduction='mean' divides the summed loss by (1 for 'sum'): elements for MSE and BCE, counted
    samples (times positions) for cross-entropy and NLL, the targets' summed class weights when weighted."""
    options = spec.options
    if options["reduction"] == "sum":
        return 1.0
    if spec.kind in ("mse", "bce_with_logits") or targets.is_floating_point():
        return float(output.numel() // (1 if spec.kind in ("mse", "bce_with_logits") else output.shape[1]))
    valid = targets != options["ignore_index"]
    if options["weight"] is None:
        return float(valid.sum())
    return float(options["weight"][targets[valid]].sum())


def _bernoulli_columns(spec, output, targets, draws, generator):
    """y ~ Bernoulli(sigmoid(f)) per element; the loss's per-element Hessian is h sigmoid'(f) with h the
    weight (times pos_weight y + 1 - y): columns sqrt(h / M) (sigmoid(f) - y)."""
    options = spec.options
    samples, features = output.shape[0], math.prod(output.shape[1:])
    weight = torch.ones_like(output)
    if options["weight"] is not None:
        weight = weight * options["weight"]
    if options["pos_weight"] is not None:
        weight = weight * (options["pos_weight"] * targets + 1 - targets)
    weight = weight / mean_normaliser(spec, output, targets)
    if bool((weight < 0).any()):
        raise ValueError("model_fisher_diagonal(kind='mc'): the loss has negative weights (no likelihood to sample)")
    probability = torch.sigmoid(output).reshape(samples, 1, features).expand(-1, draws, -1)
    sampled = torch.bernoulli(probability, generator=generator)
    return (probability - sampled) * (weight.reshape(samples, 1, features) / draws).sqrt()


def _categorical_columns(spec, output, targets, draws, generator):
    """y ~ softmax(f) per sample (per position on (N, C, d1, ...) outputs): columns sqrt(s / M) (p - e_y), with
    s the loss's own per-sample Hessian scale (reduction, class weight of the target, ignore_index)."""
    options = spec.options
    samples, classes = output.shape[:2]
    rows, row_targets, positions = class_rows(output, targets)
    scale = ops.cross_entropy_sample_scale(rows, row_targets, options["weight"], options["ignore_index"],
                                           options.get("label_smoothing", 0.0), options["reduction"])
    # without class weights, class-index targets give scales >= 0 by construction: no check (and no sync)
    if (options["weight"] is not None or row_targets.is_floating_point()) and bool((scale < 0).any()):
        raise ValueError("model_fisher_diagonal(kind='mc'): the loss has negative class weights or target "
                         "probabilities (no likelihood to sample)")
    if rows.shape[0] == 0:
        return output.new_zeros(samples, draws, classes * positions)
    # one uniform number per draw, the classes drawn from it by inverse CDF inside the op (ops.py)
    uniforms = torch.rand(rows.shape[0], draws, dtype=rows.dtype, device=rows.device, generator=generator)
    columns = ops.softmax_sampled_columns(rows, scale, uniforms)  # (N P, M, C)
    # (N, P, M, C) -> (N, M, C, P): one column per draw over every position (positions are drawn independently,
    # so the cross terms between positions average to zero)
    return columns.reshape(samples, positions, draws, classes).permute(0, 2, 3, 1).reshape(samples, draws,
                                                                                           classes * positions)
