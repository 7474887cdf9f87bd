"""Checks before training: will injecting FLOP into this model and training it to the target work?

A job that fine-tunes the dense model first (the CLI) only injects FLOP after that fine-tune, so an
unsupported architecture or an unreachable target would surface after minutes of training. These
checks run what ``get_flop_model`` and ``PruningTrainer`` check, on the model as it is, without
changing it and without copying its weights: the injection runs on a copy whose tensors live on
PyTorch's ``meta`` device (shapes only, no memory, no arithmetic). A layout hf_flop does not ship
is verified by those same checks (``hf_flop.recognition.spec_for``), on a small copy built from the
config (``hf_flop.layout_check``): a weightless copy has no outputs to compare.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from .accounting import check_reachable
from .config import FlopConfig
from .lookup import find_flop_model
from .model import check_flop_config, get_flop_model


def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are on the ``meta`` device (no data copied).

    Shared tensors (tied weights) stay shared, so the copy has the model's exact structure.
    """
    memo: dict[int, object] = {}
    for param in model.parameters():
        memo[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
    for buffer in model.buffers():
        memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    return copy.deepcopy(model, memo)


def check_before_training(model: nn.Module, config: FlopConfig, *, option: str = "target_modules") -> None:
    """Raise now what injecting ``config`` into ``model`` and starting ``PruningTrainer`` would raise.

    Checks the architecture against the levels, the target modules, each level's own conditions
    (``hf_flop.model.check_flop_config``; ``option`` names the target-modules setting in the
    caller's interface) and that the target sparsity is reachable with these levels. ``model`` is
    left untouched.
    """
    if not isinstance(config, FlopConfig):
        raise TypeError(f"check_before_training needs a FlopConfig, got {type(config).__name__}.")
    check_flop_config(model, config, option=option)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes about the copy are not the user's concern
        shell = get_flop_model(meta_copy(model), copy.deepcopy(config))
    # the gates are tiny: give them real (zero) values so the parameter count can be read
    for gate in find_flop_model(shell).gates().values():
        gate.to_empty(device="cpu")
        with torch.no_grad():
            for tensor in [*gate.parameters(), *gate.buffers()]:
                tensor.zero_()
    check_reachable(shell)
