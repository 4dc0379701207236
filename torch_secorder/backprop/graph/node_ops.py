"""What each traced node does in the graph engine: evaluate, pull columns, add parameter diagonals, residuals.

Columns are per-sample adjoints (N, V, D) of one origin. Every op pulls them through its Jacobian
one to one (column v stays column v), so columns of one origin that reach a tensor along several
paths can be added as vectors (engine.py). The ops, below the base class NodeOp:

- InputOp, ConstantOp, MetaOp: the model input; values computed from parameters or constants only;
  shapes, dtypes and sizes read from a tensor. None of them carries columns.
- ModuleOp: a module with a rule (rules/), or a functional call that is one (F.relu, F.linear,
  F.conv2d, F.max_pool2d, torch.flatten, ...) run through a module built once from its arguments.
- ReshapeOp: view/reshape/flatten that keep the batch axis: the columns are the same numbers.
- GenericOp: anything else, through torch.func: a batched vjp pulls the columns, a per-sample vjp
  gives diagonals of parameters it uses directly (only where it is affine in them), and a per-sample
  Hessian of g . f (one batched double backward) gives its residual term where it is not linear.
  Its kinds: AddOp (sums and differences: the columns go to both operands unchanged or negated),
  ProductOp (products of two inputs: curved), ItemOp (one item of a TupleOp: split, chunk, unbind).
"""

import collections
import itertools
import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..._errors import Unsupported
from ..._forward_pass import attention_twice_differentiable
from .. import eligibility
from ..curvature import Curvature
from ..rules import LayerRecord, PropagationContext, registered_base, rule_for
from ..rules.columns import pull_columns
from . import attention_terms, softmax_terms
from .functional import attribute, module_for_call
from .residuals import block_labels, has_second_derivative, per_sample_hessian_terms

# One-to-one column pulls: no chunking, no dense or diagonal forms (those are legal only on chains).
COLUMNS = PropagationContext(max_columns=1 << 62, mixing_below=False, diagonal_only=False)


def _target_name(fx_node):
    target = fx_node.target
    if fx_node.op == "call_method":
        return f"Tensor.{target}"
    return getattr(target, "__name__", str(target))


class NodeOp:
    is_input = False
    carries = True  # its value is a tensor that columns can reach
    curved_possible = False  # may have a residual term (needs dloss/doutput)
    prelude: tuple = ()  # fx nodes moving the batch axis that this node computes itself, in graph order (inlined)

    def activation_args(self, fx_node):
        return _unique_nodes((fx_node.args, fx_node.kwargs))

    def check(self, node, nodes):
        """Raises Unsupported when this node, as traced, has no exact treatment (plan time)."""

    def param_derived(self, node, nodes):
        """True when the node is computed from trainable parameters (not used directly: refused)."""
        return False

    def param_names(self, node, nodes):
        """The trainable parameters a param_derived node is computed from."""
        return []

    def evaluate(self, node, values, root):
        raise NotImplementedError

    def pull(self, node, columns, signs, positions):
        """J^T columns for the activation inputs at `positions` (indices into node.inputs)."""
        raise NotImplementedError

    def column_diagonals(self, node, columns, signs, wanted, per_sample=False):
        """[(parameter, its diagonal from these columns)]: summed over samples, or (N, *shape) per_sample."""
        return []

    def column_projections(self, node, columns, wanted):
        """[(parameter, its per-sample projections (N, V, *shape))] for the wanted parameters it uses: B^T c_v
        before squaring, for parameters used at several places (added over their uses, then squared)."""
        return []

    def pair_diagonals(self, node, columns, signs, wanted, per_sample=False):
        """[(parameter, 2 sum_v s_v (B^T l_v)(B^T r_v))] for V pairs side by side (columns (N, 2V, D)) where the
        op forms them without per-sample projections, else None (the engine multiplies the projections)."""
        return None

    def residual_terms(self, node, max_columns, pair_columns):
        """The node's own second-order term in its inputs, as chunks (left, right, signs): right None for signed
        squares (left: {input position: (N, V, D_in)} columns, signs (N, V)), else signed pairs s (l r^T + r l^T)
        (right like left). A pair's diagonal below is a product, 2 s (J l)(J r), that stays accurate in float32
        where two balanced squares would cancel (curvature.balanced_squares). At most max_columns squares or
        pair_columns pairs per chunk; none by default."""
        return iter(())

    def mixed_projections(self, node, position, columns, param):
        """(N, V, *param.shape): per sample, d/dparam of g . (df/dx_position c_v), g the loss's gradient at the
        node's output: its mixed second derivative in an input and a parameter it uses, along each column. None
        where the node cannot form it (a tied parameter used there, fed by another of its uses, is refused)."""
        return None

    def describe(self, node):
        return f"{node.name} ({_target_name(node.fx_node)})"


PROJECTION_PIECE_BYTES = 32 << 20


def projections_in_pieces(one_sample, inputs, columns, params):
    """torch.func.vmap(one_sample)(inputs, columns) (per-sample vjps of a node in its parameters: one (N, V,
    *param.shape) tensor per parameter), over pieces of the columns' V axis whose projections take at most
    PROJECTION_PIECE_BYTES, written into one buffer per parameter: the vjps' temporaries are a few times their
    result (MobileNetV3-small's squeeze-excitation convolutions peaked at 4x it)."""
    samples, width = columns.shape[:2]
    per_column = samples * sum(p.numel() for p in params) * columns.element_size()
    step = max(1, PROJECTION_PIECE_BYTES // max(1, per_column))
    results: list = [columns.new_zeros(samples, 0, *p.shape) for p in params] if width == 0 else []
    with torch.enable_grad():
        for start in range(0, width, step):
            piece = torch.func.vmap(one_sample)(inputs, columns[:, start : start + step])
            if step >= width:
                return list(piece)
            if not results:
                results = [part.new_empty(samples, width, *part.shape[2:]) for part in piece]
            for result, part in zip(results, piece):
                result[:, start : start + step] = part
    return results


def signed_square_sum(projections, signs, per_sample):
    """sum_v signs[n, v] * projections[n, v]^2 over the columns, and over the samples unless per_sample."""
    squared = projections * projections
    if signs is not None:
        squared = squared * signs.reshape(*signs.shape, *[1] * (projections.dim() - 2))
    return squared.sum(dim=1) if per_sample else squared.sum(dim=(0, 1))


def _mixed_by_columns(output_at, inputs, position, output_grad, columns, param):
    """Per sample n: r_n(param) = J_x^T g_n (x the input at `position`, g_n the loss's gradient at the output), then
    the vjp of r_n in the parameter at each column c_nv: d/dparam (g_n . J_x c_nv), (N, V, *param.shape). Reverse
    mode twice (forward mode would load torch's jvp decompositions, which warn in torch 2.13).
    output_at(sample inputs, parameter, x): the node's output for one sample, x in place of its input."""

    def one_sample(sample_inputs, g, sample_columns):
        x = sample_inputs[position]

        def pulled(weight):
            _, vjp_x = torch.func.vjp(lambda moved: output_at(sample_inputs, weight, moved), x)  # type: ignore[misc]
            return vjp_x(g.unsqueeze(0))[0]

        _, vjp_param = torch.func.vjp(pulled, param)  # type: ignore[misc]
        return torch.func.vmap(vjp_param)(sample_columns.reshape(sample_columns.shape[0], *x.shape))[0]

    with torch.enable_grad():
        return torch.func.vmap(one_sample)(inputs, output_grad, columns)


def _read_through(view, param, values, samples):
    """What one sample's call reads of a parameter: the parameter itself, or its ParamView recomputed from it."""
    return param if view is None else view.recompute(param, values, samples)


def _unique_nodes(args):
    found = []
    fx.node.map_arg(args, lambda n: found.append(n) if n not in found else None)
    return found


def _with_prelude(op, values):
    """values, plus what the op's inlined nodes compute from them."""
    if not op.prelude:
        return values
    local = collections.ChainMap({}, values)
    for fx_node in op.prelude:
        local[fx_node.name] = _call(fx_node, local)
    return local


# ---------------------------------------------------------------- leaves without columns
class InputOp(NodeOp):
    """One of the model's positional inputs (position: which)."""

    is_input = True

    def __init__(self, position=0):
        self.position = position

    def evaluate(self, node, values, root):
        raise AssertionError("the input is set by the engine")


class ConstantOp(NodeOp):
    """get_attr (parameters, buffers) and calls that do not depend on the input."""

    carries = False

    def evaluate(self, node, values, root):
        fx_node = node.fx_node
        if fx_node.op == "placeholder":  # a keyword argument fixed to its default
            return fx_node.args[0]
        if fx_node.op == "get_attr":
            return attribute(root, fx_node.target)
        if fx_node.op == "call_module":  # a parameter-free module on constants
            args, kwargs = fx.node.map_arg((fx_node.args, fx_node.kwargs), lambda n: values[n.name])
            return attribute(root, fx_node.target)(*args, **kwargs)
        return _call(fx_node, values)

    def param_derived(self, node, nodes):
        if node.fx_node.op == "get_attr":
            return False
        return bool(self.param_names(node, nodes))

    def param_names(self, node, nodes):
        """Trainable parameters this constant is computed from."""
        by_name = {n.name: n for n in nodes}
        found: list = []
        for arg in _unique_nodes((node.fx_node.args, node.fx_node.kwargs)):
            source = by_name.get(arg.name)
            if source is None:
                continue
            found.extend(
                source.params
                if source.fx_node.op == "get_attr"
                else (source.op.param_names(source, nodes) if isinstance(source.op, ConstantOp) else [])
            )
        return found


def _call(fx_node, values):
    args, kwargs = fx.node.map_arg((fx_node.args, fx_node.kwargs), lambda n: values[n.name])
    if fx_node.op == "call_method":
        return getattr(args[0], fx_node.target)(*args[1:], **kwargs)
    if fx_node.target in _IN_PLACE:
        return _IN_PLACE[fx_node.target](*args, **kwargs)
    return fx_node.target(*args, **kwargs)


def writes_its_inputs(fx_node, callee):
    """True when the call may write into a tensor it reads: a module or function called with inplace=True, or
    an in-place method or function (x.clamp_(...), torch.relu_)."""
    if callee is not None and getattr(callee, "inplace", False):
        return True
    if fx_node.kwargs.get("inplace") is True:
        return True
    name = fx_node.target if fx_node.op == "call_method" else getattr(fx_node.target, "__name__", "")
    return isinstance(name, str) and name.endswith("_") and not name.endswith("__")


# x += y is traced as operator.iadd only in some versions; the engine never mutates recorded values
_IN_PLACE = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}


# ---------------------------------------------------------------- modules with rules
class ModuleOp(NodeOp):
    def __init__(self, module, rule, bind=None):
        self.module, self.rule = module, rule
        self._bind = bind  # for functional calls: puts this call's weight and bias on the module
        self.binds_tensors = bind is not None
        self.curved_possible = rule.needs_output_grad(module)
        self.input_arg = None
        # on a constant input (position ids): the input node whose batch size it is broadcast to (one row each)
        self.batch_from = None

    def activation_args(self, fx_node):
        return [self.input_arg] if self.input_arg is not None else [fx_node.args[0]]

    def evaluate(self, node, values, root):
        x = values[node.fx_node.args[0].name] if self.input_arg is None else values[self.input_arg.name]
        if self.batch_from is not None:
            x = self._per_sample(node, x, values[self.batch_from].shape[0])
        if self._bind is not None:
            self._bind(self.module, node.fx_node, values)
        reason = self.rule.unsupported_input_reason(self.module, x)
        if reason is not None:
            raise Unsupported(f"{self.describe(node)} on {reason}")
        output, extras = eligibility.forward_with_hooks(self.rule, self.module, x, lambda: self.describe(node))
        node.record = LayerRecord(self.module, x, output, extras=extras)
        return output

    def _per_sample(self, node, x, samples):
        """A constant input (the same for every sample: position ids) given a batch axis of `samples` rows, so
        that the parameters' uses are per sample as everywhere else (the output broadcasts to the same values)."""
        if x.dim() > 0 and x.shape[0] == samples:
            return x
        if x.dim() > 0 and x.shape[0] == 1:
            return x.expand(samples, *x.shape[1:])
        if self.rule.unsupported_input_reason(self.module, x) is not None:  # no batch axis: one for all samples
            return x.unsqueeze(0).expand(samples, *x.shape)
        raise Unsupported(f"{self.describe(node)} on a constant input of {x.shape[0]} rows for {samples} samples")

    def describe(self, node):
        if node.fx_node.op == "call_module":
            return f"module {node.fx_node.target!r} ({type(self.module).__name__})"
        return super().describe(node)

    def _curvature(self, node, columns, signs):
        return Curvature(node.record.output.shape[1:], factors=columns, signs=signs, primary=False)

    def pull(self, node, columns, signs, positions):
        pieces = list(self.rule.propagate(node.record, self._curvature(node, columns, signs), COLUMNS))
        assert len(pieces) == 1 and pieces[0].dense is None and pieces[0].diag is None, "a column pull must be 1:1"
        return [pieces[0].factors]

    def column_diagonals(self, node, columns, signs, wanted, per_sample=False):
        node.record.wanted = self._wanted_views(wanted)
        found = self.rule.param_diagonals(node.record, self._curvature(node, columns, signs), per_sample=per_sample)
        return self._as_stored(found)

    def _wanted_views(self, wanted):
        """wanted, with the views a functional call reads its parameters through (x @ W: the Linear's W^T)."""
        views = getattr(self.module, "read_through", None)
        if not views:
            return wanted
        return frozenset(wanted) | {key for key, (stored, _, _) in views.items() if id(stored) in wanted}

    def _as_stored(self, found):
        """The rule's [(tensor, value)] with each view's value read back as its parameter's."""
        views = getattr(self.module, "read_through", None)
        if not views:
            return found
        return [(views[id(t)][0], views[id(t)][1](v)) if id(t) in views else (t, v) for t, v in found]

    def _read_through(self, param):
        """The call x -> call(x, param) where this node reads param through a view (x @ W), else None."""
        views = getattr(self.module, "read_through", None) or {}
        return next((call for stored, _, call in views.values() if stored is param), None)

    def residual_terms(self, node, max_columns, pair_columns):
        for left, right, signs in self.rule.residual_terms(node.record, max_columns, pair_columns):
            yield {0: left}, None if right is None else {0: right}, signs

    def forms_pair_diagonals(self, node):
        """The rule forms a pair's products itself (pair_diagonals gives them, not None)."""
        if not hasattr(self.rule, "pair_diagonals"):
            return False
        forms = getattr(self.rule, "forms_pairs", None)
        return forms is None or forms(node.record)

    def pair_diagonals(self, node, columns, signs, wanted, per_sample=False):
        """[(parameter, 2 sum_v s_v (B^T l_v)(B^T r_v))] for V pairs side by side (columns (N, 2V, D)) where the
        rule forms them directly (no per-sample projections of the weight), else None."""
        if not self.forms_pair_diagonals(node):
            return None
        node.record.wanted = self._wanted_views(wanted)
        width = signs.shape[1]
        output_shape = node.record.output.shape[1:]
        left, right = (part.reshape(part.shape[0], width, *output_shape) for part in columns.split(width, dim=1))
        return self._as_stored(self.rule.pair_diagonals(node.record, left, right, signs, per_sample=per_sample))

    def column_projections(self, node, columns, wanted):
        """Per-sample vjps of the module's forward in the wanted parameters (torch.func), one column at a time."""
        views = getattr(self.module, "read_through", None)
        if views:  # x @ W: the vjps of the call as written, in W
            stored = [stored for stored, _, _ in views.values() if id(stored) in wanted]
            return [(param, self._view_projections(node, columns, param)) for param in stored]
        held = [  # its parameters, and tensors put on it as plain attributes: a functional call's, a pruned weight
            v for v in (*self.module.parameters(), *vars(self.module).values()) if isinstance(v, torch.Tensor)
        ]
        if not any(id(v) in wanted for v in held):
            return []
        if self._bind is not None:
            raise Unsupported(f"{self.describe(node)}: per-sample projections of a functional call's parameters")
        if any(id(v) in wanted and not isinstance(v, torch.nn.Parameter) for v in held):
            raise Unsupported(f"{self.describe(node)}: per-sample projections of a pruned weight")
        named = [(name, p) for name, p in self.module.named_parameters() if id(p) in wanted]

        def one_sample(x, sample_columns):
            def of_params(*tensors):
                state = {name: t for (name, _), t in zip(named, tensors)}
                return torch.func.functional_call(self.module, state, (x.unsqueeze(0),))

            output, vjp_fn = torch.func.vjp(of_params, *[p for _, p in named])  # type: ignore[misc]
            return torch.func.vmap(vjp_fn)(sample_columns.reshape(sample_columns.shape[0], *output.shape))

        try:
            projections = projections_in_pieces(one_sample, node.record.input, columns, [p for _, p in named])
        except Exception as error:
            raise Unsupported(
                f"{self.describe(node)}: cannot be evaluated per sample for its parameters ({type(error).__name__})"
            ) from None
        return [(p, projection) for (_, p), projection in zip(named, projections)]

    def _view_projections(self, node, columns, param):
        call = self._read_through(param)

        def one_sample(x, sample_columns):
            output, vjp_fn = torch.func.vjp(lambda weight: call(x.unsqueeze(0), weight), param)  # type: ignore[misc]
            return torch.func.vmap(vjp_fn)(sample_columns.reshape(sample_columns.shape[0], *output.shape))

        return projections_in_pieces(one_sample, node.record.input, columns, [param])[0]

    def mixed_projections(self, node, position, columns, param):
        call = self._read_through(param)
        if call is not None:

            def read(sample_inputs, weight, x):
                return call(x.unsqueeze(0), weight)

            return _mixed_by_columns(read, (node.record.input,), 0, node.output_grad, columns, param)
        if self._bind is not None or not any(p is param for p in self.module.parameters()):
            return None
        name = next(name for name, p in self.module.named_parameters() if p is param)

        def output_at(sample_inputs, weight, x):
            return torch.func.functional_call(self.module, {name: weight}, (x.unsqueeze(0),))

        return _mixed_by_columns(output_at, (node.record.input,), 0, node.output_grad, columns, param)


def module_op(module, names):
    """ModuleOp for a traced leaf module, or Unsupported naming it."""
    base = registered_base(module)
    if base is None:
        if any(True for _ in module.parameters()):
            raise Unsupported(f"{eligibility.describe_module(module, names)} (no exact rule for its parameters)")
        return None  # a parameter-free torch.nn module: a GenericOp calls it
    rule = rule_for(module)
    reason = eligibility.module_reason(module, base, rule.forward_methods, hooks_run=True) or rule.unsupported_reason(
        module
    )
    if reason is not None:
        raise Unsupported(f"{eligibility.describe_module(module, names)}: {reason}")
    return ModuleOp(module, rule)


# ---------------------------------------------------------------- reshapes and sums
class ReshapeOp(NodeOp):
    """view / reshape / flatten / contiguous that keep axis 0 as the batch: per-sample order is unchanged."""

    def activation_args(self, fx_node):
        return [fx_node.args[0]]

    def evaluate(self, node, values, root):
        x = values[node.fx_node.args[0].name]
        value = _call(node.fx_node, values)
        if value.dim() == 0 or x.dim() == 0 or value.shape[0] != x.shape[0]:
            raise Unsupported(
                f"{self.describe(node)} reshaping the batch axis ({tuple(x.shape)} -> {tuple(value.shape)})"
            )
        return value

    def pull(self, node, columns, signs, positions):
        return [columns]


class GenericOp(NodeOp):
    """Any other call: exact through torch.func, per sample (checked: no sample may reach another)."""

    def __init__(self, linear, param_args=(), callee=None):
        self.linear = linear  # known to be linear in its activation inputs: no residual term
        self.curved_possible = not linear
        self.param_args = tuple(param_args)  # names of get_attr nodes holding trainable parameters, or of their views
        self.param_views: dict = {}  # the views among param_args: name -> ParamView
        self.callee = callee  # a parameter-free module, for call_module nodes

    def read_param_views(self, node, views):
        """Takes the parameter views (ParamView) among the node's arguments as parameters it uses."""
        for arg in _unique_nodes((node.fx_node.args, node.fx_node.kwargs)):
            view = views.get(arg.name)
            if view is not None and arg.name not in self.param_args:
                self.param_args += (arg.name,)
                self.param_views[arg.name] = view
                node.params.append(view.qualified)

    def check(self, node, nodes):
        if node.params and not self.affine_in_params(node):
            raise Unsupported(
                f"parameter(s) {node.params} used by {self.describe(node)}, which has no exact rule "
                "for parameters (only sums, products, matmul, layer_norm and modules with rules)"
            )

    def affine_in_params(self, node):
        target = node.fx_node.target
        if node.fx_node.op == "call_method":
            return target in _AFFINE_METHODS or target in _LINEAR_METHODS
        return target in _AFFINE_IN_PARAMS or target in _LINEAR_FUNCTIONS  # linear ops: linear in every tensor

    # -- evaluation
    def function(self, node, values, replaced):
        """The node's call as a function of the tensors named in `replaced` (in that order)."""
        fx_node = node.fx_node

        writes_inputs = writes_its_inputs(fx_node, self.callee)
        attention = fx_node.target is F.scaled_dot_product_attention
        read = [arg.name for arg in fx_node.all_input_nodes]

        def call(*tensors):
            local = dict(values)
            local.update(zip(replaced, tensors))
            local = _with_prelude(self, local)
            if writes_inputs:  # an in-place call: on copies, so recorded values (and vjp primals) stay intact
                for name in read:
                    if isinstance(local.get(name), torch.Tensor):
                        local[name] = local[name].clone()
            if self.callee is not None:
                args, kwargs = fx.node.map_arg((fx_node.args, fx_node.kwargs), lambda n: local[n.name])
                return self.callee(*args, **kwargs)
            if attention:  # the math backend: vmap and double backward go through it
                with attention_twice_differentiable():
                    return _call(fx_node, local)
            return _call(fx_node, local)

        return call

    def evaluate(self, node, values, root):
        node.values = values  # what the node reads; the engine keeps every value of the pass anyway
        value = self.function(node, values, [])()
        if not isinstance(value, torch.Tensor):
            raise Unsupported(f"{self.describe(node)} returning {type(value).__name__} (a tensor was expected)")
        self._check_batch(node, value)
        return value

    def _check_batch(self, node, value):
        """Per-sample ops only: the batch axis is kept and no output sample depends on another sample's input
        (checked with one batched vjp of a random cotangent per output sample)."""
        inputs = [node.values[name] for name in node.input_names]
        samples = inputs[0].shape[0] if inputs and inputs[0].dim() > 0 else None
        if (
            samples is None
            or value.dim() == 0
            or value.shape[0] != samples
            or any(t.dim() == 0 or t.shape[0] != samples for t in inputs)
        ):
            raise Unsupported(
                f"{self.describe(node)} changing the batch axis ({[tuple(t.shape) for t in inputs]} -> "
                f"{tuple(value.shape)})"
            )
        differentiable = self._differentiable(node)
        if samples <= 1 or not value.is_floating_point() or not differentiable:
            return  # integer tensors carry no derivative: whatever mixes them is locally constant
        if node.batch_checked == (samples, tuple(value.shape)):
            return
        # probe output samples 0, 1 and N - 1 (three vjps' worth of memory, whatever the batch): a reduction
        # or a shuffle over the batch (mean(0), flip(0), roll(k, 0)) reaches another sample from one of them
        probes = sorted({0, 1, samples - 1})
        with torch.enable_grad():
            output, vjp_fn = torch.func.vjp(  # type: ignore[misc]
                self.function(node, node.values, differentiable), *[node.values[name] for name in differentiable]
            )
            mask = torch.zeros(len(probes), samples, dtype=output.dtype, device=output.device)
            mask[torch.arange(len(probes)), torch.tensor(probes)] = 1
            # a generator of its own: the global one belongs to the forward (dropout masks drawn after this node)
            probe = torch.Generator(device=output.device).manual_seed(0)
            noise = torch.randn(output.shape, dtype=output.dtype, device=output.device, generator=probe)
            cotangents = noise.unsqueeze(0) * mask.reshape(len(probes), samples, *[1] * (output.dim() - 1))
            pulled = torch.func.vmap(vjp_fn)(cotangents)
        for grad in pulled:
            reached = grad.reshape(len(probes), samples, -1).abs().sum(2) != 0  # [probe, input sample]
            if bool((reached & (mask == 0)).any()):
                raise Unsupported(f"{self.describe(node)} mixing samples of the batch")
        node.batch_checked = (samples, tuple(value.shape))

    @staticmethod
    def _differentiable(node):
        """The names of the floating-point inputs: integer ones (indices, masks) are constants to derivatives."""
        return [name for name in node.input_names if node.values[name].is_floating_point()]

    # -- columns
    def pull(self, node, columns, signs, positions):
        differentiable = self._differentiable(node)
        pulled = pull_columns(
            self.function(node, node.values, differentiable), [node.values[name] for name in differentiable], columns
        )
        return [pulled[differentiable.index(node.input_names[p])] for p in positions]

    def column_diagonals(self, node, columns, signs, wanted, per_sample=False):
        return [
            (param, signed_square_sum(projection, signs, per_sample))
            for param, projection in self.column_projections(node, columns, wanted)
        ]

    def column_projections(self, node, columns, wanted):
        params = []  # (argument name, the parameter, the view it is read through or None)
        for name in self.param_args:
            view = self.param_views.get(name)
            param = node.values[view.source if view else name]
            if id(param) in wanted:
                params.append((name, param, view))
        if not params:
            return []
        inputs = [node.values[name] for name in node.input_names]
        samples = columns.shape[0]
        param_names = [name for name, _, _ in params]
        call = self.function(node, node.values, node.input_names + param_names)

        def one_sample(sample_inputs, sample_columns):
            def of_params(*tensors):
                arguments = [_read_through(view, t, node.values, samples) for t, (_, _, view) in zip(tensors, params)]
                return call(*[t.unsqueeze(0) for t in sample_inputs], *arguments)

            output, vjp_fn = torch.func.vjp(of_params, *[p for _, p, _ in params])  # type: ignore[misc]
            return torch.func.vmap(vjp_fn)(sample_columns.reshape(sample_columns.shape[0], *output.shape))

        try:  # each (N, V, *param.shape)
            projections = projections_in_pieces(one_sample, tuple(inputs), columns, [p for _, p, _ in params])
        except Exception as error:
            raise Unsupported(
                f"{self.describe(node)}: cannot be evaluated per sample for its parameters ({type(error).__name__})"
            ) from None
        return [(param, projection) for (_, param, _), projection in zip(params, projections)]

    def mixed_projections(self, node, position, columns, param):
        params = [(name, self.param_views.get(name)) for name in self.param_args]
        params = [(name, view) for name, view in params if node.values[view.source if view else name] is param]
        if not params:
            return None
        inputs = [node.values[name] for name in node.input_names]
        samples = inputs[0].shape[0]
        call = self.function(node, node.values, node.input_names + [name for name, _ in params])

        def output_at(sample_inputs, weight, x):
            arguments = [_read_through(view, weight, node.values, samples) for _, view in params]
            moved = list(sample_inputs)
            moved[position] = x
            return call(*[t.unsqueeze(0) for t in moved], *arguments)

        try:
            return _mixed_by_columns(output_at, tuple(inputs), position, node.output_grad, columns, param)
        except Exception as error:
            raise Unsupported(
                f"{self.describe(node)}: its mixed term in {node.params} cannot be formed per sample "
                f"({type(error).__name__})"
            ) from None

    def forms_dense_term(self, node):
        """True when residual_terms forms the node's dense per-sample Hessian (bounded by the memory check)."""
        return True

    def has_second_derivative(self, node):
        """False when g . f has no second derivative in the node's inputs."""
        differentiable = self._differentiable(node)
        if not differentiable or node.output_grad is None:
            return False
        inputs = [node.values[name] for name in differentiable]
        return has_second_derivative(self.function(node, node.values, differentiable), inputs, node.output_grad)

    def residual_inputs(self, node):
        """The floating inputs whose columns reach asked-for parameters (all floating ones unless the engine said):
        the term's rows and columns on the others (an additive attention mask) would be pulled nowhere."""
        names = self._differentiable(node)
        if node.carrying is not None:
            carrying = {node.input_names[p] for p in node.carrying}
            names = [name for name in names if name in carrying]
        return names

    def residual_labels(self, node, max_columns):
        """The blocks of the node's per-sample second-order term (residuals.block_labels), kept on the call's node."""
        names = self.residual_inputs(node)
        if self.linear or node.output_grad is None or not names:
            return None
        if node.residual_labels is None:
            inputs = [node.values[name] for name in names]
            node.residual_labels = block_labels(
                self.function(node, node.values, names), inputs, node.output_grad, max_columns
            )
        return node.residual_labels

    def residual_terms(self, node, max_columns, pair_columns):
        """The node's dense per-sample term, cut along its inputs (residuals.per_sample_hessian_terms)."""
        if self.linear or node.output_grad is None:
            return
        differentiable = self.residual_inputs(node)
        if not differentiable:
            return
        inputs = [node.values[name] for name in differentiable]

        def positions(piece):
            return None if piece is None else {node.input_names.index(differentiable[k]): c for k, c in piece.items()}

        for left, right, signs in per_sample_hessian_terms(
            self.function(node, node.values, differentiable),
            inputs,
            node.output_grad,
            max_columns,
            pair_columns,
            node.residual_labels,
        ):
            yield positions(left), positions(right), signs


class TupleOp(NodeOp):
    """split / chunk / unbind: a tuple of tensors. It carries no columns itself: each getitem of it is an
    ItemOp, a function of the tuple op's own inputs."""

    carries = False

    def evaluate(self, node, values, root):
        return _call(node.fx_node, _with_prelude(self, values))


class ItemOp(GenericOp):
    """tuple_op(x)[i] as one linear function of x."""

    def __init__(self, source, index):
        super().__init__(linear=True)
        self.source, self.index = source, index

    def activation_args(self, fx_node):
        return _unique_nodes((self.source.args, self.source.kwargs))

    def function(self, node, values, replaced):
        def call(*tensors):
            local = dict(values)
            local.update(zip(replaced, tensors))
            return _call(self.source, _with_prelude(self, local))[self.index]

        return call

    def evaluate(self, node, values, root):
        node.values = values
        value = values[self.source.name][self.index]
        self._check_batch(node, value)
        return value


_TUPLE_FUNCTIONS = {torch.split, torch.chunk, torch.unbind, torch.tensor_split}
_TUPLE_METHODS = {"split", "chunk", "unbind", "tensor_split"}


class AddOp(GenericOp):
    """a + b, a - b (also torch.add/sub and the methods; alpha=1): the columns go to each operand times its
    coefficient (x + x gives x twice, x - x none)."""

    def __init__(self, param_args=()):
        super().__init__(linear=True, param_args=param_args)

    def pull(self, node, columns, signs, positions):
        output_shape = node.value_shape
        coefficients = self._coefficients(node)
        results = []
        for position in positions:
            name = node.input_names[position]
            if tuple(node.values[name].shape) != output_shape:  # broadcast: sum over the broadcast axes
                results.append(GenericOp.pull(self, node, columns, signs, [position])[0])
                continue
            coefficient = coefficients.get(name, 0)
            results.append(columns if coefficient == 1 else columns * coefficient)
        return results

    def _coefficients(self, node):
        fx_node = node.fx_node
        subtract = fx_node.target in (operator.sub, operator.isub, torch.sub, "sub", "sub_")
        coefficients: dict = {}
        for position, arg in enumerate(fx_node.args[:2]):
            if isinstance(arg, fx.Node):
                sign = -1 if subtract and position == 1 else 1
                coefficients[arg.name] = coefficients.get(arg.name, 0) + sign
        return coefficients


class CatOp(GenericOp):
    """torch.cat along a feature axis (DenseNet's growing features, timm's and Hugging Face's concatenations): each
    input's columns are its slice of the output's columns. Where the call is not that plain (parameters among the
    pieces, the batch axis, pieces without it) it is a linear GenericOp."""

    def __init__(self, param_args=()):
        super().__init__(linear=True, param_args=param_args)

    def evaluate(self, node, values, root):
        node.cat_slices = None if self.param_args else self._slices(node.fx_node, values)
        if node.cat_slices is None:
            return super().evaluate(node, values, root)
        node.values = values
        return _call(node.fx_node, values)

    @staticmethod
    def _slices(fx_node, values):
        """[(input name, axis, start, size)] of the output, or None where a piece is not a node of one rank and
        batch size with the others or the axis is the batch axis."""
        pieces = fx_node.args[0] if fx_node.args else fx_node.kwargs.get("tensors")
        axis = fx_node.args[1] if len(fx_node.args) > 1 else fx_node.kwargs.get("dim", fx_node.kwargs.get("axis", 0))
        if not isinstance(pieces, (list, tuple)) or not pieces or not isinstance(axis, int):
            return None
        if not all(isinstance(piece, fx.Node) and isinstance(values.get(piece.name), torch.Tensor) for piece in pieces):
            return None
        tensors = [values[piece.name] for piece in pieces]
        rank, samples = tensors[0].dim(), tensors[0].shape[0] if tensors[0].dim() else None
        if rank == 0 or axis % rank == 0 or any(t.dim() != rank or t.shape[0] != samples for t in tensors):
            return None
        axis %= rank
        starts = itertools.accumulate([0] + [t.shape[axis] for t in tensors])
        return [(piece.name, axis, start, t.shape[axis]) for piece, t, start in zip(pieces, tensors, starts)]

    def pull(self, node, columns, signs, positions):
        if node.cat_slices is None:
            return super().pull(node, columns, signs, positions)
        samples, width = columns.shape[:2]
        full = columns.reshape(samples, width, *node.value_shape[1:])
        pulled: dict = {}
        for name, axis, start, size in node.cat_slices:  # a tensor concatenated twice gets both slices
            piece = full.narrow(axis + 1, start, size)
            pulled[name] = piece if name not in pulled else pulled[name] + piece
        return [pulled[node.input_names[p]].reshape(samples, width, -1) for p in positions]


# ---------------------------------------------------------------- the table
_LINEAR_FUNCTIONS = {
    operator.getitem,
    operator.neg,
    operator.pos,
    torch.cat,
    torch.concat,
    torch.stack,
    torch.split,
    torch.chunk,
    torch.permute,
    torch.transpose,
    torch.squeeze,
    torch.unsqueeze,
    torch.narrow,
    torch.flip,
    torch.roll,
    torch.movedim,
    torch.swapaxes,
    torch.mean,
    torch.sum,
    torch.neg,
    F.pad,
    torch.unbind,
    torch.hstack,
    torch.vstack,
    torch.dstack,
    torch.diagonal,
    torch.tile,
    torch.repeat_interleave,
    torch.clone,
    F.interpolate,
    F.pixel_shuffle,
    F.pixel_unshuffle,
    F.unfold,
    F.fold,
}
_LINEAR_METHODS = {
    "permute",
    "transpose",
    "squeeze",
    "unsqueeze",
    "narrow",
    "flip",
    "roll",
    "movedim",
    "swapaxes",
    "mean",
    "sum",
    "neg",
    "expand",
    "expand_as",
    "repeat",
    "split",
    "chunk",
    "unbind",
    "clone",
    "diagonal",
    "tile",
    "t",
    "unfold",
    "repeat_interleave",
    "__getitem__",
    # dtype casts: autograd's derivative is the identity (cast back)
    "float",
    "double",
    "half",
    "bfloat16",
    "to",
    "type_as",
}
# parameter-free torch.nn modules that are linear in their input (the rest are checked for a second derivative)
_LINEAR_MODULES = (
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ZeroPad3d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
    nn.ConstantPad3d,
    nn.ReflectionPad1d,
    nn.ReflectionPad2d,
    nn.ReflectionPad3d,
    nn.ReplicationPad1d,
    nn.ReplicationPad2d,
    nn.ReplicationPad3d,
    nn.CircularPad1d,
    nn.CircularPad2d,
    nn.CircularPad3d,
    nn.Upsample,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.ChannelShuffle,
    nn.Fold,
    nn.Unfold,
)
_RESHAPES = {torch.reshape, torch.flatten}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "contiguous", "view_as", "reshape_as", "unflatten"}
_ADDS = {operator.add, operator.sub, operator.iadd, operator.isub, torch.add, torch.sub}
# x * y, x / y, x @ y: linear in x when y does not depend on the input (ProductOp decides per node)
_PRODUCT_FUNCTIONS = {
    operator.mul,
    operator.imul,
    torch.mul,
    operator.truediv,
    operator.itruediv,
    torch.div,
    operator.matmul,
    torch.matmul,
}
_PRODUCT_METHODS = {"mul", "div", "matmul", "__mul__", "__truediv__"}
_DIVISIONS = {operator.truediv, operator.itruediv, torch.div, "div", "__truediv__"}
_AFFINE_IN_PARAMS = _ADDS | {
    operator.mul,
    operator.imul,
    torch.mul,
    operator.matmul,
    torch.matmul,
    F.layer_norm,
    F.group_norm,
}
_AFFINE_METHODS = {"add", "sub", "mul", "matmul", "__add__", "__mul__"}


class MetaOp(NodeOp):
    """x.shape, x.size(0), x.dim(): numbers about a tensor, constants for the derivatives."""

    carries = False

    def evaluate(self, node, values, root):
        value = _call(node.fx_node, _with_prelude(self, values))
        if isinstance(value, torch.Tensor):  # carries no columns: a tensor here would cut the graph
            raise Unsupported(f"{self.describe(node)} returning a tensor")
        return value


_META_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}
_META_METHODS = {"size", "dim", "numel", "ndimension", "nelement", "type", "get_device"}


def make_op(fx_node, root, modules, names):
    """(op, [parameter names it uses directly]) for one traced node."""
    if fx_node.op == "placeholder":
        if fx_node.args:  # a keyword argument fixed to its default
            return ConstantOp(), []
        position = [n for n in fx_node.graph.nodes if n.op == "placeholder" and not n.args].index(fx_node)
        return InputOp(position), []
    if (
        fx_node.op == "call_function"
        and (fx_node.target is len or (fx_node.target is getattr and fx_node.args[1] in _META_ATTRIBUTES))
    ) or (fx_node.op == "call_method" and fx_node.target in _META_METHODS):
        return MetaOp(), []
    if fx_node.op == "get_attr":
        value = attribute(root, fx_node.target)
        trainable = isinstance(value, nn.Parameter) and value.requires_grad
        return ConstantOp(), ([fx_node.target] if trainable else [])
    if fx_node.op == "call_module":
        module = modules[fx_node.target]
        op = module_op(module, names)
        if op is not None:
            return op, [
                f"{fx_node.target}.{name}" if fx_node.target else name
                for name, p in module.named_parameters()
                if p.requires_grad
            ]
        return GenericOp(linear=isinstance(module, _LINEAR_MODULES), callee=module), []
    target = fx_node.target
    if (fx_node.op == "call_function" and target in _TUPLE_FUNCTIONS) or (
        fx_node.op == "call_method" and target in _TUPLE_METHODS
    ):
        return TupleOp(), []
    source = fx_node.args[0] if fx_node.args else None
    if (
        target is operator.getitem
        and isinstance(source, fx.Node)
        and (
            (source.op == "call_function" and source.target in _TUPLE_FUNCTIONS)
            or (source.op == "call_method" and source.target in _TUPLE_METHODS)
        )
        and isinstance(fx_node.args[1], int)
    ):
        return ItemOp(source, fx_node.args[1]), []
    found = module_for_call(fx_node, root)
    param_args = _param_args(fx_node, root)
    qualified = [name for _, name in param_args]
    if found is not None:
        module, bind, input_arg = found
        op = ModuleOp(module, rule_for(module), bind)
        op.input_arg = input_arg
        return op, qualified
    is_method = fx_node.op == "call_method"
    params = [node_name for node_name, _ in param_args]
    if (target in _RESHAPES and not is_method) or (is_method and target in _RESHAPE_METHODS):
        if fx_node.target != torch.flatten or _flatten_keeps_batch(fx_node):
            return ReshapeOp(), qualified
        return GenericOp(linear=True, param_args=params), qualified
    if (target in _ADDS and not is_method) or (is_method and target in ("add", "sub", "add_", "sub_")):
        if "alpha" not in fx_node.kwargs and len(fx_node.args) <= 2:
            return AddOp(params), qualified
        return GenericOp(linear=True, param_args=params), qualified
    if not is_method and target in (torch.cat, torch.concat, torch.concatenate):
        return CatOp(params), qualified
    if (not is_method and target in _LINEAR_FUNCTIONS) or (is_method and target in _LINEAR_METHODS):
        return GenericOp(linear=True, param_args=params), qualified
    if (not is_method and target in _PRODUCT_FUNCTIONS) or (is_method and target in _PRODUCT_METHODS):
        return ProductOp(params), qualified
    if not is_method and target is F.scaled_dot_product_attention:
        return AttentionOp(params), qualified
    if (not is_method and target in (F.softmax, torch.softmax)) or (is_method and target == "softmax"):
        return SoftmaxOp(params), qualified
    return GenericOp(linear=False, param_args=params), qualified


# ---------------------------------------------------------------- ops that move the batch axis
_AXIS_SWAPS = {torch.transpose, torch.swapaxes, torch.swapdims, "transpose", "swapaxes", "swapdims"}
_AXIS_MOVES = {torch.movedim, torch.moveaxis, "movedim", "moveaxis"}


def moved_axis(fx_node, axis):
    """Where a permute / transpose / movedim puts the axis at position `axis` of its input (timm's
    qkv.permute(2, 0, 3, 1, 4) takes the batch axis from 0 to 1; a transpose back returns it), or None: not such
    an op, or axes it cannot place without the input's rank (negative ones). A tensor whose batch axis is not at 0
    has no per-sample columns: each node that reads it computes it itself (trace.build_plan inlines it), and a
    move this cannot place is found when the node is evaluated (a batch axis elsewhere than 0 is refused)."""
    if fx_node.op not in ("call_function", "call_method"):
        return None
    target, args, kwargs = fx_node.target, fx_node.args[1:], fx_node.kwargs
    if target in ("permute", torch.permute):
        dims = kwargs.get("dims", args[0] if len(args) == 1 else args)
        if not isinstance(dims, (tuple, list)) or not all(isinstance(d, int) for d in dims):
            return None
        dims = [d % len(dims) for d in dims] if dims else []
        return dims.index(axis) if axis in dims else None
    if target in _AXIS_SWAPS:
        pair = list(args[:2]) + [kwargs[k] for k in ("dim0", "dim1") if k in kwargs]
        if len(pair) != 2 or not all(isinstance(d, int) and d >= 0 for d in pair):
            return None
        return pair[1] if axis == pair[0] else pair[0] if axis == pair[1] else axis
    if target in _AXIS_MOVES:
        pair = list(args[:2]) + [kwargs[k] for k in ("source", "destination") if k in kwargs]
        if len(pair) != 2 or not all(isinstance(d, int) and d >= 0 for d in pair):
            return None
        source, destination = pair
        if axis == source:
            return destination
        position = axis - (source < axis)
        return position + (destination <= position)
    return None


def reading_moved(op, fx_node):
    """The op for a node that reads inlined nodes (moved_axis): the specialised ops pull columns straight
    to their arguments, so anything but a tuple op, an item of one or a plain GenericOp becomes a GenericOp of the
    whole (differentiated through the inlined nodes)."""
    if type(op) in (GenericOp, TupleOp, ItemOp, MetaOp):
        return op
    if isinstance(op, (ReshapeOp, AddOp, CatOp)):
        return GenericOp(linear=True, param_args=getattr(op, "param_args", ()))
    if isinstance(op, (ProductOp, ClosedFormOp)):
        return GenericOp(linear=False, param_args=op.param_args)
    raise Unsupported(
        f"{fx_node.name} ({_target_name(fx_node)}) on a tensor whose batch axis was moved (no exact rule)"
    )


def _flatten_keeps_batch(fx_node):
    start = fx_node.args[1] if len(fx_node.args) > 1 else fx_node.kwargs.get("start_dim", 0)
    return isinstance(start, int) and start >= 1


def _param_args(fx_node, root):
    """The get_attr arguments holding trainable parameters: [(node name, qualified parameter name)]."""
    found = []
    for arg in _unique_nodes((fx_node.args, fx_node.kwargs)):
        if arg.op == "get_attr":
            value = attribute(root, arg.target)
            if isinstance(value, nn.Parameter) and value.requires_grad:
                found.append((arg.name, arg.target))
    return found


@dataclass(frozen=True)
class ParamView:
    """A parameter seen through linear maps that read nothing else that has derivatives (reshape, expand,
    indexing, transposes, scaling by a constant: timm's gamma.reshape(1, -1, 1, 1), ViT's cls_token.expand(N, -1,
    -1)). A node affine in the view is affine in the parameter, so its per-sample projections are the vjp through
    the view, summed over the places the view repeats the parameter before squaring: exact."""

    source: str  # the get_attr node of the parameter
    qualified: str  # the parameter's qualified name
    chain: tuple  # the fx nodes from the parameter to the view, in order

    def recompute(self, param, values, samples):
        local = collections.ChainMap({self.source: param}, values)  # the chain's results go to the first map
        for fx_node in self.chain:
            local[fx_node.name] = _call(fx_node, local)
        view = local[self.chain[-1].name]
        if samples > 1 and view.dim() > 0 and view.shape[0] == samples and view.stride(0) == 0:
            return view[:1]  # expanded over the batch: every sample reads the same copy, one sample's call one row
        return view


_VIEW_FUNCTIONS = (_LINEAR_FUNCTIONS | _RESHAPES) - {torch.cat, torch.concat, torch.stack, torch.hstack, torch.vstack}
_VIEW_METHODS = _LINEAR_METHODS | _RESHAPE_METHODS


def param_view(fx_node, views, derived):
    """The ParamView a non-input node computes, or None: a linear map of exactly one trainable parameter (or of a
    view of one), every other argument free of parameters. derived(arg): True when arg is a trainable parameter's
    get_attr or computed from one; views: those computed so far (a derived node that is no view was refused)."""
    if fx_node.op not in ("call_function", "call_method"):
        return None
    target = fx_node.target
    is_method = fx_node.op == "call_method"
    linear = (is_method and target in _VIEW_METHODS) or (not is_method and target in _VIEW_FUNCTIONS)
    scaled = (is_method and target in _PRODUCT_METHODS) or (not is_method and target in _PRODUCT_FUNCTIONS)
    if not (linear or scaled):
        return None
    sources = [arg for arg in _unique_nodes((fx_node.args, fx_node.kwargs)) if derived(arg)]
    if len(sources) != 1:
        return None
    source = sources[0]
    if scaled and target in _DIVISIONS and not (fx_node.args and fx_node.args[0] is source):
        return None  # c / p is not linear in p
    if source.name in views:
        below = views[source.name]
        return ParamView(below.source, below.qualified, below.chain + (fx_node,))
    return ParamView(source.name, source.target, (fx_node,))  # the parameter's own get_attr


class ProductOp(GenericOp):
    """x * y, x / y, x @ y: linear when one side is a constant or a parameter; a curved node (its second
    derivative couples the operands) when both depend on the input."""

    def __init__(self, param_args=()):
        super().__init__(linear=False, param_args=param_args)

    def check(self, node, nodes):
        super().check(node, nodes)
        fx_node = node.fx_node
        divisor = fx_node.args[1] if len(fx_node.args) > 1 else None
        divides = fx_node.target in _DIVISIONS
        operands = [arg for arg in fx_node.args[:2] if isinstance(arg, fx.Node) and arg.name in node.input_names]
        divides_by_input = divides and isinstance(divisor, fx.Node) and divisor.name in node.input_names
        if len(operands) <= 1 and not divides_by_input:  # x * c, c * x, x @ W, x / c: linear in x
            self.linear = True
            self.curved_possible = False
        if divides and node.params and isinstance(divisor, fx.Node) and divisor.op == "get_attr":
            raise Unsupported(
                f"parameter(s) {node.params} used as a divisor by {self.describe(node)} (not affine in the parameter)"
            )

    def residual_terms(self, node, max_columns, pair_columns):
        operands = self._gated_operands(node)
        if operands is None:  # outer products, matmul, division: the dense per-sample Hessian
            yield from super().residual_terms(node, max_columns, pair_columns)
        else:
            yield from self._gate_pairs(node, operands, pair_columns)

    def _gate_pairs(self, node, operands, max_columns):
        """a * b where a has the output's shape and b is broadcast over it (GLU and SwiGLU gates: b of the same
        shape; squeeze-excitation: b of (N, C, 1, 1)): in closed form. The term g . (a * b) is a^T A b, A[i, j] =
        g_i where output element i reads b_j, so its Hessian in (a, b) is sum_j of the pairs (A[:, j] at a, e_j
        at b): one pair per element of b, sign +1."""
        full, gate = operands
        grad = node.output_grad
        samples = grad.shape[0]
        gate_shape = node.values[node.input_names[gate]].shape
        # which element of b each output element reads, flat per sample
        reads = torch.arange(math.prod(gate_shape[1:]), device=grad.device).reshape(1, *gate_shape[1:])
        reads = reads.expand(grad.shape).reshape(samples, -1)[0]
        flat = grad.reshape(samples, -1)
        elements = math.prod(gate_shape[1:])
        for start in range(0, elements, max_columns):
            chunk = torch.arange(start, min(elements, start + max_columns), device=grad.device)
            selects = (reads.unsqueeze(0) == chunk.unsqueeze(1)).to(flat.dtype)  # (k, D_a)
            units = grad.new_zeros(samples, len(chunk), elements)
            units[:, torch.arange(len(chunk), device=grad.device), chunk] = 1
            signs = torch.ones(samples, len(chunk), dtype=flat.dtype, device=grad.device)
            yield {full: flat.unsqueeze(1) * selects.unsqueeze(0)}, {gate: units}, signs

    def forms_dense_term(self, node):
        return self._gated_operands(node) is None

    def _gated_operands(self, node):
        """The input positions (a, b) when the node is a * b of two different floating inputs, a of the output's
        shape and b of as many axes, one row per sample, broadcast over a's other axes."""
        fx_node = node.fx_node
        if self.linear or node.output_grad is None or self.prelude or fx_node.target not in _ELEMENTWISE_PRODUCTS:
            return None
        operands = fx_node.args[:2]
        if len(operands) != 2 or not all(isinstance(a, fx.Node) for a in operands) or operands[0] is operands[1]:
            return None
        names = [a.name for a in operands]
        if not all(name in node.input_names for name in names):
            return None
        values = [node.values[name] for name in names]
        shape = node.output_grad.shape
        if not all(v.is_floating_point() for v in values):
            return None
        for full, gate in ((0, 1), (1, 0)):
            a, b = values[full], values[gate]
            if a.shape == shape and b.dim() == len(shape) and b.shape[0] == shape[0]:
                if all(size in (1, whole) for size, whole in zip(b.shape, shape)):
                    return node.input_names.index(names[full]), node.input_names.index(names[gate])
        return None


_ELEMENTWISE_PRODUCTS = {operator.mul, operator.imul, torch.mul, "mul", "__mul__"}


class ClosedFormOp(GenericOp):
    """A curved call whose second-order term has a closed form where closed_form(node) reads the call (it returns
    what closed_terms needs), else GenericOp's dense per-sample term."""

    def __init__(self, param_args=()):
        super().__init__(linear=False, param_args=param_args)

    def closed_form(self, node):
        return None

    def closed_terms(self, node, found, max_columns, pair_columns):
        raise NotImplementedError

    def forms_dense_term(self, node):
        return self.closed_form(node) is None

    def residual_terms(self, node, max_columns, pair_columns):
        found = self.closed_form(node) if node.output_grad is not None else None
        if found is None:
            yield from super().residual_terms(node, max_columns, pair_columns)
        else:
            yield from self.closed_terms(node, found, max_columns, pair_columns)


class SoftmaxOp(ClosedFormOp):
    """softmax(x, dim): its term in closed form (softmax_terms.py) where the call reads one input along a known axis
    in its own dtype."""

    def closed_form(self, node):
        """The softmax axis of the node's input (batch axis excluded), or None."""
        fx_node = node.fx_node
        if self.prelude or node.values is None or len(node.input_names) != 1:
            return None
        args = list(fx_node.args[1:])
        dim = fx_node.kwargs.get("dim", args[0] if args else None)
        dtype = fx_node.kwargs.get("dtype", args[2] if fx_node.target is F.softmax and len(args) > 2 else None)
        if fx_node.target is torch.softmax or fx_node.op == "call_method":
            dtype = fx_node.kwargs.get("dtype", args[1] if len(args) > 1 else None)
        dim, dtype = (node.values.get(v.name) if isinstance(v, fx.Node) else v for v in (dim, dtype))  # x.dtype
        source = fx_node.args[0] if fx_node.args else fx_node.kwargs.get("input")
        x = node.values.get(getattr(source, "name", None))
        if not isinstance(dim, int) or not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
            return None
        if dtype is not None and dtype != x.dtype:
            return None
        dim = dim % x.dim()
        return dim if dim > 0 else None

    def closed_terms(self, node, found, max_columns, pair_columns):
        x = node.values[node.input_names[0]]
        return softmax_terms.softmax_terms(x, found, node.output_grad, max_columns, pair_columns)


class AttentionOp(ClosedFormOp):
    """F.scaled_dot_product_attention: pulled and evaluated as any call (torch.func through the math backend);
    its term in closed form (attention_terms.py) where the call is one that module reads."""

    def closed_form(self, node):
        """(bound call, (query, key, value) input positions) when attention_terms computes the term, else None."""
        fx_node = node.fx_node
        if self.prelude or node.values is None:
            return None
        call = attention_terms.bound_call(fx_node.args, fx_node.kwargs)
        qkv = ("query", "key", "value")
        if call is None or not all(isinstance(call[n], fx.Node) and call[n].name in node.input_names for n in qkv):
            return None  # a query that is a parameter (no columns of its own): the dense term
        mask = call["attn_mask"]
        if isinstance(mask, fx.Node) and node.carrying is not None and mask.name in node.input_names:
            if node.input_names.index(mask.name) in node.carrying:
                return None  # a mask with parameters below it (a learned bias): a term of its own, the dense one
        positions = tuple(node.input_names.index(call[name].name) for name in qkv)
        values = fx.node.map_arg(call, lambda n: node.values[n.name])
        return (values, positions) if attention_terms.closed_form_applies(values) else None

    def closed_terms(self, node, found, max_columns, pair_columns):
        call, positions = found
        return attention_terms.attention_terms(call, node.output_grad, positions, max_columns, pair_columns)


__all__ = [
    "make_op",
    "NodeOp",
    "ModuleOp",
    "GenericOp",
    "ReshapeOp",
    "AddOp",
    "ProductOp",
    "ClosedFormOp",
    "AttentionOp",
    "SoftmaxOp",
    "ParamView",
    "param_view",
    "ConstantOp",
    "InputOp",
    "Unsupported",
]
