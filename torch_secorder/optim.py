"""A diagonal second-order optimizer in the style of Sophia (Liu et al., 2023), fed by this library's diagonals.

    optimizer = SophiaDiagonal(model.parameters(), lr=1e-3, update_every=10)
    for x, y in loader:
        optimizer.zero_grad()
        if optimizer.curvature_due():  # one call: the diagonal, and the gradient left in .grad as backward() would
            loss, diagonal = model_ggn_diagonal(model, loss_fn, x, y, backward=True)  # or any model_*_diagonal
            optimizer.update_curvature(diagonal)  # (or a model_hessian_diagonal_estimate, then backward())
        else:
            loss = loss_fn(model(x), y)
            loss.backward()
        optimizer.step()

Per parameter: m = beta1 m + (1 - beta1) g every step; every `update_every` steps the curvature EMA
h = beta2 h + (1 - beta2) d with the diagonal d you pass (the exact Hessian, the GGN, a Fisher, or a
Hutchinson DiagonalEstimate, whose .diagonal is taken); the step is
theta -= lr * sign(m) * min(|m| / max(rho * h, eps), 1) (Sophia's clipping: where the curvature is small,
negative or not yet known the step is at most lr per entry), with decoupled weight decay.
"""

import torch

from .core._matching import diagonals_for
from .core.estimate import DiagonalEstimate


class SophiaDiagonal(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.965, 0.99), rho=0.04, weight_decay=0.0, eps=1e-12, update_every=10):
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if not rho > 0 or not eps > 0 or weight_decay < 0:
            raise ValueError(
                f"rho and eps must be positive and weight_decay >= 0, got {rho!r}, {eps!r}, {weight_decay!r}"
            )
        if not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every must be a positive int, got {update_every!r}")
        super().__init__(params, dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, eps=eps))
        self.update_every = update_every
        self.steps = 0

    def state_dict(self):
        state = super().state_dict()
        state["steps"] = self.steps  # when the next curvature refresh is due survives a checkpoint
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        self.steps = state_dict.pop("steps", 0)
        super().load_state_dict(state_dict)

    def curvature_due(self):
        """True on the steps whose curvature should be refreshed (the first, then every update_every)."""
        return self.steps % self.update_every == 0

    @torch.no_grad()
    def update_curvature(self, diagonals):
        """Folds a curvature diagonal into the EMA. diagonals: what model_*_diagonal returns (one tensor per
        parameter, or flat=True's vector), matched to the optimizer's parameters by identity, whatever the order
        of the param groups; a dict {parameter: diagonal}; a plain list / flat vector in the optimizer's own
        order (a flat one over the parameters that require grad); or a DiagonalEstimate (its .diagonal; its
        standard error is not used). A parameter that requires grad and has no diagonal is an error naming it;
        frozen ones are skipped."""
        if isinstance(diagonals, DiagonalEstimate):
            diagonals = diagonals.diagonal
        matched = diagonals_for(diagonals, self.param_groups, "update_curvature")
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for param in group["params"]:
                if id(param) not in matched:
                    continue
                diagonal = matched[id(param)].to(param.dtype)
                state = self.state[param]
                if "curvature" not in state:
                    state["curvature"] = diagonal.clone()  # the first estimate as it is, not shrunk towards 0
                else:
                    state["curvature"].mul_(beta2).add_(diagonal, alpha=1 - beta2)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1 = group["betas"][0]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                momentum = state.setdefault("momentum", torch.zeros_like(param))
                momentum.mul_(beta1).add_(param.grad, alpha=1 - beta1)
                if group["weight_decay"]:
                    param.mul_(1 - group["lr"] * group["weight_decay"])
                curvature = state.get("curvature")
                if curvature is None:
                    ratio = torch.ones_like(param)  # no curvature yet: a sign step of size lr
                else:
                    ratio = (momentum.abs() / (group["rho"] * curvature).clamp_min(group["eps"])).clamp_max(1)
                param.addcmul_(momentum.sign(), ratio, value=-group["lr"])
        self.steps += 1
        return loss
