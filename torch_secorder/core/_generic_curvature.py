"""The generic method for what is not the plain summed Hessian: GGN and Fisher diagonals, and per-sample ones.

GGN / Fisher: with u = f(theta) - f(theta).detach() (zero, but carrying the model's graph) and the loss's
output curvature Lambda (the GGN's, or the Fisher's sampled columns), the pseudo-loss 1/2 u^T Lambda u has
the Hessian J^T Lambda J + (terms multiplied by u, which is exactly zero): its exact Hessian diagonal is
the GGN's (Fisher's) diagonal, found by the same batched double backward as the Hessian's.

Per sample: u is masked to one sample (the others' outputs held fixed), one pass per sample; the terms
sum to the batch's diagonal whenever the loss is a sum over samples (every supported reduction is).
"""

import torch

from ..losses import fisher_columns
from ._generic import generic_hessian_diagonal


def generic_model_curvature(model, loss_fn, loss, input_tuple, targets, params, request, options):
    """model: the forward to call (the model, or a function that calls it); loss: the recognised loss_fn;
    options: the call's CallOptions."""
    create_graph, strict, progress = options.create_graph, options.strict, options.progress
    fisher = None
    if request.kind != "hessian" or request.per_sample:
        with torch.no_grad():  # one forward for what does not change between passes
            reference = model(*input_tuple)
    if request.kind != "hessian":
        loss.check_model_output(reference)
    if request.kind.startswith("fisher"):
        fisher = fisher_columns(request, loss, reference, targets, loss_fn, nll_logits=False)  # drawn once

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
        # NLL: cross-entropy's form at the log-probabilities, which gives the same GGN as splitting at the logits
        return 0.5 * loss.quadratic_form(output if create_graph else fixed, targets, live)

    chunking = dict(method="autograd", chunk_size=options.chunk_size, memory_budget=options.memory_budget)
    if not request.per_sample:
        return generic_hessian_diagonal(
            term, params, None, create_graph, strict, "loss_fn", progress=progress, **chunking
        )
    samples = reference.shape[0]
    total = samples * sum(p.numel() for p in params)
    results = []
    for sample in range(samples):
        done = sample * total // max(samples, 1)
        report = None if progress is None else (lambda d, t, done=done: progress(done + d, total))
        results.append(
            generic_hessian_diagonal(
                lambda sample=sample: term(sample),
                params,
                None,
                create_graph,
                strict,
                "loss_fn",
                progress=report,
                **chunking,
            )
        )
    if not results:
        return [p.new_zeros(0, *p.shape).detach() for p in params]
    return [torch.stack(per_param) for per_param in zip(*results)]
