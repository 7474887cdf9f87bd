"""The sparsity constraint: FLOP's augmented Lagrangian and the target warm-up.

The trainer adds ``lambda_1 (s - t) + lambda_2 (s - t)^2`` to the task loss, with ``s`` the
expected sparsity (a differentiable function of the gates) and ``t`` the target of the current
step. Model and gates minimise the sum; the two multipliers maximise it (gradient ascent), so any
lasting gap ``s - t`` makes them grow until the gates close that gap. This reaches a given size
precisely, where a fixed L0 penalty only trades size against loss.
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
