"""What the engine's work is made of, counted on one forward pass: the columns each origin sends down and where
they start, and one sample's multiply-adds at each node. cost.py prices them; merges.py chooses its cuts from
them."""

import math
from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn

from . import attention_terms, elementwise_regions, folded_residuals, node_ops

_CONTRACTING = {"matmul", "bmm", "mm", "einsum", "baddbmm", "addmm", "linear", "__matmul__"}


def loss_columns_of(loss: Any, output: Any) -> int:
    """The columns per sample a loss (a recognised Loss) sends down from this output."""
    if not isinstance(output, torch.Tensor) or output.dim() == 0:
        return 1
    terms = len(getattr(loss, "terms", ())) or 1  # a sum of losses: each brings its own (losses/loss_sum.py)
    if loss.class_axis:
        return terms * ((output.shape[1] - 1) * math.prod(output.shape[2:]) if output.dim() > 1 else 1)
    return terms * output[0].numel()


def graph_counts(
    nodes: List[Any], values: dict, origins: Any, shared: Any, regions: Any = None, flops: Any = None
) -> Tuple[Dict[int, int], List[float]]:
    """({node index s: columns per sample of the origins whose columns start crossing the nodes before s},
    [one sample's multiply-adds at each node]): a curved node's columns start at its input, below its own work;
    one folded through the Linear below it (or a region's) below that Linear. regions: the origins' elementwise
    regions, and flops: node_flops, where the caller has them already."""
    widths = {index: _origin_width(node, values) for index, node in enumerate(nodes) if index in origins}
    everywhere = [True] * len(nodes)
    flops = node_flops(nodes, values) if flops is None else flops
    if regions is None:
        regions = elementwise_regions.find_regions(nodes, sorted(origins), values)
    for region in regions:  # one diagonal at its input
        for member in region.members:
            widths.pop(member, None)
        below = folded_residuals.widening_linear(nodes[region.source], everywhere, shared, flops)
        start = region.members[0] if below is None else region.source  # born above the source, or folded below it
        widths[start] = (
            widths.get(start, 0) + values[nodes[region.source if below is None else below.inputs[0]].name][0].numel()
        )
    for index in list(widths):  # an activation folded through the Linear below: columns start below that Linear
        below = folded_residuals.linear_below(nodes, nodes[index], everywhere, shared, flops)
        if below is not None:
            del widths[index]
            start = nodes.index(below)
            widths[start] = widths.get(start, 0) + below.record.input[0].numel()
    return widths, flops


def node_flops(nodes: List[Any], values: dict) -> List[float]:
    """One sample's multiply-adds at each node (0 where no columns cross it)."""
    flops: List[float] = []
    for node in nodes:
        if not is_step(node, values):
            flops.append(0.0)
            continue
        read = [values[name] for name in node.input_names if isinstance(values.get(name), torch.Tensor)]
        flops.append(_node_flops(node, values[node.name], read))
    return flops


def _origin_width(node: Any, values: dict) -> int:
    """The columns per sample an origin sends down."""
    if isinstance(node.op, node_ops.AttentionOp):
        found = node.op.closed_form(node)
        if found is not None:  # scores' unit columns and pairs (attention_terms.py)
            return attention_terms.term_columns(found[0])
    read = [values[name] for name in node.input_names if isinstance(values.get(name), torch.Tensor)]
    return sum(x[0].numel() for x in read if x.is_floating_point() and x.dim() > 0)


def _node_flops(node: Any, value: torch.Tensor, read: List[torch.Tensor]) -> float:
    if isinstance(node.op, node_ops.ModuleOp):
        return module_flops(node.op.module, value)
    name = str(getattr(node.fx_node.target, "__name__", node.fx_node.target))
    per_sample = value[0].numel() if value.dim() > 0 else 1
    if name in _CONTRACTING and read and read[0].dim() > 0:
        return float(per_sample * read[0].shape[-1])
    if "scaled_dot_product_attention" in name and len(read) >= 2:
        return float(2 * per_sample * read[1].shape[-2])
    return float(per_sample + sum(x[0].numel() for x in read if x.dim() > 0))


def module_flops(module: nn.Module, output: torch.Tensor) -> float:
    per_sample = output[0].numel() if isinstance(output, torch.Tensor) and output.dim() > 0 else 1
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() >= 2 and not isinstance(module, nn.Embedding):
        return float(per_sample / weight.shape[0] * weight.numel())  # positions x a full weight each
    return float(per_sample)


def is_step(node: Any, values: dict) -> bool:
    value = values.get(node.name)
    return bool(node.activation and isinstance(value, torch.Tensor) and value.is_floating_point())
