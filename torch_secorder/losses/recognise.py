"""Which supported loss a loss_fn is (module or functional form, functools.partial with options)."""

import functools
import inspect
import operator
from typing import Any, Callable, Dict, List, Optional, Tuple, Type, Union, cast

import torch
import torch.fx as fx
import torch.nn as nn

from .._forward_hooks import hook_reason
from .base import Loss
from .bce_with_logits import BCEWithLogits
from .cross_entropy import NLL, CrossEntropy
from .loss_sum import LossSum
from .mse import MSE
from .output_function import OutputFunction
from .reading import LossReading, read

LOSSES = (MSE, CrossEntropy, BCEWithLogits, NLL)
_BY_MODULE: Dict[type, Type[Loss]] = {loss.module: loss for loss in LOSSES}
_BY_FUNCTION: Dict[object, Type[Loss]] = {loss.function: loss for loss in LOSSES}


def recognise(loss_fn: object, functions: bool = False) -> Union[Loss, str]:
    """A Loss for a supported loss, or a string saying why it is not supported. functions: any other scalar
    function of one place of the model output is read by what it computes (output_function.py), for the Hessian."""
    kind, given = None, {}
    if isinstance(loss_fn, nn.Module):
        kind = _BY_MODULE.get(type(loss_fn))  # the exact class: a subclass may compute something else
        if kind is not None:
            given = {name: getattr(loss_fn, name) for name in kind.option_defaults if hasattr(loss_fn, name)}
            hooked = hook_reason(loss_fn)
            if hooked is not None:  # the module's own call runs its hooks: read by what it computes
                description = f"loss {type(loss_fn).__name__} with {hooked}"
                return OutputFunction(loss_fn, (), description) if functions else description
    else:
        function, keywords = loss_fn, {}
        if isinstance(loss_fn, functools.partial) and not loss_fn.args:
            function, keywords = loss_fn.func, dict(loss_fn.keywords)
        kind = _BY_FUNCTION.get(function)
        if kind is not None:
            unknown = set(keywords) - set(kind.option_defaults)
            if unknown:
                return f"loss option(s) {sorted(unknown)} of {kind.function.__name__}"
            given = keywords
    reading, traced = None, None
    if kind is None and not isinstance(loss_fn, nn.Module):
        traced = _traced(loss_fn)  # once: a sum of losses is read from the same trace
        kind, given, reading = _read_function(traced)
    if kind is None:
        name = type(loss_fn).__name__ if isinstance(loss_fn, nn.Module) else getattr(loss_fn, "__name__", repr(loss_fn))
        if functions:
            summed = _read_sum(traced, f"loss {name}")
            return summed if summed is not None else _output_function(cast(Callable, loss_fn), f"loss {name}")
        return f"loss {name} (supported: MSE, cross-entropy, BCE-with-logits, NLL after LogSoftmax)"
    return _built(kind, given, reading)


def _built(kind: Type[Loss], given: dict, reading: Optional[LossReading]) -> Union[Loss, str]:
    options = {name: given.get(name, default) for name, default in kind.option_defaults.items()}
    if options["reduction"] not in ("mean", "sum"):
        return f"reduction={options['reduction']!r} (the loss must be a scalar: 'mean' or 'sum')"
    loss = kind(options)
    if reading is not None and (reading.path or reading.output_ops or reading.target_ops or reading.rows):
        loss.reading = reading  # the engine reads that place and runs the ops: backprop/plan.py
    return loss


def _output_function(loss_fn: Callable, description: str) -> Union[Loss, str]:
    """An OutputFunction reading the one place of the model output loss_fn reads (fx shows where; a function fx
    cannot trace is taken to read the output itself, which the engine checks is a tensor)."""
    path = _place_read(loss_fn)
    if isinstance(path, str):
        return f"{description}: {path}"
    loss = OutputFunction(loss_fn, path, description)
    if path:
        loss.reading = LossReading(path, None, None, None, "")  # the engine's output is the tensor there
    return loss


def _place_read(loss_fn: object) -> Union[tuple, str]:
    """The path (reading.py's LossReading.path) of the one place of its first argument loss_fn reads, () for the
    argument itself or an untraceable function; a string where it reads several places."""
    if not (inspect.isfunction(loss_fn) or inspect.ismethod(loss_fn)):
        return ()
    try:
        graph = fx.symbolic_trace(loss_fn).graph
    except Exception:
        return ()
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    if not placeholders:
        return ()
    paths = {_selection_path(use) for use in placeholders[0].users}
    if len(paths) > 1:
        shown = ", ".join(sorted(_spelled(path) for path in paths))
        return f"it reads {len(paths)} places of the model output ({shown}); the engine reads one"
    return paths.pop() if paths else ()


_TENSOR_ATTRIBUTES = {"shape", "dtype", "device", "T", "mT", "H", "mH", "data", "real", "imag", "ndim"}


def _selection_path(node: fx.Node) -> tuple:
    """The path of out.name / out["key"] / out[i] reads starting at node (a user of the output placeholder)."""
    path: list = []
    while node.target in (getattr, operator.getitem) and isinstance(node.args[1], (str, int)):
        key = node.args[1]
        if (isinstance(key, int) and (path or node.target is getattr)) or key in _TENSOR_ATTRIBUTES:
            break  # an int only on the output itself (out[0] of a tuple), as reading.py reads it
        path.append(("attribute" if node.target is getattr else "item", key))
        users = list(node.users)
        if len(users) != 1 or users[0].target not in (getattr, operator.getitem):
            break
        node = users[0]
    return tuple(path)


def _spelled(path: tuple) -> str:
    return "out" + "".join(f".{key}" if kind == "attribute" else f"[{key!r}]" for kind, key in path)


_NOT_READ: Tuple[None, dict, None] = (None, {}, None)


def _traced(loss_fn: object) -> Optional[fx.GraphModule]:
    """loss_fn's fx trace when it is a function of two arguments fx can trace, else None."""
    if not (inspect.isfunction(loss_fn) or inspect.ismethod(loss_fn)):
        return None
    try:
        if len(inspect.signature(loss_fn).parameters) != 2:
            return None
        return fx.symbolic_trace(loss_fn)
    except Exception:
        return None


def _read_function(traced: Optional[fx.GraphModule]) -> Tuple[Optional[Type[Loss]], dict, Optional[LossReading]]:
    """(kind, its options, how it reads the output and targets) when the loss function (traced: _traced) is one call
    of a supported loss function with constant options, on its two arguments (lambda out, y: F.cross_entropy(out,
    y, label_smoothing=0.1)) or on what reading.py reads from them (out.logits, sliced, reshaped); else (None, {},
    None). Traced at each call, so the options are those the function reads now."""
    if traced is None:
        return _NOT_READ
    graph = traced.graph
    output = next(node for node in graph.nodes if node.op == "output")
    return _read_call(graph, output.args[0])


def _read_call(graph: fx.Graph, call: object) -> Tuple[Optional[Type[Loss]], dict, Optional[LossReading]]:
    """_read_function's answer for one node of the function's graph (the loss call)."""
    if not isinstance(call, fx.Node):
        return _NOT_READ
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    kind = _BY_FUNCTION.get(call.target)
    if len(placeholders) != 2 or kind is None or call.op != "call_function":
        return _NOT_READ
    try:
        signature = inspect.signature(kind.function)
        bound = signature.bind(*call.args, **call.kwargs).arguments
    except TypeError:
        return _NOT_READ
    for name in [name for name in bound if name not in kind.option_defaults and name not in ("input", "target")]:
        if bound[name] is signature.parameters[name].default:  # fx spells out every default (size_average=None)
            del bound[name]
    loss_input, loss_target = bound.pop("input", None), bound.pop("target", None)
    if any(isinstance(value, (fx.Node, torch.Tensor)) for value in bound.values()) or set(bound) - set(
        kind.option_defaults
    ):
        return _NOT_READ  # options computed in the function, tensors it holds, or options we do not know
    reading = read(graph, loss_input, loss_target, *placeholders)
    if reading is None or (kind.reads_log_probabilities and (reading.output_ops or reading.rows)):
        return _NOT_READ
    return kind, bound, reading


# ---------------------------------------------------------------- sums of losses (loss_sum.py)
_SUMS = {operator.add: 1.0, operator.sub: -1.0}
_NUMBER = (int, float)


def _terms(node: Any, weight: float, found: List[Tuple[float, Any]]) -> None:
    """The additive terms of node as (weight, node): sums, differences, negations and products or quotients by
    Python numbers are unfolded; anything else is a term."""
    if isinstance(node, fx.Node) and node.op == "call_function":
        args = node.args
        if node.target in _SUMS and len(args) == 2 and not node.kwargs:
            _terms(args[0], weight, found)
            _terms(args[1], weight * _SUMS[node.target], found)
            return
        if node.target is operator.neg and len(args) == 1:
            _terms(args[0], -weight, found)
            return
        if node.target is operator.mul and len(args) == 2:
            number = [a for a in args if isinstance(a, _NUMBER) and not isinstance(a, bool)]
            other = [a for a in args if not isinstance(a, _NUMBER)]
            if len(number) == 1 and len(other) == 1:
                _terms(other[0], weight * float(number[0]), found)
                return
        if node.target is operator.truediv and len(args) == 2 and isinstance(args[1], _NUMBER) and args[1] != 0:
            _terms(args[0], weight / float(args[1]), found)
            return
    found.append((weight, node))


def _reads(node: Any, placeholder: fx.Node) -> bool:
    """True when node is computed from placeholder (the model output)."""
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if not isinstance(current, fx.Node) or current in seen:
            continue
        if current is placeholder:
            return True
        seen.add(current)
        stack.extend(current.all_input_nodes)
    return False


def _read_sum(traced: Optional[fx.GraphModule], description: str) -> Optional[Loss]:
    """A LossSum when the loss function (traced: _traced) adds supported losses on one place of the output (read
    with the same ops) and terms that do not read the output; None otherwise (then read by what it computes)."""
    if traced is None:
        return None
    graph = traced.graph
    output_placeholder = next(node for node in graph.nodes if node.op == "placeholder")
    result = next(node for node in graph.nodes if node.op == "output").args[0]
    found: List[Tuple[float, Any]] = []
    _terms(result, 1.0, found)
    losses, rest = [], []
    for weight, node in found:
        if not _reads(node, output_placeholder):
            rest.append((weight, node))
            continue
        kind, given, reading = _read_call(graph, node)
        if kind is None or kind.reads_log_probabilities:
            return None  # a term of the output that is no known loss (NLL: the engine's output moves below it)
        loss = _built(kind, given, reading)
        if isinstance(loss, str):
            return None
        losses.append((weight, loss))
    if not losses or (len(losses) == 1 and not rest and losses[0][0] == 1.0):
        return None  # a single loss is read by _read_function (this one has ops it does not take)
    layouts = {(_layout(loss.reading), loss.class_axis) for _, loss in losses}
    if len(layouts) > 1:
        return None  # the terms read the output differently: the engine has one output
    return LossSum(losses, _rest_function(traced, rest), description)


def _layout(reading: Optional[LossReading]) -> tuple:
    """What the engine's output is for a reading: its place, its ops on the output (named apart from their fx
    names: two loss calls in one function read through differently named copies) and its fold."""
    if reading is None:
        return ()
    ops = None
    if reading.output_ops is not None:
        index = {node: k for k, node in enumerate(reading.output_ops.graph.nodes)}
        ops = tuple(
            (node.op, node.target, repr(fx.node.map_arg((node.args, node.kwargs), lambda n: f"%{index[n]}")))
            for node in reading.output_ops.graph.nodes
        )
    return (ops, reading.path, reading.fold)


def _rest_function(traced: fx.GraphModule, rest: List[Tuple[float, Any]]) -> Optional[Callable]:
    """The sum of the terms that do not read the output, as a function of (output, targets) (from the function's
    own graph: constants it computed at trace time, a penalty on parameters, keep their autograd history)."""
    if not rest:
        return None
    graph = fx.Graph()
    copies: Dict[fx.Node, Any] = {}
    for node in traced.graph.nodes:
        if node.op == "output":
            break
        copies[node] = graph.node_copy(node, lambda n: copies[n])
    total: Any = None
    for weight, node in rest:
        value = copies[node] if isinstance(node, fx.Node) else node
        term = graph.call_function(operator.mul, (value, weight))
        total = term if total is None else graph.call_function(operator.add, (total, term))
    graph.output(total)
    graph.eliminate_dead_code()
    return fx.GraphModule(traced, graph)
