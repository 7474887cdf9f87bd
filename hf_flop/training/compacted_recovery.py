"""Recovery on the compacted model: a one-shot run's fine-tuning trains ``compact(model)``, then writes it back.

With ``pruning_phase=0`` the masks are fixed before the first step, so every recovery step could
train the smaller dense model instead of the full-size gated one with its masks held: fewer
FLOPs per step, the same result. ``recovery_model`` decides whether that is possible (and builds
the compacted copy), ``training_compacted`` is the context in which Trainer trains it: on exit,
also on an error, its weights go back into the gated model (``hf_flop.compact.write_back``), so
the user's model, ``trainer.model`` and ``hf_flop.compact(model)`` hold the result.
"""

from __future__ import annotations

import inspect
import logging
from contextlib import contextmanager

import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedModel
from transformers.trainer_utils import unwrap_peft_model

from ..compact import compact, gated_counterparts, kept_slices, write_back
from ..groups import GROUP_LEVELS
from ..linear import per_input
from . import lora_recovery
from .checkpoint import GATE_STATE_NAME, save_gate_state

logger = logging.getLogger("hf_flop.trainer")


def recovery_model(trainer, resume: str | None, compacted_checkpoint: bool) -> PreTrainedModel | None:
    """The compacted model the recovery steps train, or None to train the gated model with its masks held.

    ``compact_recovery`` with ``pruning_phase=0``: after the one-shot masks and refit (or the
    checkpoint's gates), ``compact(model)``, its parameters trainable where the gated model's are.
    Every process compacts the same masks and weights (process 0's refit was broadcast), before
    Trainer wraps the model in DDP. Not possible, logged at info level: levels other than head and
    row (they compact to other module types, so no exact write-back), an optimizer passed to
    PruningTrainer (it holds the gated model's parameters), a checkpoint of the gated model. With
    ``recovery_lora_rank`` it is wrapped with LoRA adapters (``lora_recovery.with_lora``; from a LoRA
    checkpoint, its frozen weights restored), and not possible is an error: LoRA needs the compacted model.
    """
    args, config, gated = trainer.args, trainer.flop_config, trainer.gated_model
    one_shot = trainer.schedule.kind == "one-shot"
    if not (args.compact_recovery and one_shot) and not compacted_checkpoint:
        return None
    why = None
    if not set(config.levels) <= set(GROUP_LEVELS):
        why = (
            f"FlopConfig.levels={config.levels}: only head and row compact to cut linears whose "
            "weights write back exactly (rank, block and embedding compact to other module types)"
        )
    elif trainer.optimizer is not None:
        why = "an optimizer was passed to PruningTrainer, and it holds the gated model's parameters"
    elif not trainer.recovering:
        why = "the gates are not fixed (no one-shot masks were set)"
    elif any(not bool(((scale == 0) | (scale == 1)).all()) for *_, scale in kept_slices(gated).values()):
        why = "some eval masks hold values other than 0 and 1"
    if compacted_checkpoint and (why or not args.compact_recovery or not one_shot):
        raise ValueError(
            f"{resume} holds the compacted model of a compact_recovery run ({GATE_STATE_NAME}); resume it with "
            f"PruningArguments(pruning_phase=0, compact_recovery=True), the same FlopConfig and no optimizer "
            f"passed (now pruning_phase={args.pruning_phase}, compact_recovery={args.compact_recovery}"
            + (f"; {why}" if why else "")
            + ")."
        )
    if resume is not None and not compacted_checkpoint:
        why = f"{resume} holds the gated model (a run with compact_recovery=False, or a masked fallback)"
    lora_rank = args.recovery_lora_rank
    if why and lora_rank is not None:
        raise ValueError(f"PruningArguments.recovery_lora_rank={lora_rank} needs recovery on the compacted model: {why}.")
    if compacted_checkpoint and lora_recovery.is_lora_checkpoint(resume) != (lora_rank is not None):
        raise ValueError(
            f"{resume} is a checkpoint of a {'LoRA' if lora_rank is None else 'full'} recovery run; resume it with "
            "the recovery_lora_rank it was saved with (now "
            f"{lora_rank}; a LoRA run's checkpoint holds {lora_recovery.LORA_BASE_NAME})."
        )
    if why:
        logger.info("PruningTrainer: recovery trains the gated model with its masks held, not compacted: %s.", why)
        return None
    # building the compacted model initialises its layers from the global RNG before loading the weights;
    # forked, so the seed's dropout draws stay those a plain Trainer on the one-shot model would make
    with torch.random.fork_rng(devices=[]):
        small = compact(gated)
    counterparts = gated_counterparts(gated, small)
    for name, param in small.named_parameters():
        param.requires_grad_(counterparts[name].requires_grad)
    if lora_rank is not None:
        small = lora_recovery.with_lora(small, lora_recovery.lora_config(args), lora_recovery.kept_columns(gated))
        if compacted_checkpoint:
            lora_recovery.load_base(small, resume)
    logger.info(
        "PruningTrainer: recovery trains the compacted model (%d parameters, %d trainable).",
        sum(p.numel() for p in small.parameters()),
        sum(p.numel() for p in small.parameters() if p.requires_grad),
    )
    return small


@contextmanager
def training_compacted(trainer, small: PreTrainedModel):
    """Within: Trainer trains, evaluates and checkpoints ``small``. On exit its weights are in the gated model.

    LoRA adapters are merged into ``small``'s weights first (its frozen weights need no padding hooks:
    ``with_lora`` holds the adapters' padding columns at 0).
    """
    lora = isinstance(small, PeftModel)
    handles = [] if lora else _hold_padding_at_zero(trainer.gated_model, small)
    saved = _train_on(trainer, small)
    try:
        yield small
    finally:  # the user's model gets what was trained, even when training stopped on an error
        write_back(trainer.gated_model, lora_recovery.merged(small))
        for handle in handles:
            handle.remove()
        _train_on(trainer, trainer.gated_model, saved)


def save_recovery_state(trainer, output_dir: str) -> None:
    """Beside a checkpoint of the compacted model: the gates, and a LoRA run's frozen weights."""
    save_gate_state(trainer._flop, output_dir)
    if isinstance(trainer.model, PeftModel):
        lora_recovery.save_base(trainer.model, output_dir)


def _train_on(trainer, model: nn.Module, saved: dict | None = None) -> dict:
    """Make ``model`` the one Trainer trains, evaluates and checkpoints; returns what it replaced.

    Trainer derived ``model_accepts_loss_kwargs`` from the model in ``__init__``: derived again
    (or put back from ``saved``). Label names and loss type come from the model's class, which
    compaction keeps (the same class or a subclass with the same forward).
    """
    previous = {"model_accepts_loss_kwargs": trainer.model_accepts_loss_kwargs}
    trainer.model = trainer.model_wrapped = trainer.callback_handler.model = model
    if saved is not None:
        trainer.model_accepts_loss_kwargs = saved["model_accepts_loss_kwargs"]
        return previous
    unwrapped = unwrap_peft_model(trainer.accelerator.unwrap_model(model))
    if hasattr(unwrapped, "accepts_loss_kwargs"):
        trainer.model_accepts_loss_kwargs = unwrapped.accepts_loss_kwargs
    else:
        parameters = inspect.signature(unwrapped.forward).parameters.values()
        trainer.model_accepts_loss_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters)
    return previous


def _hold_padding_at_zero(model: nn.Module, small: PreTrainedModel) -> list:
    """Gradient hooks keeping at 0 the compacted columns of closed units kept only as padding.

    ``round_to`` padding (or the one unit an all-closed layer keeps) enters ``small`` with its folded
    mask value 0. In the gated model the mask keeps it out of every step; in ``small`` its column
    would get gradients. With a zero gradient it stays 0 (its producer rows then get none either),
    so ``small`` computes what the gated model does at every step and writes back exactly.
    """
    handles = []
    for name, (_, _, scale) in kept_slices(model).items():
        if bool((scale != 0).all()):
            continue
        linear = small.get_submodule(name)
        keep = per_input(linear, (scale != 0).to(device=linear.weight.device, dtype=linear.weight.dtype))
        handles.append(linear.weight.register_hook(lambda grad, keep=keep: grad * keep))
    return handles
