"""Exact Hessian backpropagation through a chain of supported modules.

One forward pass records each module's input and output, one first-order
backward gives dloss/doutput where residual terms need it, then the curvature
goes from the loss down, each rule adding its parameters' exact diagonals.
"""

import dataclasses

import torch
import torch.nn as nn

from . import conv, conv_transpose, elementwise, embedding, linear, norm, pooling, structural  # noqa: F401  (they register their rules)
from .losses import recognise, unsupported_output_reason
from .origins import HESSIAN, output_origin
from ..core.validation import check_scalar_loss
from . import eligibility, graph
from .graph_engine import graph_hessian_diagonal
from .curvature import columns_within
from .diagonals import Diagonals
from .errors import Unsupported
from .registry import LayerRecord, PropagationContext, registered_base, rule_for, sample_param_diagonals


def flatten_chain(model, names=None):
    """The modules of a (nested) nn.Sequential in call order; a single module is a chain of one.
    A Sequential whose forward is not the plain chain (a subclass with its own forward, hooks) is
    refused: its children do not simply run one after another."""
    if not isinstance(model, nn.Sequential):
        return [model]
    reason = eligibility.container_reason(model)
    if reason is not None:
        raise Unsupported(f"{eligibility.describe_module(model, names)}: {reason}")
    return [leaf for child in model for leaf in flatten_chain(child, names)]


class GraphSupport:
    """What check_supported returns for a model the graph engine runs (not a chain)."""

    def __init__(self, plan, spec, model):
        self.plan, self.spec, self.model = plan, spec, model


class TracedChain(tuple):
    """(layers, loss spec) of a traced model whose graph is a chain, with the plan it was read from."""

    def __new__(cls, layers, spec, plan, model):
        chain = super().__new__(cls, (layers, spec))
        chain.plan, chain.model = plan, model
        return chain


def check_supported(model, loss_fn):
    """(layers, loss spec) for a chain, a GraphSupport for any other traceable model, or raises Unsupported
    naming the first module (or the loss, or the traced call) without an exact rule."""
    reason = eligibility.global_hook_reason()
    if reason is not None:
        raise Unsupported(reason)
    spec = recognise(loss_fn)
    if isinstance(spec, str):
        raise Unsupported(spec)
    names = eligibility.ModuleNames(model)
    layers = None
    try:
        layers = flatten_chain(model, names)
    except Unsupported:
        pass  # a Sequential with its own forward: traced below
    # NLL goes through the trace, which finds the model's final LogSoftmax (module or F.log_softmax)
    if spec.kind != "nll" and layers is not None and all(registered_base(module) is not None for module in layers):
        return _chain_plan(layers, spec, names)
    plan = graph.plan_for(model)
    if spec.kind == "nll":
        plan = _strip_log_softmax(plan)
        spec.log_softmax_dim = plan.log_softmax_dim
    if plan.is_chain():
        layers, spec = _chain_plan(graph.chain_modules(plan), spec, names)
        return TracedChain(layers, spec, plan, model)
    return GraphSupport(plan, spec, model)


def _strip_log_softmax(plan):
    """NLL is cross-entropy on the input of a final plain LogSoftmax(dim=1) (module or F.log_softmax)."""
    if "nll" in plan.variants:
        return plan.variants["nll"]
    node = plan.nodes[plan.output]
    module = getattr(node.op, "callee", None)
    fx_node = node.fx_node
    if module is not None:
        plain = (isinstance(module, nn.LogSoftmax)
                 and eligibility.module_reason(module, nn.LogSoftmax, ("forward",)) is None)
        dim = module.dim
    else:
        plain = (fx_node.target in (torch.log_softmax, nn.functional.log_softmax)
                 and fx_node.kwargs.get("dtype") is None and len(fx_node.args) <= 2)
        dim = fx_node.kwargs.get("dim", fx_node.args[1] if len(fx_node.args) > 1 else None)
    # the class axis is 1; dim=-1 is that axis only on (N, C) outputs, which the loss checks per call
    if not plain or dim not in (1, -1) or len(node.inputs) != 1:
        raise Unsupported("NLLLoss without a plain LogSoftmax(dim=1) as the model's last module")
    plan.variants["nll"] = dataclasses.replace(plan, nodes=plan.nodes[:plan.output], output=node.inputs[0],
                                               log_softmax_dim=dim, variants={}, validated=False)
    return plan.variants["nll"]


def curved_nodes(chain, inputs=None):
    """[(name, features per sample at its input or None)] for the nodes with a second-order term of their own
    (each an origin of that many columns); the features are counted with a forward pass when inputs are given."""
    if isinstance(chain, GraphSupport):
        nodes = [node for node in chain.plan.nodes
                 if node.activation and node.op.curved_possible and not getattr(node.op, "linear", False)]
        widths = _graph_widths(chain, inputs) if inputs is not None and nodes else {}
        return [(node.name, widths.get(node.name)) for node in nodes]
    layers, _ = chain
    widths, x = [], inputs
    with torch.no_grad():
        for module in layers:
            curved = rule_for(module).needs_output_grad(module)
            if curved:
                widths.append((type(module).__name__, None if x is None else x[0].numel()))
            x = None if x is None else module(x)
    return widths


def _graph_widths(chain, inputs):
    plan = chain.plan.for_call()
    with torch.no_grad():
        values = graph.forward(plan, chain.model, inputs)
    return {node.name: sum(values[name][0].numel() for name in node.input_names)
            for node in plan.nodes[:plan.output + 1] if node.activation and node.inputs}


def _chain_plan(layers, spec, names):
    seen_modules, seen_params = set(), set()
    for module in layers:
        # a module or parameter used twice couples layers: its Hessian has cross-layer terms
        own = [id(p) for p in eligibility.module_parameters(module)]
        if id(module) in seen_modules or any(p in seen_params for p in own):
            raise Unsupported(f"{eligibility.describe_module(module, names)}: parameters used at two places in the chain")
        seen_modules.add(id(module))
        seen_params.update(own)
        base = registered_base(module)
        if base is None:
            raise Unsupported(eligibility.describe_module(module, names))
        rule = rule_for(module)
        reason = eligibility.module_reason(module, base, rule.forward_methods) or rule.unsupported_reason(module)
        if reason is not None:
            raise Unsupported(f"{eligibility.describe_module(module, names)}: {reason}")
    return layers, spec


def backprop_hessian_diagonal(chain, loss_fn, inputs, targets, params, *, create_graph, memory_budget,
                              request=HESSIAN):
    """Exact diagonals for params (a list of model parameters), in their order, of the curvature `request`
    names (the Hessian by default; per sample: (N, *shape) each); chain is check_supported(model, loss_fn)."""
    if isinstance(chain, (GraphSupport, TracedChain)):
        graph.validate(chain.plan, chain.model, inputs)
    if isinstance(chain, GraphSupport):
        if create_graph:
            raise Unsupported("create_graph=True on a traced graph (only chains of modules)")
        return graph_hessian_diagonal(chain.plan.for_call(), chain.spec, chain.model, loss_fn, inputs, targets, params,
                                      memory_budget=memory_budget, request=request)
    layers, spec = chain
    rules = [rule_for(module) for module in layers]
    needs_grads = create_graph or (request.residuals and any(rule.needs_output_grad(module)
                                                             for rule, module in zip(rules, layers)))
    with torch.set_grad_enabled(needs_grads):  # ReLU networks need no first-order backward at all
        records, x = [], inputs
        for module, rule in zip(layers, rules):
            reason = rule.unsupported_input_reason(module, x)
            if reason is not None:
                raise Unsupported(f"{type(module).__name__} on {reason}")
            output, extras = rule.forward(module, x)
            records.append(LayerRecord(module, x, output, extras=extras))
            x = output
        if targets.is_floating_point() and targets.dtype != x.dtype:
            # as F.mse_loss does: the loss of the promoted targets (F.cross_entropy and BCE would round
            # parts of it to the targets' precision; the engine's numbers are the exact ones)
            targets = targets.to(x.dtype)
        reason = unsupported_output_reason(spec, x, targets)
        if reason is not None:
            raise Unsupported(reason)
        # The loss itself, once: its own checks (class indices in range, shapes) must fire here too.
        loss = loss_fn(torch.log_softmax(x, dim=1) if spec.kind == "nll" else x, targets)
        check_scalar_loss(loss, "loss_fn")
        if request.record_loss is not None:
            request.record_loss(loss.detach())
        samples = inputs.shape[0]
        diagonals = Diagonals(params, layers, samples if request.per_sample else None)
        if samples == 0:  # no samples: every Hessian entry is an empty sum
            return diagonals.result()
        needing = [index for index, rule in enumerate(rules) if request.residuals
                   and rule.needs_output_grad(layers[index]) and records[index].output.requires_grad]
        if needing:
            grads = torch.autograd.grad(loss, [records[i].output for i in needing], create_graph=create_graph,
                                        allow_unused=True)
            for index, grad in zip(needing, grads):
                records[index].output_grad = torch.zeros_like(records[index].output) if grad is None else grad
    if not create_graph:
        for record in records:
            record.input, record.output = record.input.detach(), record.output.detach()
            if record.output_grad is not None:
                record.output_grad = record.output_grad.detach()

    wanted_params = {id(p) for p in params if p.requires_grad}
    owners = [i for i, module in enumerate(layers)
              if any(id(p) in wanted_params for p in eligibility.module_parameters(module))]
    if not owners:
        return diagonals.result()
    for record in records:
        record.wanted = diagonals.wanted

    with torch.set_grad_enabled(create_graph):
        output = records[-1].output
        samples, features = output.shape[0], output.shape[1:].numel()
        curvature = output_origin(
            request, spec, output if create_graph else output.detach(), targets, loss_fn,
            diagonal_only=_diagonal_suffices(records, rules, owners[0], len(records)),
            max_columns=columns_within(samples, features, output.element_size(), memory_budget), memory_budget=memory_budget)
        curvature.primary = request.residuals  # no residuals anywhere below unless the Hessian is asked for
        contributions = sample_param_diagonals if request.per_sample else _summed_param_diagonals
        _propagate(records, rules, len(records) - 1, curvature, owners[0], diagonals.add, memory_budget, contributions)
    result = diagonals.result()
    return result if create_graph else [d.detach() for d in result]


def _diagonal_suffices(records, rules, lowest, index):
    """True when the modules from `lowest` up to below `index` read only diag(H) at their outputs, so what
    enters module index - 1 from above need only be diagonal-readable (the lowest module may mix: it
    propagates nothing; the others must keep H diagonal)."""
    return rules[lowest].reads_only_diagonal(records[lowest]) and all(
        not rules[j].mixing and rules[j].reads_only_diagonal(records[j]) for j in range(lowest + 1, index))


def _summed_param_diagonals(rule, record, curvature):
    return rule.param_diagonals(record, curvature)


def _propagate(records, rules, index, curvature, lowest, accumulate, memory_budget, contributions):
    """From the output of module `index` down to module `lowest`; pieces of a split curvature go down one by one.
    contributions(rule, record, curvature): the parameters' part, summed over samples or per sample."""
    while True:
        record, rule = records[index], rules[index]
        for param, value in contributions(rule, record, curvature):
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
        _propagate(records, rules, index - 1, first, lowest, accumulate, memory_budget, contributions)
        del first
        for piece in _chain(second, pieces):
            piece.primary = False
            _propagate(records, rules, index - 1, piece, lowest, accumulate, memory_budget, contributions)
        return


def _chain(head, rest):
    yield head
    yield from rest
