"""Recognises the loss (module or functional form) and gives its curvature at the model output."""

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from . import eligibility
from .curvature import Curvature
from .errors import Unsupported

_MODULE_KINDS = {nn.MSELoss: "mse", nn.CrossEntropyLoss: "cross_entropy", nn.BCEWithLogitsLoss: "bce_with_logits",
                 nn.NLLLoss: "nll"}
_FUNCTION_KINDS = {F.mse_loss: "mse", F.cross_entropy: "cross_entropy",
                   F.binary_cross_entropy_with_logits: "bce_with_logits", F.nll_loss: "nll"}
_OPTIONS = {
    "mse": ("reduction",),
    "cross_entropy": ("weight", "ignore_index", "label_smoothing", "reduction"),
    "bce_with_logits": ("weight", "pos_weight", "reduction"),
    "nll": ("weight", "ignore_index", "reduction"),
}
_DEFAULTS = {"reduction": "mean", "weight": None, "ignore_index": -100, "label_smoothing": 0.0, "pos_weight": None}


@dataclass
class LossSpec:
    kind: str
    options: dict = field(default_factory=dict)
    log_softmax_dim: int = 1  # nll: the dim of the model's final LogSoftmax (must be the class axis)


def recognise(loss_fn):
    """LossSpec for a supported loss, or a string saying why it is not supported."""
    kind, given = None, {}
    if isinstance(loss_fn, nn.Module):
        kind = _MODULE_KINDS.get(type(loss_fn))
        if kind is not None:
            given = {name: getattr(loss_fn, name) for name in _OPTIONS[kind] if hasattr(loss_fn, name)}
            hooked = eligibility.hook_reason(loss_fn)
            if hooked is not None:
                return f"loss {type(loss_fn).__name__} with {hooked}"
    else:
        function, keywords = loss_fn, {}
        if isinstance(loss_fn, functools.partial) and not loss_fn.args:
            function, keywords = loss_fn.func, dict(loss_fn.keywords)
        kind = _FUNCTION_KINDS.get(function)
        if kind is not None:
            unknown = set(keywords) - set(_OPTIONS[kind])
            if unknown:
                return f"loss option(s) {sorted(unknown)} of {function.__name__}"
            given = keywords
    if kind is None:
        name = type(loss_fn).__name__ if isinstance(loss_fn, nn.Module) else getattr(loss_fn, "__name__", repr(loss_fn))
        return f"loss {name} (supported: MSE, cross-entropy, BCE-with-logits, NLL after LogSoftmax)"
    options = {name: given.get(name, _DEFAULTS[name]) for name in _OPTIONS[kind]}
    if options["reduction"] not in ("mean", "sum"):
        return f"reduction={options['reduction']!r} (the loss must be a scalar: 'mean' or 'sum')"
    return LossSpec(kind, options)


def unsupported_output_reason(spec, output, targets):
    """Why this output/target pair has no exact loss rule, or None."""
    if spec.kind in ("cross_entropy", "nll") and output.dim() < 2:
        return f"{spec.kind} on outputs of shape {tuple(output.shape)} (no batch axis)"
    if spec.kind == "nll" and spec.log_softmax_dim % output.dim() != 1:
        return f"LogSoftmax(dim={spec.log_softmax_dim}) on outputs of shape {tuple(output.shape)} (not the class axis)"
    if spec.kind in ("mse", "bce_with_logits") and targets.shape != output.shape:
        return f"{spec.kind} with targets of shape {tuple(targets.shape)} broadcast to outputs {tuple(output.shape)}"
    return None


def output_curvature(spec, output, targets, *, diagonal_only=False, max_columns=None, memory_budget=None):
    """Per-sample Hessian of the loss in the model output (for nll: in the LogSoftmax input).

    diagonal_only: nothing below reads more than diag(H). max_columns: how many output-sized
    columns fit the memory budget at once (None: no limit)."""
    samples, options = output.shape[0], spec.options
    if spec.kind == "mse":
        diag = ops.mse_loss_hessian_diag(output, options["reduction"])
        return Curvature(output.shape[1:], diag=diag.reshape(samples, -1))
    if spec.kind == "bce_with_logits":
        diag = ops.bce_with_logits_hessian_diag(output, targets, options["weight"], options["pos_weight"],
                                                options["reduction"])
        return Curvature(output.shape[1:], diag=diag.reshape(samples, -1))
    if output.dim() > 2:
        return _positions_cross_entropy_curvature(spec, output, targets, diagonal_only, memory_budget)
    return _cross_entropy_curvature(spec, output, targets, diagonal_only, max_columns)


def class_rows(output, targets):
    """(N, C, d1, ...) outputs as (N P, C) rows, one per sample and position, with their targets (indices
    (N P,) or probabilities (N P, C)) and P; (N, C) outputs are their own rows (P = 1)."""
    samples, classes = output.shape[:2]
    positions = math.prod(output.shape[2:])

    def rows(tensor):
        return tensor.reshape(samples, classes, positions).transpose(1, 2).reshape(-1, classes)

    return rows(output), (rows(targets) if targets.is_floating_point() else targets.reshape(-1)), positions


def _positions_cross_entropy_curvature(spec, output, targets, diagonal_only, memory_budget):
    """Cross-entropy on (N, C, d1, ...): one C x C block per position, so per sample C columns per position,
    each zero outside its position (features ordered (C, positions) like the output)."""
    options = spec.options
    samples, classes = output.shape[:2]
    rows, row_targets, positions = class_rows(output, targets)
    scale = ops.cross_entropy_sample_scale(rows, row_targets, options["weight"], options["ignore_index"],
                                           options.get("label_smoothing", 0.0), options["reduction"])
    feature_shape = output.shape[1:]
    if diagonal_only:
        diag = ops.softmax_hessian_diag(rows, scale).reshape(samples, positions, classes).transpose(1, 2)
        return Curvature(feature_shape, diag=diag.reshape(samples, -1))
    size = samples * positions * classes * classes * positions * output.element_size()
    if memory_budget is not None and size > memory_budget:
        raise Unsupported(f"{spec.kind} over {positions} positions per sample: its per-sample factor "
                          f"({size / 2**20:.0f} MiB) exceeds memory_budget")
    negative = bool((scale < 0).any())
    root = ops.softmax_hessian_columns(rows, scale.abs() if negative else scale)  # (N P, C - 1, C)
    width = root.shape[1]
    columns = root.reshape(samples, positions, width, classes)  # [n, p, column, class]
    # column (p, v) of sample n holds column v of position p at features (c, p), zeros elsewhere
    factors = torch.diag_embed(columns.permute(0, 2, 3, 1)).permute(0, 3, 1, 2, 4)  # (N, P, V, C, P)
    signs = None
    if negative:
        signs = torch.sign(scale).reshape(samples, positions, 1).expand(-1, -1, width).reshape(samples, -1)
    return Curvature(feature_shape, factors=factors.reshape(samples, positions * width, -1), signs=signs)


def _cross_entropy_curvature(spec, output, targets, diagonal_only, max_columns):
    """H_n = s_n (diag(p_n) - p_n p_n^T). The scale s_n is negative where class weights or target
    probabilities are (PyTorch accepts both): such samples get signed columns, never a square root of
    a negative number. Three forms, by what is read below and what fits:
      diagonal only:  diag(H) itself, (N, C);
      C columns:      S S^T from the compiled square-root factor, signs = sign(s), while (N, C, C) fits;
      rank one:       diag(s p) minus the column sqrt|s| p: C + 1 columns in O(N C) memory, streamed."""
    options = spec.options
    scale = ops.cross_entropy_sample_scale(output, targets, options["weight"], options["ignore_index"],
                                           options.get("label_smoothing", 0.0), options["reduction"])
    feature_shape = output.shape[1:]
    if diagonal_only:
        return Curvature(feature_shape, diag=ops.softmax_hessian_diag(output, scale))
    may_be_negative = options["weight"] is not None or targets.is_floating_point()
    signs = torch.sign(scale) if may_be_negative and bool((scale < 0).any()) else None
    classes = output.shape[1]
    if max_columns is None or classes - 1 <= max_columns:
        columns = ops.softmax_hessian_columns(output, scale if signs is None else scale.abs())
        expanded = None if signs is None else signs.unsqueeze(1).expand(-1, columns.shape[1])
        return Curvature(feature_shape, factors=columns, signs=expanded)
    probabilities = torch.softmax(output, dim=1)
    column = (scale.abs().sqrt().unsqueeze(1) * probabilities).unsqueeze(1)  # (N, 1, C)
    column_sign = -torch.sign(scale).unsqueeze(1)  # a zero scale leaves a zero column: its sign is moot
    return Curvature(feature_shape, factors=column, signs=column_sign, diag=scale.unsqueeze(1) * probabilities)
