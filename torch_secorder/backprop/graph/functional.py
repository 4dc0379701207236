"""Functional calls that are modules with rules: F.relu(x) is nn.ReLU()(x), F.linear(x, w, b) is an nn.Linear
holding w and b, and so on. The graph engine runs them through the module's rule (fast and exact)."""

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..._errors import Unsupported
from ..rules.batch_norm import FunctionalBatchNorm


def attribute(root, target):
    """root's attribute at a dotted path (a get_attr target such as 'layer1.0.weight')."""
    return operator.attrgetter(target)(root)


def _fixed(make):
    """An adapter for calls whose other arguments are plain constants: the module is built once."""

    def adapt(fx_node, root):
        args, kwargs = fx_node.args[1:], dict(fx_node.kwargs)
        kwargs.pop("input", None)
        if any(isinstance(a, fx.Node) for a in list(args) + list(kwargs.values())):
            return None  # an argument computed at run time: the generic op handles the call
        module = make(*args, **kwargs)
        return None if module is None else (module, None, fx_node.args[0])

    return adapt


def _no_inplace(cls, *names):
    def make(*args, **kwargs):
        kwargs.pop("inplace", None)
        values = dict(zip(names, args))
        values.update(kwargs)
        return cls(**values)

    return make


def _max_pool(cls):
    def make(kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
        return None if return_indices else cls(kernel_size, stride, padding, dilation, ceil_mode=ceil_mode)

    return make


def _avg_pool(cls, has_divisor=True):
    def make(kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None):
        if divisor_override is not None:
            return cls(kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
        return cls(kernel_size, stride, padding, ceil_mode, count_include_pad)

    return make


def _flatten(start_dim=0, end_dim=-1):
    return nn.Flatten(start_dim, end_dim) if isinstance(start_dim, int) and start_dim >= 1 else None


def _dropout(p=0.5, training=True, inplace=False):
    return nn.Dropout(p, inplace).train(training)


_FIXED = {
    F.relu: _no_inplace(nn.ReLU),
    torch.relu: _no_inplace(nn.ReLU),
    "relu": _no_inplace(nn.ReLU),
    F.tanh: _no_inplace(nn.Tanh),
    torch.tanh: _no_inplace(nn.Tanh),
    "tanh": _no_inplace(nn.Tanh),
    F.sigmoid: _no_inplace(nn.Sigmoid),
    torch.sigmoid: _no_inplace(nn.Sigmoid),
    "sigmoid": _no_inplace(nn.Sigmoid),
    F.gelu: _no_inplace(nn.GELU, "approximate"),
    F.silu: _no_inplace(nn.SiLU),
    F.mish: _no_inplace(nn.Mish),
    F.softplus: _no_inplace(nn.Softplus, "beta", "threshold"),
    F.elu: _no_inplace(nn.ELU, "alpha"),
    F.leaky_relu: _no_inplace(nn.LeakyReLU, "negative_slope"),
    F.logsigmoid: _no_inplace(nn.LogSigmoid),
    F.hardtanh: _no_inplace(nn.Hardtanh, "min_val", "max_val"),
    F.relu6: _no_inplace(nn.ReLU6),
    F.selu: _no_inplace(nn.SELU),
    F.celu: _no_inplace(nn.CELU, "alpha"),
    F.tanhshrink: _no_inplace(nn.Tanhshrink),
    F.softsign: _no_inplace(nn.Softsign),
    F.hardsigmoid: _no_inplace(nn.Hardsigmoid),
    F.hardswish: _no_inplace(nn.Hardswish),
    F.max_pool1d: _max_pool(nn.MaxPool1d),
    F.max_pool2d: _max_pool(nn.MaxPool2d),
    F.max_pool3d: _max_pool(nn.MaxPool3d),
    F.avg_pool1d: _avg_pool(nn.AvgPool1d),
    F.avg_pool2d: _avg_pool(nn.AvgPool2d),
    F.avg_pool3d: _avg_pool(nn.AvgPool3d),
    F.adaptive_avg_pool1d: nn.AdaptiveAvgPool1d,
    F.adaptive_avg_pool2d: nn.AdaptiveAvgPool2d,
    F.adaptive_avg_pool3d: nn.AdaptiveAvgPool3d,
    torch.flatten: _flatten,
    "flatten": _flatten,
    F.dropout: _dropout,
}
# torch's functional max pools are wrappers chosen by return_indices: the traced target may be either
for _name in ("max_pool1d", "max_pool2d", "max_pool3d"):
    for _variant in (_name + "_with_indices", "_" + _name):
        if hasattr(F, _variant):
            _FIXED.setdefault(getattr(F, _variant), _FIXED[getattr(F, _name)])


def _weighted(build, names, tensors=("weight", "bias"), anchors=("weight",)):
    """An adapter for F.linear / F.conv*d / F.layer_norm / F.embedding / F.batch_norm: the module is built once
    from the shape of the first of `anchors` it is given (a parameter or buffer of the model) and gets this call's
    tensors (whatever they are) at each evaluation."""

    def adapt(fx_node, root):
        bound = dict(zip(names, fx_node.args))
        bound.update(fx_node.kwargs)
        own = {key: bound.get(key) for key in tensors}
        constants = {key: value for key, value in bound.items() if key != "input" and key not in tensors}
        if any(isinstance(value, fx.Node) for value in constants.values()):
            return None
        anchor = next((own[key] for key in anchors if own[key] is not None), None)
        if not isinstance(anchor, fx.Node) or anchor.op != "get_attr":
            return None  # a weight computed in the forward: the generic op (its product with the input) handles it
        present = {key: arg is not None for key, arg in own.items()}
        module = build(attribute(root, anchor.target), present, **constants)
        if module is None:
            return None

        def bind(module, node, values):
            for key, arg in own.items():
                module._parameters.pop(key, None)
                module._buffers.pop(key, None)
                object.__setattr__(module, key, None if arg is None else values[arg.name])

        return module, bind, bound["input"]

    return adapt


def _linear(weight, present):
    return nn.Linear(weight.shape[1], weight.shape[0], bias=present["bias"], device="meta")


def _conv(cls):
    def build(weight, present, stride=1, padding=0, dilation=1, groups=1):
        return cls(
            weight.shape[1] * groups,
            weight.shape[0],
            tuple(weight.shape[2:]),
            stride,
            padding,
            dilation,
            groups,
            bias=present["bias"],
            device="meta",
        )

    return build


def _layer_norm(weight, present, normalized_shape, eps=1e-5):
    return nn.LayerNorm(normalized_shape, eps, elementwise_affine=True, bias=present["bias"], device="meta")


def _batch_norm(first, present, training=False, momentum=0.1, eps=1e-5):
    if training or not present["running_mean"] or not present["running_var"]:
        raise Unsupported(
            "F.batch_norm with batch statistics (train mode, or no running statistics: they couple the samples); "
            "call model.eval()"
        )
    affine = present["weight"] and present["bias"]
    if present["weight"] != present["bias"]:
        return None  # one of weight and bias: rare, left to the generic op
    return FunctionalBatchNorm(first.shape[0], eps, affine=affine, device="meta").eval()


def _embedding(weight, present, padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False, sparse=False):
    if max_norm is not None or scale_grad_by_freq:
        return None  # the generic op (and its checks) decide
    if padding_idx is not None and padding_idx < 0:
        padding_idx += weight.shape[0]
    return nn.Embedding(weight.shape[0], weight.shape[1], padding_idx, device="meta")


_WEIGHTED = {
    F.linear: _weighted(_linear, ("input", "weight", "bias")),
    F.conv1d: _weighted(_conv(nn.Conv1d), ("input", "weight", "bias", "stride", "padding", "dilation", "groups")),
    F.conv2d: _weighted(_conv(nn.Conv2d), ("input", "weight", "bias", "stride", "padding", "dilation", "groups")),
    F.conv3d: _weighted(_conv(nn.Conv3d), ("input", "weight", "bias", "stride", "padding", "dilation", "groups")),
    F.layer_norm: _weighted(_layer_norm, ("input", "normalized_shape", "weight", "bias", "eps")),
    F.batch_norm: _weighted(
        _batch_norm,
        ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
        ("running_mean", "running_var", "weight", "bias"),
        ("running_mean", "running_var", "weight", "bias"),
    ),
    F.embedding: _weighted(
        _embedding, ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
    ),
}


def _weight_on_the_right(fx_node, root):
    """x @ W with W a 2-D parameter of the model (Hugging Face's Conv1D in GPT-2, projections written by hand): an
    nn.Linear whose weight is W^T, a view of W, read back as W's (ModuleOp.read_through); else None (a product)."""
    if len(fx_node.args) != 2 or fx_node.kwargs:
        return None
    x, w = fx_node.args
    if not isinstance(x, fx.Node) or not isinstance(w, fx.Node) or w.op != "get_attr":
        return None
    weight = attribute(root, w.target)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 2:
        return None
    module = nn.Linear(weight.shape[0], weight.shape[1], bias=False, device="meta")

    def bind(module, node, values):
        stored = values[w.name]
        module._parameters.pop("weight", None)
        view = stored.t()
        object.__setattr__(module, "weight", view)
        # the view's id -> (the parameter, a value of the view's shape read back as the parameter's, the call)
        object.__setattr__(module, "read_through", {id(view): (stored, _transposed, torch.matmul)})

    return module, bind, x


def _transposed(value):
    """A diagonal or projections of W^T (..., out, in) as W's (..., in, out)."""
    return value.transpose(-2, -1)


_WEIGHTED.update({torch.matmul: _weight_on_the_right, operator.matmul: _weight_on_the_right})


def module_for_call(fx_node, root):
    """(module, bind or None, input node) when this call_function / call_method is a module with a rule, else None."""
    if fx_node.op not in ("call_function", "call_method") or not fx_node.args:
        return None
    adapter = _WEIGHTED.get(fx_node.target) if fx_node.op == "call_function" else None
    if adapter is None:
        make = _FIXED.get(fx_node.target)
        if make is None or (fx_node.op == "call_method") != isinstance(fx_node.target, str):
            return None
        adapter = _fixed(make)
    try:
        found = adapter(fx_node, root)
    except (TypeError, ValueError):
        return None  # arguments the module does not take: the generic op runs the call as written
    if found is None or not isinstance(found[2], fx.Node):
        return None
    if not isinstance(found[0], nn.Dropout):  # F.dropout's mode is its training argument; no other call has one
        found[0].train(False)
    return found
