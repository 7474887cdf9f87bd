"""DDP helpers: every process holds the whole weights, so a refit on one must reach all, and frozen gates must be known.

Not FSDP or DeepSpeed: sharded engines hold no whole weights (the refit does not support them).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.training_args import ParallelMode


def under_ddp(trainer) -> bool:
    """Whether ``trainer`` trains under DDP: several processes, each with the whole weights."""
    args = trainer.args
    distributed = args.parallel_mode == ParallelMode.DISTRIBUTED and args.world_size > 1
    return distributed and not trainer.is_fsdp_enabled and not trainer.is_deepspeed_enabled


def broadcast_weights(model: nn.Module) -> None:
    """Make every process hold process 0's weights (each ran the refit on its own)."""
    for param in model.parameters():
        torch.distributed.broadcast(param.data, src=0)


def check_can_freeze(args, schedule, ddp: bool, resuming: bool) -> None:
    """Refuse a run that would freeze the gates inside a DDP wrapper built with ``find_unused_parameters=False``.

    DDP's reducer then waits, every step, for a gradient of each parameter that required one when
    the wrapper was built; frozen gates never send one, so the first recovery step fails with DDP's
    "Expected to have finished reduction" error, after the whole pruning phase and the refit. The
    gates freeze after the wrap at the boundary (two-phase) and on resuming (the checkpoint's
    recovery phase is restored after it); only a fresh one-shot run freezes them before, so DDP
    leaves them out. Checked in ``train()``, before the first step.
    """
    if not (schedule.has_recovery and args.ddp_find_unused_parameters is False and ddp):
        return
    if schedule.kind == "two-phase" or resuming:
        raise ValueError(
            f"PruningArguments(pruning_phase={args.pruning_phase}) under DDP with ddp_find_unused_parameters=False: "
            "the gates freeze after DDP wrapped the model ("
            + ("when the checkpoint's recovery phase is restored" if resuming else "at the phase boundary")
            + "), and DDP then fails at the first recovery step waiting for their gradients. Leave "
            "ddp_find_unused_parameters unset (Trainer uses True for a PEFT model) or set it to True."
        )
