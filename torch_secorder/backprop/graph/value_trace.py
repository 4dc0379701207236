"""A trace that carries real values: for forwards a symbolic trace cannot follow.

torch.fx's symbolic trace stops at Python that needs a tensor's value: control flow on shapes (timm's
resample_abs_pos_embed compares the grid size with the embedding's), len(), iteration, a dtype handed to
torch.finfo. This tracer runs the forward on the call's own inputs while it records it, without gradients: every
proxy carries the value its node computes, so such Python reads that value and the graph records the path the
call takes. Shapes, dtypes and devices are read as plain values (the graph holds them as constants, like
torch.export's specialisation), so the graph is the one for inputs of this shape: the plan cache traces every
call and compares graphs (trace.same_trace), and an input of another shape gets a plan of its own. What Python
decides from values the graph cannot see (a branch on a tensor's contents) is checked like every trace: the plan's
output must equal the model's own once per plan (trace.check_call), or the engine steps aside.

Proxies are not tensors: a forward that branches on isinstance(x, torch.Tensor) takes the path it takes for a
non-tensor, which the same check catches.
"""

import operator
from typing import Any

import torch
import torch.fx as fx
from torch.fx.proxy import Attribute, ParameterProxy

from ..._errors import Unsupported
from .functional import attribute

_MISSING = object()


class ValueProxy(fx.Proxy):
    """A proxy with the value its node computed; its shape, dtype and the like are that value's."""

    value = _MISSING

    def _value(self):
        return self.tracer.value_of(self)  # type: ignore[attr-defined]  # a ValueTracer's

    def __len__(self):
        return len(self._value())

    def __index__(self):
        return self._value().__index__()

    def size(self, dim=None):
        value = self._value()
        return value.size() if dim is None else value.size(dim)


def _answered(name: str, call: bool) -> Any:
    def answer(self: ValueProxy) -> Any:
        found = getattr(self._value(), name)
        return found() if call else found

    return answer if call else property(answer)


# what a forward asks a tensor about itself, answered from the value (constants of the graph)
for _name in ("shape", "dtype", "device", "ndim", "is_cuda"):
    setattr(ValueProxy, _name, _answered(_name, call=False))
for _name in ("dim", "numel", "is_floating_point"):
    setattr(ValueProxy, _name, _answered(_name, call=True))


def with_values(tracer_class: Any) -> Any:
    """tracer_class (an fx.Tracer) made to carry values: ValueTracer(inputs) traces on those inputs."""

    class ValueTracer(tracer_class):
        def __init__(self, inputs):
            super().__init__()
            # copies: a forward that writes into its input in place must not change the call's input here
            self._inputs = [x.clone() if isinstance(x, torch.Tensor) else x for x in inputs]
            self._computing = False

        def proxy(self, node):
            return ValueProxy(node, self)

        def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
            proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
            if kind != "output" and isinstance(proxy, ValueProxy):
                proxy.value = self._compute(kind, target, args, kwargs)
            return proxy

        def _compute(self, kind, target, args, kwargs):
            if kind == "placeholder":
                if args:  # a keyword argument fixed to its default
                    return args[0]
                if target.startswith("*"):  # forward(self, *values): the rest (split_varargs makes them one each)
                    rest, self._inputs = tuple(self._inputs), []
                    return rest
                if not self._inputs:
                    raise Unsupported("a forward with more arguments than the call gives")
                return self._inputs.pop(0)
            args, kwargs = fx.node.map_aggregate((args, kwargs), self.value_of)
            outer, self._computing = self._computing, True  # module calls and attributes as they are
            try:
                with torch.no_grad():
                    if kind == "get_attr":  # a parameter (fx's ParameterProxy); tensor constants are arguments
                        return attribute(self.root, target)
                    if kind == "call_function":
                        return target(*args, **kwargs)
                    if kind == "call_method":
                        return getattr(args[0], target)(*args[1:], **kwargs)
                    return self.root.get_submodule(target)(*args, **kwargs)
            finally:
                self._computing = outer

        def value_of(self, value):
            if isinstance(value, ValueProxy):
                if value.value is _MISSING:
                    raise Unsupported(f"a value the trace did not compute ({value.node.name})")
                return value.value
            if isinstance(value, Attribute):
                return getattr(self.value_of(value.root), value.attr)
            if isinstance(value, ParameterProxy):
                return value.param
            if isinstance(value, fx.Proxy):
                raise Unsupported(f"a value the trace did not compute ({value.node.name})")
            return value

        def call_module(self, m, forward, args, kwargs):
            if self._computing:  # a module called while a value is computed: run, not recorded
                return forward(*args, **kwargs)
            return super().call_module(m, forward, args, kwargs)

        def getattr(self, attr, attr_val, parameter_proxy_cache):
            if self._computing:
                return attr_val
            return super().getattr(attr, attr_val, parameter_proxy_cache)

        def to_bool(self, obj):
            return bool(self.value_of(obj))

        def iter(self, obj):
            value = self.value_of(obj)
            if isinstance(value, dict):
                return iter(value)
            return iter([obj[index] for index in range(len(value))])

        def keys(self, obj):
            return self.value_of(obj).keys()

    return ValueTracer


def split_varargs(graph, count):
    """forward(self, *values) traces to one placeholder holding a tuple, read by values[i]: one placeholder per
    item instead (what the engine takes: one input each), in the same order."""
    varargs = [n for n in graph.nodes if n.op == "placeholder" and str(n.target).startswith("*")]
    if not varargs:
        return graph
    (tuple_node,) = varargs
    reads = list(tuple_node.users)
    if not all(n.target is operator.getitem and isinstance(n.args[1], int) for n in reads):
        raise Unsupported("a forward that uses its *args other than one item at a time")
    items = {}
    with graph.inserting_after(tuple_node):
        for index in reversed(range(count)):  # each right after the tuple: in order in the end
            items[index] = graph.placeholder(f"{str(tuple_node.target).lstrip('*')}_{index}")
    for node in reads:
        node.replace_all_uses_with(items[node.args[1]])
        graph.erase_node(node)
    graph.erase_node(tuple_node)
    return graph
