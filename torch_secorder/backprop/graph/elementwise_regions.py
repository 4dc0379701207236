"""Activations written as expressions, read as one elementwise function.

GPT-2's NewGELU is 0.5 * x * (1 + tanh(c * (x + 0.044715 * x^3))): a power, a tanh and a product of two
inputs, each a curved node of its own, each sending 4d columns per token down (the product as pairs). But the
whole expression is an elementwise function y = f(x) of one tensor, so its second-order term at x is diag(g * f''(x))
(g = dloss/dy): one unit column per element, or fewer where x comes from a widening Linear (folded_residuals.py).
A region is a set of nodes computing elementwise ops on tensors of one shape (elementwise modules, sums, products
and quotients, powers by a number) whose only input from outside is x and whose only value used outside is y;
f'(x) and f''(x) come from two backward passes through the region's own ops (exact: its Jacobian is diagonal).
"""

import operator
from dataclasses import dataclass
from typing import List

import torch

from ..rules.elementwise import ElementwiseRule
from . import node_ops

_ELEMENTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.pow,
}  # fmt: skip
_ELEMENTWISE_METHODS = {"add", "sub", "mul", "div", "neg", "pow", "__mul__", "__truediv__"}


@dataclass
class Region:
    source: int  # the node whose value x the region reads
    top: int  # the node whose value y leaves the region
    members: List[int]  # ascending


def _elementwise(node, shape, values):
    """True when the node is an elementwise op whose tensor inputs from the graph all have the output's shape."""
    op, fx_node = node.op, node.fx_node
    if op.prelude or node.params or node.value_shape != shape or not node.inputs:
        return False
    if isinstance(op, node_ops.ModuleOp):
        return isinstance(op.rule, ElementwiseRule) and not op.binds_tensors and len(node.input_names) == 1
    if type(op) not in (node_ops.GenericOp, node_ops.AddOp, node_ops.ProductOp):
        return False
    method = fx_node.op == "call_method"
    if not ((method and fx_node.target in _ELEMENTWISE_METHODS) or fx_node.target in _ELEMENTWISE_FUNCTIONS):
        return False
    if fx_node.target in (operator.pow, torch.pow, "pow") and not isinstance(
        fx_node.args[1] if len(fx_node.args) > 1 else None, (int, float)
    ):
        return False  # x ** y of two tensors, or a number to the power x: kept as they are
    return all(values[name].shape == torch.Size(shape) for name in node.input_names)


def find_regions(nodes, curved, values):
    """Regions (see the module) holding at least two curved nodes, grown from each curved node down."""
    users: dict = {}
    for index, node in enumerate(nodes):
        for source in node.inputs:
            users.setdefault(source, set()).add(index)
    regions, taken = [], set()
    for start in sorted(curved, reverse=True):
        node = nodes[start]
        if start in taken or node.value_shape is None or not _elementwise(node, node.value_shape, values):
            continue
        shape = node.value_shape
        top = start  # grow upwards through elementwise users (the expression's last ops: 0.5 * ...)
        while len(users.get(top, ())) == 1:
            (above,) = users[top]
            if above in taken or not _elementwise(nodes[above], shape, values) or len(nodes[above].inputs) != 1:
                break
            top = above
        members = {top}
        changed = True
        while changed:  # take in every input used only inside the region
            changed = False
            for member in list(members):
                for source in nodes[member].inputs:
                    if source in members or source in taken:
                        continue
                    if _elementwise(nodes[source], shape, values) and users.get(source, set()) <= members:
                        members.add(source)
                        changed = True
        outside = {s for m in members for s in nodes[m].inputs if s not in members}
        if len(outside) != 1 or len(members & set(curved)) < 2:
            continue
        taken |= members
        regions.append(Region(outside.pop(), top, sorted(members)))
    return regions


def second_derivative(nodes, region, values):
    """f''(x) of the region's function y = f(x), elementwise, (N, *shape)."""
    source = nodes[region.source].name
    with torch.enable_grad():
        x = values[source].detach().requires_grad_(True)
        local = dict(values)
        local[source] = x
        for index in region.members:
            node = nodes[index]
            if isinstance(node.op, node_ops.ModuleOp):
                local[node.name] = node.op.rule.forward(node.op.module, local[node.input_names[0]])[0]
            else:
                local[node.name] = node.op.function(node, local, [])()
        y = local[nodes[region.top].name]
        (first,) = torch.autograd.grad(y, x, torch.ones_like(y), create_graph=True)
        if not first.requires_grad:
            return torch.zeros_like(x)
        (second,) = torch.autograd.grad(first, x, torch.ones_like(first), allow_unused=True)
    return torch.zeros_like(x) if second is None else second.detach()


__all__ = ["Region", "find_regions", "second_derivative"]
