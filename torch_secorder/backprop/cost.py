"""What the engine will cost, in seconds, predicted from one forward pass without gradients.

Every origin's columns (the loss's at the output, each curved node's at its inputs, a tied parameter's mixed term
at the input of each use another use feeds) are pulled down through the nodes below it in chunks, and each
parameter's projections are formed on the way. Two things cost:

- multiply-adds: a column crossing a node costs about what one sample's forward does there, so the batch's
  columns cost N x (loss columns x F_all + sum over curved nodes o of columns_o x F_below(o)), F the multiply-adds
  of one sample's forward (for a layer with a weight, weight.numel() per output position; for a matrix product
  or attention, the output times the contracted size; for the rest, the elements it writes);
- steps: one chunk of columns crossing one node is a few dozen small tensor operations and some Python, whatever
  its size; on small models (MobileNetV3 at width 0.25, 159 nodes) these dominate.

The two are priced on this machine by timing a large matrix product and a tiny tensor operation once per device
and dtype (a few milliseconds). A column from a curved node crosses the nodes before it in the graph's order (its
ancestors, and a few others: an upper bound). Measured against the engine on the benchmark models in
benchmarks/results/cost_cpu.md.
"""

import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn

from .curvature import columns_within
from .graph import attention_terms, elementwise_regions, folded_residuals, node_ops, trace
from .plan import origin_nodes
from .rules import rule_for

_CONTRACTING = {"matmul", "bmm", "mm", "einsum", "baddbmm", "addmm", "linear", "__matmul__"}

# Fitted on two runs of the 13 models of benchmarks/bench_cost.py (2 cores, float32): the engine's multiply-adds run
# about 7 times slower than a 512 x 512 matrix product's (per-sample products of small operands), and a chunk's step
# across one node costs about 700 tiny tensor operations (about 1 ms there). A third run, in results/cost_cpu.md,
# came within 0.33-2.22x of the measured times (BERT's attention terms, formed by batched double backwards at the
# node, are counted in neither).
MULTIPLY_ADD_SLOWDOWN = 7.0
STEP_IN_TINY_OPS = 700.0


@dataclass(frozen=True)
class EngineCost:
    multiply_adds: float  # over the whole batch
    steps: int  # chunks of columns times the nodes each crosses
    columns: int  # per sample, over all origins
    forward_multiply_adds: float = 0.0  # one forward pass of the batch

    def least_generic_seconds(self, entries: int, device: torch.device, dtype: torch.dtype) -> float:
        """A floor under the generic method's time: its Hessian-vector products, one per parameter entry, batched,
        cost a tenth of a gradient (three forwards) or more, each at no more than a large product's speed."""
        rate, _ = machine_speed(device, dtype)
        return 0.1 * entries * 3 * self.forward_multiply_adds / rate

    def seconds(self, device: torch.device, dtype: torch.dtype) -> float:
        """The predicted time of the engine on this device and dtype."""
        rate, tiny = machine_speed(device, dtype)
        return MULTIPLY_ADD_SLOWDOWN * self.multiply_adds / rate + STEP_IN_TINY_OPS * tiny * self.steps


def predicted_cost(plan: Any, inputs: tuple, memory_budget: int) -> EngineCost:
    """The engine's work for an EnginePlan on these inputs (chunked as memory_budget makes it)."""
    graph = plan.layers is None
    steps = _graph_steps(plan, inputs) if graph else _chain_steps(plan, inputs)
    if not steps:
        return EngineCost(0.0, 0, 0)
    samples = max(1, steps[-1][2].shape[0] if steps[-1][2].dim() > 0 else 1)
    widest = max((step[2][0].numel() for step in steps if step[2].dim() > 0), default=1)
    # the engine's own chunking: an eighth of the budget in a graph (engine.py), all of it in a chain (chain.py)
    chunk = columns_within(samples, widest, steps[-1][2].element_size(), memory_budget // 8 if graph else memory_budget)
    total = sum(step[0] for step in steps)
    loss_columns = _loss_columns(plan, steps[-1][2])
    work, count, columns = loss_columns * total, math.ceil(loss_columns / chunk) * len(steps), loss_columns
    below = 0.0
    for crossed, (flops, width, _) in enumerate(steps):
        work += width * below  # a curved node's columns start at its input, below its own work
        count += math.ceil(width / chunk) * crossed
        columns += width
        below += flops
    return EngineCost(samples * work, count, columns, samples * total)


_SPEEDS: Dict[Tuple[str, torch.dtype], Tuple[float, float]] = {}
_SPEEDS_LOCK = threading.Lock()


def machine_speed(device: torch.device, dtype: torch.dtype) -> Tuple[float, float]:
    """(multiply-adds per second of a 512 x 512 matrix product, seconds of one tiny tensor operation) on this
    device and dtype, the best of four timings (the first warms up; a minimum passes over it), measured once per
    process."""
    device = torch.device(device)
    key = (str(device), dtype)
    with _SPEEDS_LOCK:
        if key not in _SPEEDS:
            _SPEEDS[key] = _measure_speed(device, dtype)
        return _SPEEDS[key]


def _measure_speed(device: torch.device, dtype: torch.dtype) -> Tuple[float, float]:
    if not dtype.is_floating_point or dtype.itemsize < 4:
        dtype = torch.float32  # half precision products: priced as float32 (an upper bound)
    size = 512
    with torch.no_grad():
        a = torch.randn(size, size, device=device, dtype=dtype)
        tiny = torch.ones(64, device=device, dtype=dtype)
        product, operation = math.inf, math.inf
        for _ in range(4):
            product = min(product, _timed(lambda: a @ a, device, 1))
            operation = min(operation, _timed(lambda: tiny.add(tiny), device, 100))
    return size**3 / product, operation


def _timed(work, device: torch.device, repeats: int) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return max(time.perf_counter() - start, 1e-9) / repeats


def _loss_columns(plan: Any, output: Any) -> int:
    if not isinstance(output, torch.Tensor) or output.dim() == 0:
        return 1
    terms = len(getattr(plan.loss, "terms", ())) or 1  # a sum of losses: each brings its own (losses/loss_sum.py)
    if plan.loss.class_axis:
        return terms * ((output.shape[1] - 1) * math.prod(output.shape[2:]) if output.dim() > 1 else 1)
    return terms * output[0].numel()


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
    nodes = graph.nodes[: graph.output + 1]
    origins = set(origin_nodes(graph, plan.model))
    by_name = dict(plan.model.named_parameters(remove_duplicate=False))
    trainable = {id(p) for p in by_name.values() if p.requires_grad}
    shared = {id(p) for p in trace.shared_params(nodes, by_name, trainable)}
    widths = {index: _origin_width(node, values) for index, node in enumerate(nodes) if index in origins}
    everywhere = [True] * len(nodes)
    for region in elementwise_regions.find_regions(nodes, sorted(origins), values):  # one diagonal at its input
        for member in region.members:
            widths.pop(member, None)
        below = folded_residuals.widening_linear(nodes[region.source], everywhere, shared)
        start = region.members[0] if below is None else region.source  # born above the source, or folded below it
        widths[start] = (
            widths.get(start, 0) + values[nodes[region.source if below is None else below.inputs[0]].name][0].numel()
        )
    for index in list(widths):  # an activation folded through the Linear below: columns start below that Linear
        below = folded_residuals.linear_below(nodes, nodes[index], everywhere, shared)
        if below is not None:
            del widths[index]
            start = nodes.index(below)
            widths[start] = widths.get(start, 0) + below.record.input[0].numel()
    steps: List[tuple] = []
    for index, node in enumerate(nodes):
        value = values.get(node.name)
        if not node.activation or not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        read = [values[name] for name in node.input_names if isinstance(values.get(name), torch.Tensor)]
        # a curved node's columns start at its input, below its own work; a folded one's below the Linear's
        steps.append((_node_flops(node, value, read), widths.get(index, 0), value))
    return steps


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


__all__: Tuple[str, ...] = ("EngineCost", "machine_speed", "predicted_cost")
