"""The parameters' diagonals as the engines add them up, shared by the chain and the graph engine."""

import torch

from . import eligibility


class Diagonals:
    """Sums contributions per asked-for parameter. Pruned tensors: the rules see the effective weight the
    pruning hook computed in this forward (weight = weight_orig * mask), and its diagonal times mask^2 is
    the diagonal of weight_orig."""

    def __init__(self, params, modules, samples=None):
        self.params = params
        self.samples = samples  # per-sample diagonals: each contribution is (N, *parameter.shape)
        self.asked = {id(p) for p in params if p.requires_grad}
        self.pruned = {}  # id(effective weight) -> (original parameter, mask)
        for module in modules:
            for name, (original, mask) in eligibility.pruned_tensors(module).items():
                if id(original) in self.asked:
                    self.pruned[id(getattr(module, name))] = (original, mask)
        self.wanted = frozenset(self.asked | self.pruned.keys())  # what rules may contribute to
        self._sums = {}

    def add(self, tensor, value):
        key = id(tensor)
        if key in self.pruned:
            param, mask = self.pruned[key]
            key, value = id(param), value * (mask * mask)
        elif key not in self.asked:
            return
        self._sums[key] = value if key not in self._sums else self._sums[key] + value

    def result(self):
        """One tensor per parameter, in order; zeros where nothing reached it."""
        return [self._sums[id(p)] if id(p) in self._sums else self.zeros(p) for p in self.params]

    def zeros(self, param):
        if self.samples is None:
            return torch.zeros_like(param)
        return param.new_zeros(self.samples, *param.shape)
