"""Diagonals that remember their parameters, so that code taking them back matches them by identity.

model_*_diagonal returns one tensor per parameter of model.parameters() (a ParameterDiagonals list, with
.params), or with flat=True one vector over the parameters that require grad (its .secorder_params says
which). An optimizer's param groups list the same tensors in another order, or only some of them:
diagonals_for matches by identity, never by position, wherever the diagonals say whose they are.
"""

import torch

FLAT_ATTRIBUTE = "secorder_params"


class ParameterDiagonals(list):
    """A list of diagonals, one per parameter, with .params: those parameters, in the same order."""

    def __init__(self, diagonals, params):
        super().__init__(diagonals)
        self.params = tuple(params)


def tag_flat(vector, params):
    """Marks a flat vector (model_*_diagonal(..., flat=True)) with the parameters it runs over, in order."""
    setattr(vector, FLAT_ATTRIBUTE, tuple(params))
    return vector


def owners(diagonals):
    """The parameters the diagonals belong to, in order, when the diagonals say so; else None."""
    if isinstance(diagonals, ParameterDiagonals):
        return diagonals.params
    if isinstance(diagonals, torch.Tensor):
        return getattr(diagonals, FLAT_ATTRIBUTE, None)
    return None


def diagonals_for(diagonals, groups, caller):
    """{id(param): diagonal} for the parameters of `groups` (an optimizer's param_groups) that require grad (frozen
    ones get none).

    diagonals: a list with one tensor per parameter or one flat vector, either from this library (matched by
    identity) or plain (then in the groups' order, the parameters that require grad for a flat vector); or a
    dict {parameter: diagonal}. A parameter without a diagonal, or a diagonal of the wrong size, is an error
    naming the parameter as param_groups[g]['params'][i]."""
    listed = [
        (f"param_groups[{g}]['params'][{i}]", p)
        for g, group in enumerate(groups)
        for i, p in enumerate(group["params"])
    ]
    if isinstance(diagonals, dict):
        pairs = list(diagonals.items())
    else:
        params = owners(diagonals)
        if params is None:  # plain values: the optimizer's own order
            flat = isinstance(diagonals, torch.Tensor)
            params = [p for _, p in listed if p.requires_grad or not flat]
        if isinstance(diagonals, torch.Tensor):
            sizes = [p.numel() for p in params]
            if diagonals.numel() != sum(sizes):
                raise ValueError(
                    f"{caller}: a flat diagonal of {diagonals.numel()} entries for parameters of "
                    f"{sum(sizes)} entries in all"
                )
            diagonals = torch.split(diagonals.reshape(-1), sizes)
        diagonals = list(diagonals)
        if len(diagonals) != len(params):
            raise ValueError(
                f"{caller} needs one diagonal per parameter: got {len(diagonals)} for {len(params)} parameters"
            )
        pairs = list(zip(params, diagonals))
    found = {id(param): diagonal for param, diagonal in pairs}
    matched = {}
    for name, param in listed:
        if not param.requires_grad:
            continue  # a frozen parameter: no curvature to track
        diagonal = found.get(id(param))
        if diagonal is None:
            raise ValueError(
                f"{caller}: no diagonal for {name} (shape {tuple(param.shape)}); the diagonals cover other parameters"
            )
        if diagonal.numel() != param.numel():
            raise ValueError(
                f"{caller}: the diagonal for {name} has {diagonal.numel()} entries, the parameter "
                f"{param.numel()} (shape {tuple(param.shape)})"
            )
        matched[id(param)] = diagonal.reshape(param.shape)
    return matched
