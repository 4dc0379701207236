"""What the engine will run for a model and loss: a chain of modules with rules, or a traced graph.

plan_model raises Unsupported naming the first module (or the loss, or the traced call) without an
exact rule; the plan it returns is what engine.run_plan takes.
"""

import dataclasses
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .._errors import Unsupported
from .._forward_hooks import global_hook_reason
from ..losses import Loss, recognise
from . import eligibility
from .graph import trace
from .graph.trace import GraphPlan
from .rules import registered_base, rule_for


@dataclass
class EnginePlan:
    """layers: the modules of a chain in call order (None: the graph engine runs the model). graph: the traced
    graph the plan was read from, checked against every call (None for an nn.Sequential of modules with
    rules, which runs as it is written)."""

    loss: Loss
    model: nn.Module
    layers: Optional[List[nn.Module]] = None
    graph: Optional[GraphPlan] = None

    @property
    def is_chain(self) -> bool:
        return self.layers is not None


def flatten_chain(model: nn.Module, names: Optional[eligibility.ModuleNames] = None) -> List[nn.Module]:
    """The modules of a (nested) nn.Sequential in call order; a single module is a chain of one.
    A Sequential whose forward is not the plain chain (a subclass with its own forward, hooks) is
    refused: its children do not simply run one after another."""
    if not isinstance(model, nn.Sequential):
        return [model]
    reason = eligibility.container_reason(model)
    if reason is not None:
        raise Unsupported(f"{eligibility.describe_module(model, names)}: {reason}")
    return [leaf for child in model for leaf in flatten_chain(child, names)]


def plan_model(model: nn.Module, loss_fn: Callable, inputs: Optional[tuple] = None) -> EnginePlan:
    """The EnginePlan for model and loss_fn, or raises Unsupported naming what has no exact rule. inputs (the
    call's positional inputs): a forward a symbolic trace cannot follow is traced with them."""
    reason = global_hook_reason()
    if reason is not None:
        raise Unsupported(reason)
    if isinstance(model, torch.jit.ScriptModule):
        raise Unsupported(
            "a TorchScript module (torch.jit.script / torch.jit.trace): its forward is compiled TorchScript, "
            "which the engine does not read; pass the Python module it was made from"
        )
    loss = recognise(loss_fn, functions=True)
    if isinstance(loss, str):
        raise Unsupported(loss)
    names = eligibility.ModuleNames(model)
    layers = None
    try:
        layers = flatten_chain(model, names)
    except Unsupported:
        pass  # a Sequential with its own forward: traced below
    # NLL goes through the trace, which finds the model's final LogSoftmax (module or F.log_softmax)
    if (
        not loss.reads_log_probabilities
        and loss.reading is None
        and layers is not None
        and all(registered_base(m) is not None and not eligibility.has_own_forward(m) for m in layers)
        and not _shares_parameters(layers)
    ):
        return EnginePlan(loss, model, _checked_chain(layers, names))
    if loss.reading is not None:
        model = _reading_model(model, loss)
    graph = trace.plan_for(model, inputs)
    if loss.reads_log_probabilities:
        graph = _strip_log_softmax(graph)
        assert graph.log_softmax_dim is not None  # what the stripped plan stops below
        loss.log_softmax_dim = graph.log_softmax_dim
    if graph.is_chain() and not _shares_parameters(trace.chain_modules(graph)):
        return EnginePlan(loss, model, _checked_chain(trace.chain_modules(graph), names), graph)
    return EnginePlan(loss, model, None, graph)


class ReadOutput(nn.Module):
    """The model followed by what its loss function does to the output before the loss call (losses/reading.py):
    the engine differentiates those ops as part of the model. Where the loss call took the batch folded into rows,
    cross-entropy's class axis goes to 1 and the positions after it (the same loss, one batch row per sample)."""

    def __init__(self, model: nn.Module, reading: Any, class_axis: bool):
        super().__init__()
        self.model, self.reading, self.class_axis = model, reading, class_axis

    def forward(self, *inputs: Any) -> Any:
        output = self.model(*inputs)
        for kind, key in self.reading.path:  # out.logits, out["logits"], out[0] (a ModelOutput's first field)
            output = getattr(output, key) if kind == "attribute" else output[key]
        if self.reading.output_ops is not None:
            output = self.reading.output_ops(output)
        if self.reading.rows and self.class_axis:
            output = self.reading.per_sample(output)
        return output


# model -> {the reading's code and layout: its ReadOutput}: one per model and loss-function ops (the plan cache's key)
_READ_OUTPUTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _reading_model(model: nn.Module, loss: Loss) -> nn.Module:
    assert loss.reading is not None
    key = (loss.reading.code, loss.reading.path, loss.class_axis)
    wrappers = _READ_OUTPUTS.setdefault(model, {})
    if key not in wrappers:
        wrappers[key] = ReadOutput(model, loss.reading, loss.class_axis)
    return wrappers[key]


def _strip_log_softmax(graph: GraphPlan) -> GraphPlan:
    """NLL is cross-entropy on the input of a final plain LogSoftmax(dim=1) (module or F.log_softmax)."""
    if "nll" in graph.variants:
        return graph.variants["nll"]
    node = graph.nodes[graph.output]
    module = getattr(node.op, "callee", None)
    fx_node = node.fx_node
    if module is not None:
        plain = (
            isinstance(module, nn.LogSoftmax) and eligibility.module_reason(module, nn.LogSoftmax, ("forward",)) is None
        )
        dim = module.dim
    else:
        plain = (
            fx_node.target in (torch.log_softmax, nn.functional.log_softmax)
            and fx_node.kwargs.get("dtype") is None
            and len(fx_node.args) <= 2
        )
        dim = fx_node.kwargs.get("dim", fx_node.args[1] if len(fx_node.args) > 1 else None)
    # the class axis is 1; dim=-1 is that axis only on (N, C) outputs, which the loss checks per call
    if not plain or dim not in (1, -1) or len(node.inputs) != 1:
        raise Unsupported("NLLLoss without a plain LogSoftmax(dim=1) as the model's last module")
    graph.variants["nll"] = dataclasses.replace(
        graph,
        nodes=graph.nodes[: graph.output],
        output=node.inputs[0],
        log_softmax_dim=dim,
        variants={},
        validated=False,
    )
    return graph.variants["nll"]


def _shares_parameters(layers: List[nn.Module]) -> bool:
    """A module or parameter used at two places: the graph engine adds its projections over the uses."""
    seen: set = set()
    for module in layers:
        own = {id(module)} | {id(p) for p in eligibility.module_parameters(module)}
        if own & seen:
            return True
        seen |= own
    return False


def _checked_chain(layers: List[nn.Module], names: eligibility.ModuleNames) -> List[nn.Module]:
    """The layers when each has a rule matching its forward (a chain whose layers share parameters is a graph:
    _shares_parameters sends it there first)."""
    for module in layers:
        base = registered_base(module)
        if base is None:
            raise Unsupported(eligibility.describe_module(module, names))
        rule = rule_for(module)
        reason = eligibility.module_reason(module, base, rule.forward_methods, hooks_run=True)
        reason = reason or rule.unsupported_reason(module)
        if reason is not None:
            raise Unsupported(f"{eligibility.describe_module(module, names)}: {reason}")
    return layers


def has_own_term(node: Any) -> bool:
    """A graph node that may add a second-order term of its own (an origin of columns)."""
    return bool(node.op.curved_possible and not getattr(node.op, "linear", False))


def origin_nodes(graph: GraphPlan, model: nn.Module) -> List[int]:
    """The indices of the graph's nodes that are origins of columns for the Hessian: those with a second-order
    term of their own, and the uses of a trainable parameter fed by another of its uses (their mixed term)."""
    by_name = dict(model.named_parameters(remove_duplicate=False))
    trainable = {id(p) for p in by_name.values() if p.requires_grad}
    tied = {index for _, _, index in trace.tied_uses(graph.nodes[: graph.output + 1], by_name, trainable)}
    return [i for i, node in enumerate(graph.nodes) if node.activation and (has_own_term(node) or i in tied)]


def curved_nodes(plan: EnginePlan, inputs: Optional[Any] = None) -> List[Tuple[str, Optional[int]]]:
    """[(name, features per sample at its input or None)] for the nodes with a second-order term of their own
    or a tied parameter's mixed term (each an origin of that many columns); the features are counted with a
    forward pass when inputs are given."""
    if plan.layers is None:
        assert plan.graph is not None
        nodes = [plan.graph.nodes[i] for i in origin_nodes(plan.graph, plan.model)]
        if inputs is None or not nodes:
            return [(node.name, None) for node in nodes]
        counted = _graph_widths(plan.graph, plan.model, inputs)  # floating-point nodes only: masks have no term
        return [(node.name, counted[node.name]) for node in nodes if node.name in counted]
    widths: List[Tuple[str, Optional[int]]] = []
    x = inputs[0] if isinstance(inputs, tuple) else inputs
    with torch.no_grad():
        for module in plan.layers:
            if rule_for(module).needs_output_grad(module):
                widths.append((type(module).__name__, None if x is None else x[0].numel()))
            x = None if x is None else module(x)
    return widths


def _graph_widths(cached: GraphPlan, model: nn.Module, inputs: Any) -> Dict[str, int]:
    graph = cached.for_call()
    with torch.no_grad():
        values = trace.forward(graph, model, inputs)
    return {
        node.name: sum(values[name][0].numel() for name in node.input_names if values[name].is_floating_point())
        for node in graph.nodes[: graph.output + 1]
        if node.activation
        and node.inputs
        and isinstance(values[node.name], torch.Tensor)
        and values[node.name].is_floating_point()
    }
