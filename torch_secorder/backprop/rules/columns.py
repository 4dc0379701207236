"""Factor columns through maps that are linear in their input: folded into one batch, or pulled back with a
batched vector-Jacobian product (the graph engine's generic nodes use the same)."""

import torch

from ..curvature import Curvature


def fold_columns(columns):
    """(N, V, D) columns as one batch (B, D) without a copy when possible, and the map back to (N, V, D_in)."""
    samples, width = columns.shape[:2]
    if not columns.is_contiguous() and columns.transpose(0, 1).is_contiguous():  # stored (V, N, D)
        return columns.transpose(0, 1).reshape(width * samples, -1), (
            lambda result: result.reshape(width, samples, -1).transpose(0, 1)
        )
    return columns.reshape(samples * width, -1), lambda result: result.reshape(samples, width, -1)


def pull_columns(function, inputs, columns):
    """J^T columns of function at inputs, one batched vjp: columns (N, V, D_out) -> [(N, V, D_in) per input]."""
    samples, width = columns.shape[:2]
    with torch.enable_grad():  # the vjp needs the function's graph, whatever the caller's mode
        output, vjp_fn = torch.func.vjp(function, *inputs)  # type: ignore[misc]
    cotangents = columns.transpose(0, 1).reshape(width, *output.shape)
    return [pulled.reshape(width, samples, -1).transpose(0, 1) for pulled in torch.func.vmap(vjp_fn)(cotangents)]


def linear_transpose_columns(function, x, curvature, max_columns):
    """Curvature at the input of a map that is linear in x: J^T H J, as factor chunks."""
    feature_shape = x.shape[1:]
    for columns, signs in curvature.signed_factor_chunks(max_columns):
        yield Curvature(feature_shape, pull_columns(function, [x], columns)[0], signs)
