"""What a loss function does to the model output and the targets before its one loss call.

Language models' losses are written on reshaped, sliced or transposed logits:

    lambda out, y: F.cross_entropy(out.logits[:, :-1].reshape(-1, V), y[:, 1:].reshape(-1), ignore_index=-100)

Read from the function's fx trace, such a function is: a place in the model output (out.logits), then tensor ops
on it (output_ops: slices that keep the batch axis, transposes, reshapes, casts), a loss call, and ops on the
targets (target_ops). The engine runs output_ops as part of the model (backprop/plan.py wraps the model), so their
derivatives are the graph engine's like any other op's. A last reshape that folds the batch axis into rows
(reshape(-1, C) on logits, reshape(-1) on labels) is not run: the loss over those rows equals the same loss with
the rows of each sample on one batch row, the class axis at 1 (cross-entropy: LossReading.per_sample) or over
the unfolded elements (elementwise losses), which keeps one batch row per sample, as the engine needs (`fold`).
"""

import operator
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch
import torch.fx as fx
from torch import Tensor

# tensor ops a loss function may apply to the output or the targets: per sample and linear
_METHODS = {
    "view",
    "reshape",
    "flatten",
    "transpose",
    "permute",
    "movedim",
    "contiguous",
    "float",
    "double",
    "to",
    "size",
    "squeeze",
    "unsqueeze",
    "long",
}
_FUNCTIONS = {operator.getitem, torch.flatten, torch.transpose, torch.reshape, torch.movedim, getattr}


@dataclass(frozen=True)
class LossReading:
    path: tuple  # the place in the model output: (("attribute", "logits"),), (("item", 0),) or ()
    output_ops: Optional[fx.GraphModule]  # the tensor at `path` -> what the loss call takes (None: as it is)
    target_ops: Optional[fx.GraphModule]  # targets -> what the loss call takes (None: as they are)
    # how the call folded the batch into rows (output_ops and target_ops stop before the fold): None, ("first",)
    # for flatten(0, 1), ("last", K) for rows of K (reshape(-1, K); K None: the tensor's own last size)
    fold: Optional[tuple]
    code: str  # the ops' source: two readings with the same code compute the same

    @property
    def rows(self) -> bool:
        return self.fold is not None

    def per_sample(self, output: Tensor) -> Tensor:
        """The folded rows one batch row per sample, the rows' class axis at 1 and the rows after it: the same
        cross-entropy as on the rows themselves (rows of a sample never mix with another's)."""
        if self.fold == ("first",):  # (N, rows, C, ...): the sample's rows are already its axis 1
            return output.transpose(1, 2)
        width = self.fold[1] if self.fold is not None and self.fold[1] is not None else output.shape[-1]
        return output.reshape(output.shape[0], -1, width).transpose(1, 2)

    def targets_for(self, targets: Tensor, output: Tensor, class_axis: bool) -> Tensor:
        """The targets as the engine's loss takes them, for the engine's output (per_sample's for cross-entropy)."""
        if self.target_ops is not None:
            targets = self.target_ops(targets)
        if self.rows and not class_axis:
            targets = targets.reshape(output.shape)
        elif self.rows and targets.is_floating_point():  # class probabilities: laid out like the output
            samples, classes, rows = output.shape[0], output.shape[1], output.shape[2]
            targets = targets.reshape(samples, rows, classes, *output.shape[3:]).transpose(1, 2)
        elif self.rows:
            targets = targets.reshape(output.shape[0], *output.shape[2:])
        return targets


def read(
    graph: fx.Graph, loss_input: Any, loss_target: Any, output: fx.Node, targets: fx.Node
) -> Optional[LossReading]:
    """The LossReading of a traced loss function (placeholders output and targets) whose loss call takes
    loss_input and loss_target, or None where it does more than the ops above (the engine does not read it)."""
    if not isinstance(loss_input, fx.Node) or not isinstance(loss_target, fx.Node):
        return None
    path, selected = _path(loss_input, output)
    fold = _fold(loss_input)
    if fold is not None and not (loss_target is targets or _flattens(loss_target) or _fold(loss_target)):
        fold = None
    end_output = loss_input.args[0] if fold else loss_input
    end_target = loss_target.args[0] if fold and loss_target is not targets else loss_target
    output_ops = _ops(graph, selected, end_output, forbidden=targets)
    target_ops = _ops(graph, targets, end_target, forbidden=output)
    if output_ops is False or target_ops is False:
        return None
    code = "\n".join(ops.code if ops is not None else "" for ops in (output_ops, target_ops))
    return LossReading(path, output_ops or None, target_ops or None, fold, code + f"\nfold={fold}")


def _path(node: Any, output: fx.Node) -> Tuple[tuple, fx.Node]:
    """(path, the node it ends at): the out.name / out["key"] / out[0] reads at the start of the output side."""
    chain = []
    while isinstance(node, fx.Node) and node is not output:
        chain.append(node)
        node = node.args[0] if node.args else None
    if node is not output:
        return (), output
    path: list = []
    end = output
    for selection in reversed(chain):
        key = selection.args[1] if len(selection.args) > 1 else None
        if selection.target is getattr and isinstance(key, str):
            path.append(("attribute", key))
        elif selection.target is operator.getitem and (isinstance(key, str) or (isinstance(key, int) and not path)):
            path.append(("item", key))  # an int only on the output itself: out[0] of a tuple or ModelOutput
        else:
            break
        end = selection
    return tuple(path), end


def _fold(node: fx.Node) -> Optional[tuple]:
    """How node folds the batch axis into rows (LossReading.fold): x.flatten(0, 1) -> ("first",);
    x.flatten(0, -2) / x.flatten(end_dim=-2) / x.view(-1, x.size(-1)) -> ("last", None); x.reshape(-1, K) with
    an int K -> ("last", K); anything else None."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", None)
    args = node.args[1:]
    if name in ("view", "reshape"):
        sizes = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        if len(sizes) != 2 or not (isinstance(sizes[0], int) and sizes[0] == -1):
            return None
        width = sizes[1]
        if isinstance(width, int):
            return ("last", width)
        return ("last", None) if _last_size_of(width, node.args[0]) else None
    if name == "flatten":
        start = args[0] if args else node.kwargs.get("start_dim", 0)
        end = args[1] if len(args) > 1 else node.kwargs.get("end_dim", -1)
        if start == 0 and end == -2:
            return ("last", None)
        if start == 0 and end == 1:
            return ("first",)
    return None


def _last_size_of(width: Any, tensor: Any) -> bool:
    """width is tensor.size(-1) or tensor.shape[-1]."""
    if not isinstance(width, fx.Node):
        return False
    if width.op == "call_method" and width.target == "size":
        return bool(width.args[0] is tensor and tuple(width.args[1:]) == (-1,))
    shape = width.args[0] if width.target is operator.getitem else None
    return bool(isinstance(shape, fx.Node) and width.args[1] == -1 and _is_shape(shape) and shape.args[0] is tensor)


def _flattens(node: fx.Node) -> bool:
    """y.view(-1) / y.reshape(-1) / y.flatten()."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", None)
    args = node.args[1:]
    if name in ("view", "reshape"):
        sizes = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        return tuple(sizes) == (-1,)
    return bool(name == "flatten" and not args and not node.kwargs)


def _ops(graph: fx.Graph, start: Any, end: Any, forbidden: fx.Node) -> Any:
    """A GraphModule computing `end` from `start` with the allowed ops only; None when end is start; False
    where something else is read (the other placeholder, a tensor the function holds, an op not allowed)."""
    if end is start:
        return None
    needed: list = []
    stack = [end]
    while stack:
        node = stack.pop()
        if node is start or node in needed:
            continue
        if node is forbidden or node.op != "call_method" and node.op != "call_function":
            return False
        if (node.op == "call_method" and node.target not in _METHODS) or (
            node.op == "call_function" and node.target not in _FUNCTIONS
        ):
            return False
        if node.target is operator.getitem and not (_keeps_batch(node.args[1]) or _is_shape(node.args[0])):
            return False
        needed.append(node)
        stack.extend(node.all_input_nodes)
    ops = fx.Graph()
    mapping = {start: ops.placeholder("x")}
    for node in graph.nodes:
        if node in needed:
            mapping[node] = ops.node_copy(node, lambda n: mapping[n])
    ops.output(mapping[end])
    return fx.GraphModule(torch.nn.Module(), ops)


def _is_shape(node: Any) -> bool:
    """x.shape or x.size(): numbers, which any index may read."""
    return isinstance(node, fx.Node) and (
        (node.target is getattr and node.args[1] == "shape") or (node.op == "call_method" and node.target == "size")
    )


def _keeps_batch(index: Any) -> bool:
    """x[:, :-1], x[..., 0]: an index that keeps every sample (the first entry a full slice)."""
    if isinstance(index, tuple) and index:
        first = index[0]
        return first == slice(None) or (first is Ellipsis and len(index) > 1)
    return False


__all__: Tuple[str, ...] = ("LossReading", "read")
