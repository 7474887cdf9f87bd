"""MLPruning's adaptive regularization, the size pressure that goes with ``gate="topk"``.

With Top-k gates the kept fraction of each gate is ``sigmoid(threshold)``, a deterministic
quantity: there is no expectation to constrain, only a size to push down. MLPruning pushes it with
a penalty on the remaining fraction ``rho`` of the prunable parameters that

* applies only while ``rho`` is above the target remaining fraction ``rho*`` (no pull back up: the
  task loss's straight-through gradient on the thresholds does that when units are worth keeping);
* grows with the distance: ``strength * (rho - rho*)^2`` with
  ``strength = max(min_strength, scale * ((rho - rho*) / (1 - rho*))^2)``, held constant
  (detached) within a step, so the pressure is strong while far from the target and settles to
  ``min_strength`` near it.

``AdaptiveRegularizer`` has the call signature of ``hf_flop.constraint.LagrangianConstraint``
(``penalty = reg(expected_sparsity, target_sparsity)``, ``values()``, ``load_values()``) so a trainer
can use either; it has no parameters of its own.

Momentum: a one-sided penalty stops pushing the moment the size reaches the target, but Adam's
first moment keeps the thresholds moving for ~1/(1 - beta1) more steps, overshooting the target by
several percent. The gates' optimizer group should therefore run without momentum
(``gate_group_overrides``); with it, the size settles on the target (tests/test_topk.py).
"""

from __future__ import annotations

import torch
from torch import nn


class AdaptiveRegularizer(nn.Module):
    """``strength * max(0, rho - rho*)^2`` on the remaining fraction ``rho = 1 - sparsity``.

    ``min_strength`` is the pressure near the target (MLPruning uses 50 for a cross-entropy task
    loss); ``scale`` sets how fast it grows with the normalised distance to the target.
    """

    def __init__(self, min_strength: float = 50.0, scale: float = 500.0) -> None:
        super().__init__()
        if min_strength <= 0 or scale < 0:
            raise ValueError(
                f"AdaptiveRegularizer needs min_strength > 0 and scale >= 0, got {min_strength} and {scale}."
            )
        self.min_strength = min_strength
        self.scale = scale
        self.last: dict[str, float] = {"topk_strength": 0.0, "topk_gap": 0.0}

    def strength(self, gap: float, target_remaining: float) -> float:
        """The penalty's weight at a distance ``gap`` above the target remaining fraction."""
        room = max(1.0 - target_remaining, 1e-6)
        return max(self.min_strength, self.scale * (gap / room) ** 2)

    def forward(self, expected_sparsity: torch.Tensor, target_sparsity: float) -> torch.Tensor:
        remaining = 1.0 - expected_sparsity
        target_remaining = 1.0 - target_sparsity
        gap = torch.clamp(remaining - target_remaining, min=0.0)
        value = float(gap.detach())
        strength = self.strength(value, target_remaining) if value > 0 else 0.0
        self.last = {"topk_strength": strength, "topk_gap": value}
        return strength * gap * gap

    def values(self) -> dict[str, float]:
        """The last step's strength and gap, for logs and checkpoints."""
        return dict(self.last)

    def load_values(self, values: dict[str, float]) -> None:
        """Restore the logged values (the regularizer has no state that training depends on)."""
        self.last = {k: float(values.get(k, 0.0)) for k in self.last}


def gate_group_overrides(optimizer: torch.optim.Optimizer) -> dict:
    """Settings for the optimizer param group of Top-k gates: no first-moment momentum (see above).

    For Adam-family optimizers (``betas`` in their defaults) returns ``{"betas": (0.0, beta2)}``,
    keeping the optimizer's ``beta2``; for others (SGD: ``momentum``) ``{"momentum": 0.0}``; else ``{}``.
    """
    defaults = optimizer.defaults
    if "betas" in defaults:
        return {"betas": (0.0, defaults["betas"][1])}
    if "momentum" in defaults:
        return {"momentum": 0.0}
    return {}
