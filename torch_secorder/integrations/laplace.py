"""laplace-torch curvature backends with exact diagonals from torch_secorder.

    from laplace import Laplace
    from torch_secorder.integrations.laplace import SecorderGGN, SecorderHessian

    la = Laplace(model, "classification", hessian_structure="diag", backend=SecorderGGN)
    la.fit(train_loader)

SecorderGGN: the exact GGN diagonal (laplace's own GGN backends' quantity; stochastic=True: the Monte-Carlo
Fisher with num_samples draws per sample). SecorderHessian: the exact Hessian diagonal, which laplace's
Hessian backends do not offer ("diag" raises NotImplementedError there). Full-network, last-layer and
subnetwork Laplace. Only the diagonal is provided here: other structures ("kron", "full") fall back to
what laplace's base classes do (the GGN's "full" through Jacobians) or raise.

laplace-torch is optional: pip install "torch-secorder[laplace]".
"""

try:
    from laplace.curvature import CurvatureInterface, GGNInterface
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "torch_secorder.integrations.laplace needs laplace-torch: pip install 'torch-secorder[laplace]'"
    ) from error

import copy
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

from ..core.curvatures import model_fisher_diagonal, model_ggn_diagonal
from ..core.hessian_diagonal import model_hessian_diagonal

__all__ = ["SecorderGGN", "SecorderHessian"]


class _ExactDiagonal:
    """diag(x, y) -> (factor * loss, factor * diagonal) as laplace wants it: the loss with reduction "sum"
    (laplace's lossfunc), one flat vector over the trainable parameters (of the last layer for last-layer
    Laplace, indexed by subnetwork_indices for subnetwork Laplace)."""

    # set by laplace's CurvatureInterface, which the backends below also derive from
    model: Any
    factor: float
    last_layer: bool
    subnetwork_indices: Any

    def _diagonal(self, model, inputs, targets):
        raise NotImplementedError

    def diag(self, x, y, **kwargs):
        model, inputs = self._model_and_inputs(x)
        loss, diagonal = self._diagonal(model, inputs, y)
        if self.subnetwork_indices is not None:
            diagonal = diagonal[self.subnetwork_indices]
        return self.factor * loss, self.factor * diagonal.detach()

    def _model_and_inputs(self, x):
        if not self.last_layer:
            # laplace calls model(x) with a batch that is a mapping (Hugging Face style) too; our functions
            # would call model(**x) for a dict, so the mapping goes in as the one positional argument
            return self.model, (x,) if isinstance(x, Mapping) else x
        # laplace's FeatureExtractor: the last layer's curvature depends only on its input features
        with torch.no_grad():
            _, features = self.model.forward_with_features(x)
        return _without_hooks(self.model.last_layer), features


def _without_hooks(module):
    """The module with the same parameters but without the hook laplace's FeatureExtractor put on it to
    catch the features (a hook makes the engine step aside; applied to the features, it has no work)."""
    bare = copy.copy(module)  # shares the parameter tensors, so the diagonals are theirs
    bare._forward_hooks, bare._forward_pre_hooks = OrderedDict(), OrderedDict()
    bare._forward_hooks_with_kwargs, bare._forward_hooks_always_called = OrderedDict(), OrderedDict()
    bare._forward_pre_hooks_with_kwargs = OrderedDict()
    return bare


class SecorderHessian(_ExactDiagonal, CurvatureInterface):
    """The exact Hessian diagonal (may be negative away from a minimum, where the GGN is not)."""

    def _diagonal(self, model, inputs, targets):
        return model_hessian_diagonal(model, self.lossfunc, inputs, targets, return_loss=True, flat=True)


class SecorderGGN(_ExactDiagonal, GGNInterface):
    """The exact GGN diagonal, or with stochastic=True the Monte-Carlo Fisher (num_samples draws per sample)."""

    def _diagonal(self, model, inputs, targets):
        if self.stochastic:
            return model_fisher_diagonal(
                model, self.lossfunc, inputs, targets, "mc", mc_samples=self.num_samples, return_loss=True, flat=True
            )
        return model_ggn_diagonal(model, self.lossfunc, inputs, targets, return_loss=True, flat=True)
