"""What the engine will cost, in gradients of the same batch, predicted from one forward pass without gradients.

Every origin's columns (the loss's at the output, each curved node's at its inputs, a tied parameter's mixed term
at the input of each use another use feeds) are pulled down through the nodes below it, one sample at a time,
and each parameter's projections are formed on the way: a column costs about two forward passes of one sample
over the nodes it crosses. A gradient costs about three forward passes of the whole batch. So the engine costs
about

    (loss columns x F_all + sum over curved nodes o of columns_o x F_below(o)) x 2 / (3 F_all)  gradients,

F the multiply-adds of one sample's forward: for a layer with a weight, weight.numel() per output position; for
a matrix product or attention, the output times the contracted size; for the rest, the elements it writes. A
column from a curved node crosses the nodes before it in the graph's order (its ancestors, and a few others:
an upper bound). Measured against the engine on the benchmark models in benchmarks/results/cost_cpu.md.
"""

import math
from typing import Any, List, Tuple

import torch
import torch.nn as nn

from .graph import node_ops, trace
from .plan import origin_nodes
from .rules import rule_for

_CONTRACTING = {"matmul", "bmm", "mm", "einsum", "baddbmm", "addmm", "linear", "__matmul__"}


def predicted_gradients(plan: Any, inputs: tuple) -> Tuple[float, int]:
    """(the engine's predicted cost in gradients of this batch, its columns per sample) for an EnginePlan."""
    steps = _graph_steps(plan, inputs) if plan.layers is None else _chain_steps(plan, inputs)
    total = sum(step[0] for step in steps) or 1.0
    output = steps[-1][2] if steps else None
    loss_columns = _loss_columns(plan, output)
    work, below, columns = loss_columns * total, 0.0, loss_columns
    for flops, width, _ in steps:
        work += width * below  # a curved node's columns start at its input, below its own work
        columns += width
        below += flops
    return 2.0 * work / (3.0 * total), columns


def _loss_columns(plan: Any, output: Any) -> int:
    if not isinstance(output, torch.Tensor) or output.dim() == 0:
        return 1
    if plan.loss.class_axis:
        return (output.shape[1] - 1) * math.prod(output.shape[2:]) if output.dim() > 1 else 1
    return output[0].numel()


def _chain_steps(plan: Any, inputs: tuple) -> List[tuple]:
    """[(multiply-adds per sample, curved columns, output)] per layer of a chain, in order."""
    steps: List[tuple] = []
    x = inputs[0]
    with torch.no_grad():
        for module in plan.layers:
            y, _ = rule_for(module).forward(module, x)  # the module's forward without its hooks
            width = x[0].numel() if rule_for(module).needs_output_grad(module) else 0
            steps.append((_module_flops(module, y), width, y))
            x = y
    return steps


def _graph_steps(plan: Any, inputs: tuple) -> List[tuple]:
    graph = plan.graph.for_call()
    with torch.no_grad():
        values = trace.forward(graph, plan.model, inputs)
    steps: List[tuple] = []
    origins = set(origin_nodes(graph, plan.model))
    for index, node in enumerate(graph.nodes[: graph.output + 1]):
        value = values.get(node.name)
        if not node.activation or not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        read = [values[name] for name in node.input_names if isinstance(values.get(name), torch.Tensor)]
        curved = index in origins
        width = sum(x[0].numel() for x in read if x.is_floating_point() and x.dim() > 0) if curved else 0
        steps.append((_node_flops(node, value, read), width, value))
    return steps


def _node_flops(node: Any, value: torch.Tensor, read: List[torch.Tensor]) -> float:
    if isinstance(node.op, node_ops.ModuleOp):
        return _module_flops(node.op.module, value)
    name = str(getattr(node.fx_node.target, "__name__", node.fx_node.target))
    per_sample = value[0].numel() if value.dim() > 0 else 1
    if name in _CONTRACTING and read and read[0].dim() > 0:
        return float(per_sample * read[0].shape[-1])
    if "scaled_dot_product_attention" in name and len(read) >= 2:
        return float(2 * per_sample * read[1].shape[-2])
    return float(per_sample + sum(x[0].numel() for x in read if x.dim() > 0))


def _module_flops(module: nn.Module, output: torch.Tensor) -> float:
    per_sample = output[0].numel() if isinstance(output, torch.Tensor) and output.dim() > 0 else 1
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() >= 2 and not isinstance(module, nn.Embedding):
        return float(per_sample / weight.shape[0] * weight.numel())  # positions x a full weight each
    return float(per_sample)


__all__: Tuple[str, ...] = ("predicted_gradients",)
