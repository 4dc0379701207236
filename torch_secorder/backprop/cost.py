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
ancestors, and a few others: an upper bound) down to the first cut below it where the engine merges the origins
(graph/merges.py), which adds its Gram products and eigendecompositions. The counts come from graph/counts.py.
Measured against the engine on the benchmark models in benchmarks/results/cost_cpu.md.
"""

import itertools
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import torch

from .curvature import columns_within
from .graph import engine, merges, trace
from .graph.counts import graph_counts, is_step, loss_columns_of, module_flops
from .plan import origin_nodes
from .rules import rule_for

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
    merge_multiply_adds: float = 0.0  # merges' Gram products and eigendecompositions, priced as sweeps' (merges.py)

    def least_generic_seconds(self, entries: int, device: torch.device, dtype: torch.dtype) -> float:
        """A floor under the generic method's time: its Hessian-vector products, one per parameter entry, batched,
        cost a tenth of a gradient (three forwards) or more, each at no more than a large product's speed."""
        rate, _ = machine_speed(device, dtype)
        return 0.1 * entries * 3 * self.forward_multiply_adds / rate

    def seconds(self, device: torch.device, dtype: torch.dtype) -> float:
        """The predicted time of the engine on this device and dtype."""
        rate, tiny = machine_speed(device, dtype)
        work = self.multiply_adds + self.merge_multiply_adds
        return MULTIPLY_ADD_SLOWDOWN * work / rate + STEP_IN_TINY_OPS * tiny * self.steps


def predicted_cost(plan: Any, inputs: tuple, memory_budget: int) -> EngineCost:
    """The engine's work for an EnginePlan on these inputs (chunked as memory_budget makes it)."""
    if plan.layers is None:
        return _graph_cost(plan, inputs, memory_budget)
    steps = _chain_steps(plan, inputs)
    if not steps:
        return EngineCost(0.0, 0, 0)
    output = steps[-1][2]
    starts = {index: width for index, (_, width, _) in enumerate(steps) if width}  # a layer's: at its input
    starts[len(steps)] = loss_columns_of(plan.loss, output)
    flops = [step[0] for step in steps]
    chunk = columns_within(_samples(output), _widest([step[2] for step in steps]), output.element_size(), memory_budget)
    return _cost(starts, flops, [True] * len(steps), [], {}, _samples(output), chunk)


def _graph_cost(plan: Any, inputs: tuple, memory_budget: int) -> EngineCost:
    graph = plan.graph.for_call()
    with torch.no_grad():
        values = trace.forward(graph, plan.model, inputs)
    nodes = graph.nodes[: graph.output + 1]
    by_name = dict(plan.model.named_parameters(remove_duplicate=False))
    trainable = {id(p) for p in by_name.values() if p.requires_grad}
    shared = {id(p) for p in trace.shared_params(nodes, by_name, trainable)}
    starts, flops = graph_counts(nodes, values, set(origin_nodes(graph, plan.model)), shared)
    stepped = [is_step(node, values) for node in nodes]
    output = values.get(nodes[-1].name)
    if not any(stepped) or not isinstance(output, torch.Tensor):
        return EngineCost(0.0, 0, 0)
    samples = _samples(output)
    starts[len(nodes)] = starts.get(len(nodes), 0) + loss_columns_of(plan.loss, output)
    needed = engine.needed_nodes(nodes, by_name, trainable, values)
    chosen = [] if shared else merges.chosen_cuts(nodes, needed, values, starts, flops, samples, memory_budget)
    features = {cut: values[nodes[cut].name][0].numel() for cut in chosen}
    widest = _widest([values[node.name] for node, step in zip(nodes, stepped) if step])
    # the engine's own chunking: an eighth of the budget in a graph (engine.py)
    chunk = columns_within(samples, widest, output.element_size(), memory_budget // 8)
    return _cost(starts, flops, stepped, chosen, features, samples, chunk)


def _cost(starts, flops, stepped, chosen, features, samples, chunk) -> EngineCost:
    """Each origin's columns (and each merge's, merges.py) priced across the nodes they cross: multiply-adds, and
    a step per chunk and node crossed."""
    reach = list(itertools.accumulate(flops))
    crossed = list(itertools.accumulate(int(step) for step in stepped))
    work = count = 0.0
    for width, start, stop in merges.segments(starts, chosen, features):
        work += width * (reach[start - 1] - (reach[stop] if stop >= 0 else 0.0))
        count += math.ceil(width / chunk) * (crossed[start - 1] - (crossed[stop] if stop >= 0 else 0))
    gram, eigen = merges.dense_work(starts, chosen, features)
    return EngineCost(
        samples * work,
        int(count),
        sum(starts.values()),
        samples * reach[-1],
        samples * (merges.GRAM_PRICE * gram + merges.EIGEN_PRICE * eigen) / MULTIPLY_ADD_SLOWDOWN,
    )


def _samples(output: torch.Tensor) -> int:
    return max(1, output.shape[0] if output.dim() > 0 else 1)


def _widest(values: List[torch.Tensor]) -> int:
    return max((value[0].numel() for value in values if value.dim() > 0), default=1)


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


def _chain_steps(plan: Any, inputs: tuple) -> List[tuple]:
    """[(multiply-adds per sample, curved columns, output)] per layer of a chain, in order."""
    steps: List[tuple] = []
    x = inputs[0]
    with torch.no_grad():
        for module in plan.layers:
            y, _ = rule_for(module).forward(module, x)  # the module's forward without its hooks
            width = x[0].numel() if rule_for(module).needs_output_grad(module) else 0
            steps.append((module_flops(module, y), width, y))
            x = y
    return steps


__all__: Tuple[str, ...] = ("EngineCost", "machine_speed", "predicted_cost")
