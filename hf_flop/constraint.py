"""The sparsity constraint: FLOP's augmented Lagrangian and the target warm-up.

The trainer adds ``lambda_1 (s - t) + lambda_2 (s - t)^2`` to the task loss, with ``s`` the
expected sparsity (a differentiable function of the gates) and ``t`` the target of the current
step. Model and gates minimise the sum; the two multipliers maximise it (gradient ascent), so any
lasting gap ``s - t`` makes them grow until the gates close that gap. This reaches a given size
precisely, where a fixed L0 penalty only trades size against loss.

Top-k gates (``gate="topk"``) get MLPruning's adaptive regularizer instead (below); both have the
same call signature, and ``CONSTRAINTS`` says which goes with which gate type.

MLPruning's adaptive regularization, in short:

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

import math

import torch
from torch import nn


class LagrangianConstraint(nn.Module):
    """The two Lagrange multipliers and the penalty they weight.

    Both start at 0. ``lambda_1`` follows the sign of the gap (it goes negative while the model is
    not yet sparse enough); ``lambda_2`` only grows, since its gradient ``(s - t)^2`` is never
    negative. The owner must train them by gradient *ascent* (e.g. an optimizer param group with
    ``maximize=True``) and without weight decay.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lambda_1 = nn.Parameter(torch.zeros(()))
        self.lambda_2 = nn.Parameter(torch.zeros(()))

    def forward(self, expected_sparsity: torch.Tensor, target_sparsity: float) -> torch.Tensor:
        gap = expected_sparsity - target_sparsity
        return self.lambda_1 * gap + self.lambda_2 * gap * gap

    def values(self) -> dict[str, float]:
        """The multipliers as plain floats (for logs and checkpoints)."""
        return {"lambda_1": self.lambda_1.item(), "lambda_2": self.lambda_2.item()}

    @torch.no_grad()
    def load_values(self, values: dict[str, float]) -> None:
        """Set the multipliers in place (the optimizer keeps referring to the same tensors)."""
        missing = {"lambda_1", "lambda_2"} - set(values)
        if missing:
            raise ValueError(f"constraint state lacks {sorted(missing)}; it was not written by PruningTrainer.")
        self.lambda_1.fill_(float(values["lambda_1"]))
        self.lambda_2.fill_(float(values["lambda_2"]))


def resolve_warmup_steps(warmup: float, total_steps: int) -> int:
    """``warmup`` as a number of steps: values below 1 are a fraction of ``total_steps``.

    The same convention as ``TrainingArguments.warmup_steps``.
    """
    if warmup < 0:
        raise ValueError(f"target_warmup_steps={warmup} must be >= 0 (a step count, or a fraction of the run if < 1).")
    return int(warmup) if warmup >= 1 else math.ceil(total_steps * warmup)


def warmed_up_target(target: float, step: int, warmup_steps: int) -> float:
    """The target sparsity at ``step``: linear from 0 to ``target`` over ``warmup_steps``, then flat."""
    if warmup_steps <= 0:
        return target
    return target * min(1.0, step / warmup_steps)


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


# gate type (FlopConfig.gate) -> the size constraint the trainer adds to the loss
CONSTRAINTS: dict[str, type[nn.Module]] = {"hard_concrete": LagrangianConstraint, "topk": AdaptiveRegularizer}
