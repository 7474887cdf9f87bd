"""LoRA recovery: the compacted model's recovery steps train PEFT LoRA adapters, merged into its weights after.

With ``PruningArguments.recovery_lora_rank`` a one-shot run (``pruning_phase=0``) that recovers on
the compacted model (``compacted_recovery``) trains low-rank adapters on that model's linears
instead of every weight: the optimizer holds the adapters alone, so its state and the gradients
are a small fraction of full fine-tuning's. When training ends (also on an error) the adapters are
merged (``merge_and_unload``) and the merged weights are written back into the gated model, so
``compact(model)`` and ``save_compacted`` give a plain dense model that loads without peft.

Checkpoints of such a run hold the adapters (Trainer's ``adapter_model.safetensors``), the gates
(``flop_gates.pt``) and the compacted model's frozen weights (``flop_lora_base.pt``: the one-shot
refit changed them, so the user's fresh model cannot rebuild them), from which ``train`` resumes.
"""

from __future__ import annotations

import os

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel

from ..compact import kept_slices
from ..groups import GROUP_LEVELS
from ..linear import is_linear

DEFAULT_TARGET_MODULES = "all-linear"  # PEFT's name for every linear but the output layer
LORA_BASE_NAME = "flop_lora_base.pt"


def default_alpha(rank: int) -> float:
    """The LoRA scaling numerator when ``recovery_lora_alpha`` is not given: twice the rank (scale 2)."""
    return 2.0 * rank


def lora_config(args) -> LoraConfig:
    """The ``LoraConfig`` of ``PruningArguments`` ``args`` (``recovery_lora_rank`` set)."""
    rank = args.recovery_lora_rank
    alpha = args.recovery_lora_alpha if args.recovery_lora_alpha is not None else default_alpha(rank)
    targets = args.recovery_lora_target_modules or DEFAULT_TARGET_MODULES
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none")


def check_lora_recovery(args, model: nn.Module, flop_config, optimizer=None) -> None:
    """Refuse, before any work, a LoRA recovery the run cannot do (the compacted model is what LoRA trains).

    ``model`` is the gated model: its linears have the compacted model's names (as suffixes).
    """
    rank = args.recovery_lora_rank
    if rank is None:
        return
    # a gated linear is its FLOP layer's base_layer: named as the compacted model's linear, less the suffix
    names = [name.removesuffix(".base_layer") for name, module in model.named_modules() if is_linear(module)]
    missing = [
        target
        for target in args.recovery_lora_target_modules or ()
        if not any(name == target or name.endswith(f".{target}") for name in names)
    ]
    if missing:
        raise ValueError(
            f"PruningArguments.recovery_lora_target_modules={args.recovery_lora_target_modules}: no linear layer of "
            f"the model is named {missing} (names match as suffixes, e.g. 'q_proj'); use names of its linears, or "
            "None (every linear but the output layer)."
        )
    if not set(flop_config.levels) <= set(GROUP_LEVELS):
        raise ValueError(
            f"PruningArguments.recovery_lora_rank={rank} trains LoRA adapters on the compacted model, which only "
            f"levels {', '.join(GROUP_LEVELS)} recover on (FlopConfig.levels={flop_config.levels}); use those "
            "levels, or recover with full fine-tuning (recovery_lora_rank=None)."
        )
    if optimizer is not None:
        raise ValueError(
            f"PruningArguments.recovery_lora_rank={rank} trains LoRA adapters the trainer creates after the "
            "one-shot masks, which an optimizer passed to PruningTrainer cannot hold; pass no optimizer."
        )


def with_lora(small: PreTrainedModel, config: LoraConfig, padding: dict[str, torch.Tensor]) -> PeftModel:
    """``small`` (the compacted model) wrapped by ``peft.get_peft_model`` with ``config`` (``lora_config(args)``).

    Only the adapters train. ``padding`` (compacted linear name -> its kept-column mask, 0 for the
    closed units kept only as padding, ``kept_columns``) holds those columns of each adapter's
    ``lora_A`` at 0, so the merged delta leaves them 0 and the gated model, whose masks hide those
    columns, computes what ``small`` does.
    """
    for param in small.parameters():
        param.requires_grad_(False)
    try:
        wrapped = get_peft_model(small, config)
    except ValueError as err:  # e.g. target modules that match nothing
        raise ValueError(
            f"LoRA recovery (target_modules={config.target_modules!r}): PEFT could not put adapters on the "
            f"compacted {type(small).__name__}: {err}"
        ) from None
    base = wrapped.get_base_model()
    for name, keep in padding.items():
        for lora_a in getattr(base.get_submodule(name), "lora_A", {}).values():
            mask = keep.to(device=lora_a.weight.device, dtype=lora_a.weight.dtype)
            with torch.no_grad():
                lora_a.weight.mul_(mask)
            lora_a.weight.register_hook(lambda grad, mask=mask: grad * mask)
    return wrapped


def kept_columns(gated) -> dict[str, torch.Tensor]:
    """Per compacted linear with padding columns: its kept-column mask (1 kept, 0 padding)."""
    return {name: (scale != 0).float() for name, (_, _, scale) in kept_slices(gated).items() if (scale == 0).any()}


def merged(model) -> PreTrainedModel:
    """The trained model itself, or a LoRA-wrapped one with its adapters merged into its weights."""
    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def save_base(model: PeftModel, output_dir: str) -> None:
    """The frozen (non-adapter) weights of ``model`` beside a checkpoint (``LORA_BASE_NAME``)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if "lora_" not in k}
    torch.save(state, os.path.join(output_dir, LORA_BASE_NAME))


def load_base(model: PeftModel, checkpoint: str) -> None:
    """Put the frozen weights saved in ``checkpoint`` back into ``model`` (Trainer loads the adapters)."""
    path = os.path.join(checkpoint, LORA_BASE_NAME)
    if not os.path.isfile(path):
        raise ValueError(
            f"{checkpoint} holds no {LORA_BASE_NAME}: it is not the checkpoint of a LoRA recovery run; resume it "
            "with the PruningArguments it was saved with (recovery_lora_rank as then)."
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    expected = {k for k in model.state_dict() if "lora_" not in k}
    if set(state) != expected:
        raise ValueError(
            f"the weights in {path} do not match this LoRA recovery's model: resume with the model, FlopConfig "
            "and recovery_lora_* arguments the run started from."
        )
    model.load_state_dict(state, strict=False)


def is_lora_checkpoint(checkpoint: str | None) -> bool:
    """Whether ``checkpoint`` was saved by a LoRA recovery run."""
    return checkpoint is not None and os.path.isfile(os.path.join(checkpoint, LORA_BASE_NAME))
