"""The generic method for what is not the plain summed Hessian: GGN and Fisher diagonals, and per-sample ones.

GGN / Fisher: with u = f(theta) - f(theta).detach() (zero, but carrying the model's graph) and the loss's
output curvature Lambda (the GGN's, or the Fisher's sampled columns), the pseudo-loss 1/2 u^T Lambda u has
the Hessian J^T Lambda J + (terms multiplied by u, which is exactly zero): its exact Hessian diagonal is
the GGN's (Fisher's) diagonal, found by the same batched double backward as the Hessian's.

Per sample: u is masked to one sample (the others' outputs held fixed), one pass per sample; the terms
sum to the batch's diagonal whenever the loss is a sum over samples (every supported reduction is).
"""

import torch

from ..backprop.losses import class_rows
from ..backprop.origins import fisher_columns
from .. import ops
from .generic import generic_hessian_diagonal

NLL_TOLERANCE = 1e-3  # |logsumexp| of log-probabilities, in the output's own precision


def generic_model_curvature(model, loss_fn, spec, input_tuple, targets, params, request, *, create_graph, strict,
                            chunk_size, memory_budget, progress):
    """model: the forward to call (the model, or a function that calls it)."""
    fisher = None
    if request.kind != "hessian" or request.per_sample:
        with torch.no_grad():  # one forward for what does not change between passes
            reference = model(*input_tuple)
    if request.kind != "hessian":
        _check_output(spec, reference)
    if request.kind.startswith("fisher"):
        fisher = fisher_columns(request, spec, reference, targets, loss_fn, nll_logits=False)  # drawn once

    def term(sample=None):
        output = model(*input_tuple)
        fixed = output.detach()
        live = output - fixed  # zero, differentiable
        if sample is not None:
            mask = torch.zeros(output.shape[0], *[1] * (output.dim() - 1), dtype=output.dtype, device=output.device)
            mask[sample] = 1
            live = live * mask
        if request.kind == "hessian":
            return loss_fn(fixed + live, targets)
        if fisher is not None:
            projections = torch.einsum("nmd,nd->nm", fisher, live.flatten(1))
            return 0.5 * (projections * projections).sum()
        return 0.5 * loss_quadratic_form(spec, output if create_graph else fixed, targets, live)

    options = dict(method="autograd", chunk_size=chunk_size, memory_budget=memory_budget)
    if not request.per_sample:
        return generic_hessian_diagonal(term, params, None, create_graph, strict, "loss_fn", progress=progress,
                                        **options)
    samples = reference.shape[0]
    total = samples * sum(p.numel() for p in params)
    results = []
    for sample in range(samples):
        done = sample * total // max(samples, 1)
        report = None if progress is None else (lambda d, t, done=done: progress(done + d, total))
        results.append(generic_hessian_diagonal(lambda: term(sample), params, None, create_graph, strict,
                                                "loss_fn", progress=report, **options))
    if not results:
        return [p.new_zeros(0, *p.shape).detach() for p in params]
    return [torch.stack(per_param) for per_param in zip(*results)]


def _check_output(spec, output):
    """NLL reads the model output as log-probabilities: the likelihood is softmax(output)."""
    if spec.kind != "nll":
        return
    if output.dim() < 2:
        raise ValueError(f"NLLLoss on outputs of shape {tuple(output.shape)} (no class axis)")
    gap = torch.logsumexp(output.detach(), dim=1).abs().max() if output.numel() else torch.tensor(0.0)
    if float(gap) > NLL_TOLERANCE:
        raise ValueError(f"NLLLoss: the model output is not log-probabilities (logsumexp over dim 1 is off 0 by up "
                         f"to {float(gap):.3g}); the GGN and Fisher read NLL as the likelihood softmax(output)")


def loss_quadratic_form(spec, output, targets, u):
    """sum_n u_n^T H_n u_n for the loss's per-sample Hessian H_n in the output (NLL: cross-entropy's at the
    log-probabilities, which gives the same GGN as splitting at the logits)."""
    options = spec.options
    if spec.kind == "mse":
        diag = ops.mse_loss_hessian_diag(output, options["reduction"])
        return (diag * u * u).sum()
    if spec.kind == "bce_with_logits":
        diag = ops.bce_with_logits_hessian_diag(output, targets, options["weight"], options["pos_weight"],
                                                options["reduction"])
        return (diag * u * u).sum()
    rows, row_targets, _ = class_rows(output, targets)
    scale = ops.cross_entropy_sample_scale(rows, row_targets, options["weight"], options["ignore_index"],
                                           options.get("label_smoothing", 0.0), options["reduction"])
    p, v = torch.softmax(rows, dim=1), class_rows(u, targets)[0]
    # u^T s (diag(p) - p p^T) u per row
    return (scale * ((p * v * v).sum(1) - (p * v).sum(1) ** 2)).sum()
