"""PruningTrainer under accelerate's FSDP2: whole gates, their gradients averaged, the multipliers added late.

accelerate enables FSDP on GPU-type devices only (its ``AcceleratorState`` takes the FSDP branch for
multi-GPU/NPU/XPU/... processes, not for CPU ones). What the trainer needs there:

* the gates stay whole (the expected sparsity and the eval masks read them outside the forward
  pass; see ``hf_flop.fsdp``): they are added to the plugin's ``ignored_modules``;
* FSDP does not reduce ignored parameters' gradients, so each gate averages its gradient over the
  processes as it is accumulated (a hook), before Trainer clips and steps;
* accelerate's FSDP2 ``prepare`` swaps every optimizer parameter for the model's sharded one and
  fails on a parameter the model does not hold: the Lagrange multipliers (``trainer.constraint``). So
  the trainer creates its optimizer without them and adds their groups after ``prepare``, when it
  creates the scheduler (``hf_flop.training.optimizer.add_missing_multipliers``).

Refused: FSDP1 (flat parameters hide the gates' identities from the optimizer groups), and
``pruning_phase < 1`` (the one-shot masks and the refit read whole weights).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..fsdp import fsdp_ignored_params
from ..lookup import find_flop_model


def fsdp_version(trainer) -> int | None:
    """accelerate's FSDP version for ``trainer`` (None: not under FSDP)."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return None
    return int(getattr(trainer.accelerator.state.fsdp_plugin, "fsdp_version", 1))


def _modules(spec, model: nn.Module) -> list[nn.Module]:
    """accelerate's ``ignored_modules`` (None, a regex fully matching module names, or modules) as modules."""
    if spec is None:
        return []
    if isinstance(spec, str):
        pattern = re.compile(spec)
        return [m for name, m in model.named_modules() if pattern.fullmatch(name)]
    return list(spec)


def _average_gradient(param: torch.Tensor) -> None:
    """Average ``param.grad`` over the processes (a gate after each backward; one already averaged stays so)."""
    world = torch.distributed.get_world_size()
    torch.distributed.all_reduce(param.grad)
    param.grad /= world


def setup_fsdp(trainer, model: nn.Module) -> None:
    """Under accelerate's FSDP, before ``prepare``: refuse what cannot run, keep the gates whole, average their gradients."""
    version = fsdp_version(trainer)
    if version is None:
        return
    if version != 2:
        raise ValueError(
            f"PruningTrainer under FSDP version {version}: use FSDP2 (fsdp_version: 2 in the accelerate config, or "
            "fsdp_config={'version': 2}); FSDP1's flat parameters hide the gates from their optimizer group."
        )
    if trainer.args.pruning_phase < 1:
        raise ValueError(
            f"PruningArguments(pruning_phase={trainer.args.pruning_phase}) under FSDP: the one-shot masks and the refit "
            "read every weight whole, which FSDP shards. Learn the gates under FSDP (pruning_phase=1.0), or run the "
            "one-shot and two-phase routes under DDP (docs/training.md, Distributed training)."
        )
    plugin = trainer.accelerator.state.fsdp_plugin
    gates = list(find_flop_model(model).gates().values())
    others = [m for m in _modules(plugin.ignored_modules, model) if all(m is not g for g in gates)]
    plugin.ignored_modules = others + gates
    for param in fsdp_ignored_params(model):
        param.register_post_accumulate_grad_hook(_average_gradient)
