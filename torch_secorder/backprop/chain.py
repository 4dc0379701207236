"""Exact Hessian backpropagation through a chain of modules with rules.

One forward pass records each module's input and output, one first-order backward gives dloss/doutput
where residual terms need it, then the curvature goes from the loss down, each rule adding its
parameters' exact diagonals. Unlike the graph engine, rules here may pick dense or diagonal forms and
split the curvature into pieces (PropagationContext), and create_graph=True keeps the result differentiable.
"""

from typing import Callable, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from .._errors import Unsupported
from .._forward_pass import library_forward
from ..losses import CurvatureRequest
from . import eligibility
from .curvature import Curvature, columns_within
from .diagonals import Diagonals
from .gradients import Gradients, backward_with
from .loss_step import add_parameter_terms, evaluate_loss, output_origin
from .plan import EnginePlan
from .rules import LayerRecord, PropagationContext, Rule, rule_for


def chain_diagonals(
    plan: EnginePlan,
    loss_fn: Callable,
    inputs: Tensor,
    targets: Tensor,
    params: List[Tensor],
    *,
    create_graph: bool,
    memory_budget: int,
    request: CurvatureRequest,
    gradients: Optional[Gradients] = None,
) -> Tuple[Tensor, List[Tensor]]:
    """(loss, [diagonal per parameter in params]) for a chain plan (plan.layers); gradients: filled with the
    loss's gradient in its parameters, from the same forward."""
    layers = plan.layers
    assert layers is not None, "the chain engine runs chain plans"
    rules = [rule_for(module) for module in layers]
    needs_grads = (
        create_graph
        or gradients is not None
        or (request.residuals and any(rule.needs_output_grad(module) for rule, module in zip(rules, layers)))
    )
    with torch.set_grad_enabled(needs_grads):  # ReLU networks need no first-order backward at all
        records, x = [], inputs
        with library_forward():  # a forward hook that puts a gradient hook on an activation: not part of the loss
            for module, rule in zip(layers, rules):
                reason = rule.unsupported_input_reason(module, x)
                if reason is not None:
                    raise Unsupported(f"{type(module).__name__} on {reason}")
                output, extras = eligibility.forward_with_hooks(rule, module, x, lambda m=module: type(m).__name__)
                records.append(LayerRecord(module, x, output, extras=extras))
                x = output
        loss, targets = evaluate_loss(plan.loss, loss_fn, x, targets)
        samples = inputs.shape[0]
        diagonals = Diagonals(params, layers, samples if request.per_sample else None)
        add_parameter_terms(plan.loss, x, targets, diagonals)
        if samples == 0:  # no samples: every Hessian entry is an empty sum
            backward_with(loss, [], gradients)
            return loss, diagonals.result()
        needing = [
            index
            for index, rule in enumerate(rules)
            if request.residuals and rule.needs_output_grad(layers[index]) and records[index].output.requires_grad
        ]
        grads = backward_with(loss, [records[i].output for i in needing], gradients, create_graph)
        if needing:
            for index, grad in zip(needing, grads):
                records[index].output_grad = torch.zeros_like(records[index].output) if grad is None else grad
    if not create_graph:
        for record in records:
            record.input, record.output = record.input.detach(), record.output.detach()
            if record.output_grad is not None:
                record.output_grad = record.output_grad.detach()

    wanted_params = {id(p) for p in params if p.requires_grad}
    owners = [
        i
        for i, module in enumerate(layers)
        if any(id(p) in wanted_params for p in eligibility.module_parameters(module))
    ]
    if not owners:
        return loss, diagonals.result()
    for record in records:
        record.wanted = diagonals.wanted

    with torch.set_grad_enabled(create_graph):
        output = records[-1].output
        samples, features = output.shape[0], output.shape[1:].numel()
        curvature = output_origin(
            request,
            plan.loss,
            output if create_graph else output.detach(),
            targets,
            loss_fn,
            diagonal_only=_diagonal_suffices(records, rules, owners[0], len(records)),
            max_columns=columns_within(samples, features, output.element_size(), memory_budget),
            memory_budget=memory_budget,
        )
        curvature.primary = request.residuals  # no residuals anywhere below unless the Hessian is asked for
        _propagate(
            records, rules, len(records) - 1, curvature, owners[0], diagonals.add, memory_budget, request.per_sample
        )
    result = diagonals.result()
    return loss, (result if create_graph else [d.detach() for d in result])


def _diagonal_suffices(records: List[LayerRecord], rules: List[Rule], lowest: int, index: int) -> bool:
    """True when the modules from `lowest` up to below `index` read only diag(H) at their outputs, so what
    enters module index - 1 from above need only be diagonal-readable (the lowest module may mix: it
    propagates nothing; the others must keep H diagonal)."""
    return rules[lowest].reads_only_diagonal(records[lowest]) and all(
        not rules[j].mixing and rules[j].reads_only_diagonal(records[j]) for j in range(lowest + 1, index)
    )


def _propagate(
    records: List[LayerRecord],
    rules: List[Rule],
    index: int,
    curvature: Curvature,
    lowest: int,
    accumulate: Callable[[Tensor, Tensor], None],
    memory_budget: int,
    per_sample: bool,
) -> None:
    """From the output of module `index` down to module `lowest`; pieces of a split curvature go down one by one.
    The parameters' diagonals are summed over the samples, or kept per_sample."""
    while True:
        record, rule = records[index], rules[index]
        for param, value in rule.param_diagonals(record, curvature, per_sample=per_sample):
            accumulate(param, value)
        if index <= lowest:
            return
        samples = record.input.shape[0]
        features = max(record.input.shape[1:].numel(), record.output.shape[1:].numel())
        context = PropagationContext(
            max_columns=columns_within(samples, features, record.input.element_size(), memory_budget),
            mixing_below=any(rules[j].mixing for j in range(lowest + 1, index)),
            diagonal_only=_diagonal_suffices(records, rules, lowest, index),
        )
        pieces = iter(rule.propagate(record, curvature, context))
        first = next(pieces)
        first.primary = curvature.primary  # rules build new curvatures: the flag is the engine's to keep
        second = next(pieces, None)
        if second is None:
            curvature, index = first, index - 1
            continue
        # Pieces go down one at a time; only the first may carry residuals from below.
        _propagate(records, rules, index - 1, first, lowest, accumulate, memory_budget, per_sample)
        del first
        for piece in _chain(second, pieces):
            piece.primary = False
            _propagate(records, rules, index - 1, piece, lowest, accumulate, memory_budget, per_sample)
        return


def _chain(head: Curvature, rest: Iterator[Curvature]) -> Iterator[Curvature]:
    yield head
    yield from rest
