"""The model's computation as a graph: traced with torch.fx, modules that have rules kept as leaves.

A model is read from what its forward really calls (custom forward methods, functional calls,
residual sums, concatenations), never from its module tree. Each traced node becomes a GraphNode
whose `op` (node_ops.py) knows how to evaluate it, pull columns through its Jacobian and add its
parameters' diagonals. What cannot be traced, or a node without an exact treatment, raises
Unsupported naming it.
"""

import dataclasses
import inspect
import weakref
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from ..._errors import Unsupported
from ..._forward_hooks import global_hook_reason, global_hooks, hook_reason
from ..._forward_pass import exclusive_trace, library_forward
from .. import eligibility
from ..rules.registry import registered_base
from . import attention, hf_conv1d, node_ops
from .value_trace import split_varargs, with_values


@dataclass
class GraphNode:
    name: str
    op: node_ops.NodeOp
    fx_node: fx.Node
    inputs: List[int] = field(default_factory=list)  # indices of the activation nodes it reads, in op order
    params: List[str] = field(default_factory=list)  # qualified names of the parameters it uses directly
    activation: bool = False  # depends on the model input (carries columns)
    input_names: List[str] = field(default_factory=list)  # the fx names of `inputs`
    # filled in by each forward pass of the engine, on the call's own copy of the node (GraphPlan.for_call)
    values: Optional[dict] = None
    value_shape: Optional[tuple] = None
    output_grad: Optional[torch.Tensor] = None
    record: Optional[object] = None
    batch_checked: Optional[tuple] = None
    cat_slices: Optional[list] = None  # a concatenation's pieces (node_ops.CatOp)
    # set by the engine for curved nodes: the input positions whose columns reach asked-for parameters, and the
    # block label of each of their per-sample features in the node's second-order term (residuals.block_labels)
    carrying: Optional[List[int]] = None
    residual_labels: Optional[torch.Tensor] = None


@dataclass
class GraphPlan:
    nodes: List[GraphNode]
    output: int  # index of the node the model returns
    names: dict  # id(module) -> qualified name
    validated: bool = False  # the trace reproduced the model's own forward once (check_call)
    log_softmax_dim: Optional[int] = None  # set when the model's final LogSoftmax is left to the NLL loss
    variants: dict = field(default_factory=dict)  # derived plans, kept with the cached plan
    constants: dict = field(default_factory=dict)  # tensors the trace met outside the model (get_attr targets)
    source: Optional["GraphPlan"] = None  # for a call's copy: the cached plan it was made from

    def for_call(self):
        """A copy whose nodes hold one call's values: the cached plan is shared by every call (threads too),
        so nothing of a call may live on it."""
        nodes = [
            dataclasses.replace(
                node,
                values=None,
                value_shape=None,
                output_grad=None,
                record=None,
                batch_checked=None,
                cat_slices=None,
                carrying=None,
                residual_labels=None,
            )
            for node in self.nodes
        ]
        return dataclasses.replace(self, nodes=nodes, source=self.source or self)

    def root(self, model):
        return _root(model, self.constants)

    def is_chain(self):
        """True when every activation node is a module rule reading the one before it: the chain engine's case."""
        activations = [n for n in self.nodes if n.activation]
        if not activations or self.output != len(self.nodes) - 1 or not activations[0].op.is_input:
            return False
        for previous, node in zip(activations, activations[1:]):
            if not isinstance(node.op, node_ops.ModuleOp) or node.inputs != [self.nodes.index(previous)]:
                return False
            if node.op.binds_tensors:  # F.linear(x, w): its module gets w at each evaluation (graph engine only)
                return False
        return all(len(n.fx_node.users) <= 1 for n in activations)


def _root(model, constants):
    """What get_attr targets are read from: the model, plus the trace's own constants."""
    return _Root(model, constants) if constants else model


class _Root:
    """The model's attributes, plus the tensor constants a trace found outside it (a global tensor, a tensor made in
    forward): torch.fx would store those on the user's model as _tensor_constant0, ...; the plan keeps them."""

    def __init__(self, model, constants):
        self.__dict__.update(_model=model, _constants=constants)

    def __getattr__(self, name):
        constants = self.__dict__["_constants"]
        return constants[name] if name in constants else getattr(self.__dict__["_model"], name)


class _Tracer(fx.Tracer):
    """Keeps modules with an exact rule (and torch.nn's own modules) as leaves, traces through the rest."""

    def __init__(self):
        super().__init__()
        self.constants, self._constant_names = {}, {}
        self._decomposing = None  # the nn.MultiheadAttention being read as its ops (attention.py)
        self._installed: Optional[set] = None  # ids of the root's modules
        self._attributes: Optional[tuple] = None  # (root, {id: (qualified name, tensor)}) of its params and buffers

    def _attribute_of_root(self, tensor):
        """The qualified name of a parameter or buffer of the root, or None. fx.Tracer walks the whole model for
        each one it meets: quadratic in the model's size (timm's RegNetX-002 traced in 220 ms, 60% of a call)."""
        if self._attributes is None or self._attributes[0] is not self.root:
            found = {id(t): (name, t) for name, t in self.root.named_buffers()}
            found.update({id(t): (name, t) for name, t in self.root.named_parameters()})
            self._attributes = (self.root, found)
        name, known = self._attributes[1].get(id(tensor), (None, None))
        return name if known is tensor else None

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        """self.weight read in a forward: its get_attr proxy, found in the same table (fx.Tracer walks the model)."""
        if isinstance(attr_val, nn.Parameter) or (self.proxy_buffer_attributes and isinstance(attr_val, torch.Tensor)):
            name = self._attribute_of_root(attr_val)
            if name is not None:
                if name not in parameter_proxy_cache:
                    parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
                return parameter_proxy_cache[name]
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_arg(self, a):
        """Parameters and buffers of the model become get_attr nodes (found in one table); any other tensor becomes
        a constant of the trace, not an attribute set on the model (what fx.Tracer does)."""
        if isinstance(a, torch.Tensor):
            name = self._attribute_of_root(a)
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        if isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter) and self.tensor_attrs.get(a) is None:
            name = self._constant_names.get(id(a))
            if name is None:
                name = self._constant_names[id(a)] = f"_secorder_constant{len(self.constants)}"
                self.constants[name] = a
            return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)

    def is_leaf_module(self, module, qualified_name):
        if eligibility.has_own_forward(module) or module is self._decomposing:
            return False  # read op by op: F.layer_norm and the like inside it have rules of their own
        return registered_base(module) is not None or super().is_leaf_module(module, qualified_name)

    def call_module(self, m, forward, args, kwargs):
        if self._installed is None:
            self._installed = {id(module) for module in self.root.modules()}
        if id(m) not in self._installed:
            return forward(*args, **kwargs)  # made in forward (nn.ReLU()(x)): read as the ops it runs
        if hf_conv1d.decomposable(m) and len(args) == 1 and not kwargs:
            return super().call_module(m, lambda x: hf_conv1d.forward(m, x), args, kwargs)
        if not attention.decomposable(m, args, kwargs):
            return super().call_module(m, forward, args, kwargs)
        outer, self._decomposing = self._decomposing, m  # read as its ops: the projections get the Linear rule
        try:
            return super().call_module(m, lambda *a, **k: attention.multi_head_attention(m, *a, **k), args, kwargs)
        finally:
            self._decomposing = outer

    def iter(self, proxy):
        """fx follows `q, k, v = x.chunk(3, -1)` but not other iteration (map(f, x.chunk(3, -1)), a generator
        expression): the pieces of chunk(n) and of split([sizes]) are taken as n / len(sizes). A tensor too
        short for n chunks makes chunk return fewer; then the traced graph fails its check against the model's
        own forward (check_call), and the engine steps aside."""
        count = _piece_count(proxy.node)
        if count is None:
            return super().iter(proxy)
        return iter([proxy[index] for index in range(count)])


_ValueTracer = with_values(_Tracer)


def _piece_count(node):
    """How many tensors a chunk / split call returns, when its arguments say so without the input's shape."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", None)
    if node.op not in ("call_method", "call_function") or name not in ("chunk", "split"):
        return None
    arguments = list(node.args[1:2]) or [
        node.kwargs.get("chunks", node.kwargs.get("split_size_or_sections", node.kwargs.get("split_size")))
    ]
    pieces = arguments[0]
    if name == "chunk":
        return pieces if isinstance(pieces, int) and pieces > 0 else None
    return len(pieces) if isinstance(pieces, (list, tuple)) else None  # sizes (maybe traced): one piece each


def _short(error):
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(error).__name__}: {first[:160]}"


def trace(model, inputs=None):
    """(traced graph, its tensor constants); keyword arguments with defaults (forward(self, x, mask=None)) that the
    call does not fill are fixed to them, as model(inputs) calls it: control flow on them is resolved at trace
    time. A forward that a symbolic trace cannot follow is traced with values on `inputs` (a tuple of the call's
    positional inputs) where given: a graph for inputs of that shape (value_trace.py)."""
    given = 1 if inputs is None else len(inputs)  # parameters the call fills (forward(x, memory=None) with two)
    try:
        signature = inspect.signature(model.forward)
        defaults = {
            name: parameter.default
            for name, parameter in list(signature.parameters.items())[given:]
            if parameter.default is not inspect.Parameter.empty
            and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
        }
    except (TypeError, ValueError):
        defaults = {}
    try:
        graph, constants = _run_tracer(_Tracer(), model, defaults)
        return _filled(graph, given), constants
    except Exception as error:
        symbolic = error
    if inputs is None:  # explain_method without inputs
        raise Unsupported(
            f"a forward that torch.fx cannot trace symbolically ({_short(symbolic)}; a call traces it with its "
            "inputs' values: explain_method(..., inputs) says whether that works)"
        ) from None
    try:
        graph, constants = _run_tracer(_ValueTracer(inputs), model, defaults)
        return split_varargs(graph, len(inputs)), constants
    except Unsupported:
        raise
    except Exception as error:
        raise Unsupported(
            f"a forward that torch.fx cannot trace ({_short(symbolic)}; with values: {_short(error)})"
        ) from None


def _filled(graph, given):
    """The graph with its first `given` placeholders as inputs: fx gives a parameter with a default (memory=None)
    that default even where the call fills it."""
    for position, node in enumerate(n for n in graph.nodes if n.op == "placeholder"):
        if position < given and node.args:
            node.args = ()
    return graph


def _run_tracer(tracer, model, defaults):
    # no other forward may run while fx patches nn.Module.__call__; what the library's forward passes will
    # run (a reentrant checkpoint directly)
    with exclusive_trace(), library_forward():
        return tracer.trace(model, concrete_args=defaults or None), tracer.constants


def check_modules(model, names):
    """Every module must compute what its traced form says: no global hooks, forward hooks only on modules kept
    whole under a rule (ModuleOp runs them and checks they change nothing), no parametrization, and a module
    with a rule must run that rule's forward (the reasons are those of the chain engine)."""
    reason = global_hook_reason()
    if reason is not None:
        raise Unsupported(reason)
    for module in model.modules():
        hooked = hook_reason(module)
        # a module kept whole under its rule runs its own hooks around it (ModuleOp); one read op by op cannot
        if hooked is not None and (registered_base(module) is None or eligibility.has_own_forward(module)):
            raise Unsupported(f"{eligibility.describe_module(module, names)}: {hooked}")


def build_plan(model, traced):
    """The GraphPlan of model from traced = trace(model); check_modules(model) has passed."""
    names = {id(module): name for name, module in model.named_modules()}
    graph, constants = traced
    root = _root(model, constants)
    modules = dict(model.named_modules())
    nodes: List[GraphNode] = []
    index_of: dict = {}  # fx node name -> index in nodes
    placeholders = [n for n in graph.nodes if n.op == "placeholder" and not n.args]  # args: a fixed default
    if not placeholders:
        raise Unsupported("a forward without arguments")
    result = next(n for n in graph.nodes if n.op == "output").args[0]
    output = None
    # fx nodes that move the batch axis away from 0 (node_ops.moved_axis), computed inside the nodes that read
    # them: fx node -> (what it reads, the inlined nodes below it, where its batch axis is)
    moved: dict = {}

    def reads(args):  # (args with inlined nodes replaced by what they read, the inlined nodes reached)
        found, prelude = [], set()
        for arg in args:
            below, inner, _ = moved.get(arg, ([arg], set(), 0))
            found += [a for a in below if a not in found]
            prelude |= inner | ({arg} if arg in moved else set())
        return found, prelude

    live = _live_nodes(graph, modules, result)
    for fx_node in graph.nodes:
        if fx_node not in live and fx_node.op != "output":
            continue  # computed for Python's sake only (a branch on x.sum() > 0 in a trace with values)
        if fx_node.op == "output":
            if result in moved:
                raise Unsupported("a forward that returns a tensor whose batch axis it moved")
            if not isinstance(result, fx.Node) or result not in index_of:
                raise Unsupported("a forward that does not return one tensor")
            output = index_of[result]
            continue
        source = fx_node.args[0] if fx_node.args and isinstance(fx_node.args[0], fx.Node) else None
        axis = node_ops.moved_axis(fx_node, moved[source][2] if source in moved else 0)
        if axis not in (0, None):
            args, prelude = reads(fx_node.all_input_nodes)
            if any(nodes[index_of[a]].activation for a in args if a in index_of):
                moved[fx_node] = (args, prelude, axis)
                continue
        op, params = node_ops.make_op(fx_node, root, modules, names)
        args, prelude = reads(op.activation_args(fx_node))
        if prelude:
            op = node_ops.reading_moved(op, fx_node)
            op.prelude = tuple(n for n in graph.nodes if n in prelude)
        node = GraphNode(fx_node.name, op, fx_node, params=params)
        inputs = [index_of[arg] for arg in args if arg in index_of]
        node.activation = op.is_input or (
            fx_node.op != "get_attr" and any(nodes[i].activation and nodes[i].op.carries for i in inputs)
        )
        node.inputs = [i for i in inputs if nodes[i].activation and nodes[i].op.carries]
        node.input_names = [nodes[i].name for i in node.inputs]
        if not node.activation and isinstance(op, node_ops.ModuleOp) and params:
            # a module with parameters on a constant (Embedding(position_ids)): its parameters' curvature comes
            # through its output like any other use, each sample's row apart
            node.activation, op.batch_from = True, placeholders[0].name
        if not node.activation and not isinstance(op, node_ops.ConstantOp):
            node.op = node_ops.ConstantOp()  # computed from parameters or constants only
        index_of[fx_node] = len(nodes)
        nodes.append(node)
    views: dict = {}  # node name -> ParamView: a parameter reshaped, expanded, indexed or scaled before use
    # trainable parameters' get_attr nodes, and what is computed from them alone
    derived = {
        node.name
        for node in nodes
        if not node.activation
        and (node.params if node.fx_node.op == "get_attr" else node.op.param_derived(node, nodes))
    }
    for node in nodes:
        if node.activation and not node.op.is_input:
            if isinstance(node.op, node_ops.GenericOp):
                node.op.read_param_views(node, views)
            elif any(arg.name in views for arg in node.fx_node.all_input_nodes):
                raise Unsupported(f"a view of a parameter used by {node.op.describe(node)} (no exact rule for it)")
            node.op.check(node, nodes)
        elif node.name in derived and node.fx_node.op != "get_attr":
            view = node_ops.param_view(node.fx_node, views, lambda arg: arg.name in derived)
            if view is None:
                # a parameter transformed before it meets the input (exp(self.w), a parametrization): the rules
                # below would see a constant and give the parameter no curvature
                raise Unsupported(
                    f"parameter(s) {node.op.param_names(node, nodes)} transformed by "
                    f"{node.op.describe(node)} before use (only direct uses, views and scalings have exact rules)"
                )
            views[node.name] = view
    assert output is not None, "every fx graph ends in an output node"
    return GraphPlan(nodes, output, names, constants=constants)


def shared_params(nodes, by_name, wanted):
    """The asked-for parameters used at several places: their per-sample projections add over the uses."""
    return [param for _, param, places in _uses(nodes, by_name, wanted) if len(places) > 1]


def tied_uses(nodes, by_name, wanted):
    """[(parameter name, parameter, index of a use fed by another use)]: where one use feeds another (a module
    called on its own output, an embedding tied to the head it feeds) the later use's output is bilinear in the
    parameter and in an input the earlier use moves, so the Hessian has a mixed term there (engine._mixed_terms)."""
    found = []
    for name, param, places in _uses(nodes, by_name, wanted):
        for place in sorted(places):
            if len(places) > 1 and _ancestors(nodes, place) & places:
                found.append((name, param, place))
    return found


def _uses(nodes, by_name, wanted):
    """[(name, parameter, the indices of the nodes using it)] for the asked-for parameters."""
    users: dict = {}  # id(parameter) -> (its name, the parameter, the indices of the nodes using it)
    for index, node in enumerate(nodes):
        if not node.activation:
            continue  # get_attr: the parameter itself, not a use
        for name in node.params:
            param = by_name.get(name)
            if param is not None and id(param) in wanted:
                users.setdefault(id(param), (name, param, set()))[2].add(index)
    return list(users.values())


def _ancestors(nodes, index):
    """The indices of the nodes whose values reach node `index`."""
    found, stack = set(), list(nodes[index].inputs)
    while stack:
        current = stack.pop()
        if current not in found:
            found.add(current)
            stack.extend(nodes[current].inputs)
    return found


def _live_nodes(graph, modules, result):
    """The fx nodes `result` (the output the loss reads) depends on, the inputs, and calls that write into a
    tensor (with what they read)."""
    live: set = set()
    stack = [result] if isinstance(result, fx.Node) else []
    stack += [
        n
        for n in graph.nodes
        if n.op == "placeholder"
        or (
            n.op != "get_attr"
            and node_ops.writes_its_inputs(n, modules.get(n.target) if n.op == "call_module" else None)
        )
    ]
    while stack:
        fx_node = stack.pop()
        if fx_node not in live:
            live.add(fx_node)
            stack.extend(fx_node.all_input_nodes)
    return live


# ---------------------------------------------------------------- cache
# A plan is reused only when a trace made now is the same graph as the one it was built from: Python state the
# forward reads (config dicts, globals, flags, a patched forward) is resolved by tracing, so a forward that reads
# anything different traces to another graph (other ops, constants or control flow) and gets a new plan.
# model -> (fingerprint, trace, plan or the Unsupported its graph raised)
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fingerprint(model):
    """What a plan depends on besides the traced graph: modules, their train mode and plain attributes, parameters,
    buffers and hooks (the rules check them when a plan is built)."""
    parts: list = [len(global_hooks())]
    for name, module in model.named_modules():
        plain = tuple(
            sorted(
                (key, value)
                for key, value in vars(module).items()
                if not key.startswith("_") and isinstance(value, (bool, int, float, str, type(None)))
            )
        )
        parts.append(
            (
                name,
                id(module),
                type(module),
                module.training,
                plain,
                tuple(
                    (key, id(value), value is not None and value.requires_grad)
                    for key, value in module._parameters.items()
                ),
                tuple(
                    (key, None if value is None else (id(value), value.shape, value.dtype))
                    for key, value in module._buffers.items()
                ),
                len(module._forward_hooks),
                len(module._forward_pre_hooks),
                len(module._backward_hooks),
                len(module._backward_pre_hooks),
                "forward" in vars(module),
            )
        )
    return tuple(parts)


def plan_for(model, inputs=None):
    """The GraphPlan of model as its forward reads now: traced on every call (with values on `inputs`, a tuple
    of positional inputs, where a symbolic trace cannot follow the forward), the cached plan reused when the
    trace is the same graph and nothing else it depends on changed."""
    fingerprint = _fingerprint(model)
    check_modules(model, eligibility.ModuleNames(model))
    traced = trace(model, inputs)
    cached = _CACHE.get(model)
    if cached is not None and cached[0] == fingerprint and same_trace(cached[1], traced):
        if isinstance(cached[2], Unsupported):
            raise cached[2]
        return cached[2]
    try:
        plan = build_plan(model, traced)
    except Unsupported as error:
        _CACHE[model] = (fingerprint, traced, error)
        raise
    _CACHE[model] = (fingerprint, traced, plan)
    return plan


def same_trace(first, second):
    """True when two traces (graph, constants) compute the same: the same ops on the same arguments, Python
    constants equal, every other object (functions, tensor constants) the very same one."""
    (graph_a, constants_a), (graph_b, constants_b) = first, second
    if constants_a.keys() != constants_b.keys() or not all(
        _same_constant(constants_a[k], constants_b[k]) for k in constants_a
    ):
        return False
    nodes_a, nodes_b = list(graph_a.nodes), list(graph_b.nodes)
    return len(nodes_a) == len(nodes_b) and all(
        a.op == b.op
        and a.name == b.name
        and _same_value(a.target, b.target)
        and _same_value(a.args, b.args)
        and _same_value(a.kwargs, b.kwargs)
        for a, b in zip(nodes_a, nodes_b)
    )


def _same_constant(a, b):
    """The same tensor, or equal ones (a tensor a forward makes anew on each call: torch.ones(x.shape[0]) in a trace
    with values)."""
    return a is b or (
        type(a) is type(b)
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.device == b.device
        and not a.requires_grad
        and not b.requires_grad
        and torch.equal(a, b)
    )


_PLAIN = (
    bool,
    int,
    float,
    complex,
    str,
    type(None),
    type(Ellipsis),
    torch.dtype,
    torch.device,
    torch.layout,
    torch.memory_format,
)


def _same_value(a, b):
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return isinstance(a, fx.Node) and isinstance(b, fx.Node) and a.name == b.name
    if type(a) is not type(b):
        return False
    if isinstance(a, _PLAIN):
        return a == b or (a != a and b != b)  # NaN: the same constant
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    if isinstance(a, slice):
        return _same_value((a.start, a.stop, a.step), (b.start, b.stop, b.step))
    return a is b


def check_call(plan, model, inputs):
    """Once per cached plan: the traced graph must give what model(inputs) gives. What a trace cannot see (an
    in-place change of a tensor another path still reads) shows here."""
    shared = plan.source or plan
    if shared.validated:
        return
    call = shared.for_call()
    inputs = as_tuple(inputs)
    with torch.no_grad():
        with library_forward():
            expected = model(*inputs)
        try:
            traced = forward(call, model, inputs)[call.nodes[call.output].name]
        except (IndexError, ValueError) as error:  # e.g. fewer chunks than the trace took (_Tracer.iter)
            raise Unsupported(f"a forward the trace does not reproduce ({_short(error)})") from None
    if plan.log_softmax_dim is not None:  # NLL: the plan stops below the model's final LogSoftmax
        traced = torch.log_softmax(traced, dim=plan.log_softmax_dim)
    same = (
        isinstance(expected, torch.Tensor)
        and expected.shape == traced.shape
        and expected.dtype == traced.dtype
        and torch.allclose(
            traced,
            expected,
            rtol=1e-6,
            atol=1e-6 * float(expected.abs().max().clamp_min(1e-30)) if expected.numel() else 0.0,
            equal_nan=True,
        )
    )
    if not same:
        raise Unsupported(
            "a forward the trace does not reproduce (in-place changes of tensors read elsewhere, "
            "randomness or Python state the trace cannot see)"
        )
    shared.validated = True


def forward(plan, model, inputs):
    """Evaluates the plan (a call's copy: GraphPlan.for_call) up to its output: {node name: value}. The nodes keep
    what their ops recorded for the backward sweep (records, the values they read)."""
    assert plan.source is not None, "a cached plan is shared between calls: evaluate a copy (for_call)"
    values: dict = {}
    root = plan.root(model)
    inputs = as_tuple(inputs)
    with library_forward():  # a forward that registers a gradient hook: not part of the loss
        for node in plan.nodes[: plan.output + 1]:
            value = inputs[node.op.position] if node.op.is_input else node.op.evaluate(node, values, root)
            values[node.name] = value
            node.value_shape = tuple(value.shape) if isinstance(value, torch.Tensor) else None
    return values


def as_tuple(inputs):
    """The model's positional inputs as a tuple (one tensor: a tuple of one)."""
    return inputs if isinstance(inputs, tuple) else (inputs,)


def chain_modules(plan):
    """The modules of a chain-shaped plan, in order (for the chain engine)."""
    return [node.op.module for node in plan.nodes if node.activation and not node.op.is_input]
