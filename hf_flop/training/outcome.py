"""What a pruning run reached, as data: the missed-target facts and their wording, the card's training facts.

``PruningTrainer.train()`` ends with ``check_target``; when the size missed the target it warns with
a ``TargetMissedWarning`` whose ``miss`` holds the facts (``TargetMiss``), so a caller with its own
interface (the command line) filters the warning by category and words the advice in its own names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from ..accounting import TargetCheck
from .lora_recovery import lora_config
from .schedule import PruningSchedule


@dataclass(frozen=True)
class TargetMiss:
    """Why a run ended off its target, and the settings the advice names.

    ``kind``: ``"not_closed"`` (the gates did not close enough), ``"closed_too_far"`` (they closed
    past it in expectation too), or ``"undecided"`` (the expectation met the target but undecided
    gates, counted in expectation, are dropped by the eval masks).
    """

    check: TargetCheck
    kind: Literal["not_closed", "closed_too_far", "undecided"]
    pruning_steps: int
    warmup_steps: int
    gate_learning_rate: float
    lagrangian_learning_rate: float
    target_warmup_steps: float

    @classmethod
    def of(cls, check: TargetCheck, schedule: PruningSchedule, args) -> TargetMiss:
        """The facts of ``check`` (a missed target) for a run of ``schedule`` with ``PruningArguments`` ``args``."""
        if check.gap < 0:
            kind = "not_closed"
        elif check.expected - check.target > check.tolerance:
            kind = "closed_too_far"
        else:
            kind = "undecided"
        return cls(
            check,
            kind,
            schedule.pruning_steps,
            schedule.warmup_steps,
            args.gate_learning_rate,
            args.lagrangian_learning_rate,
            args.target_warmup_steps,
        )

    @property
    def steps_at_target(self) -> int:
        return max(self.pruning_steps - self.warmup_steps, 0)

    def message(self, names: Mapping[str, str] | None = None, prefix: str = "PruningTrainer: ") -> str:
        """By how much the size missed, and what to change.

        ``names`` maps ``PruningArguments`` fields (and ``"max_steps / num_train_epochs"``) to what the
        caller's interface calls them, e.g. command-line options; ``prefix`` starts the sentence.
        """
        names = names or {}

        def name(field: str) -> str:
            return names.get(field, field)

        longer = name("max_steps / num_train_epochs")
        steps, at_target, expected = self.pruning_steps, self.steps_at_target, self.check.expected
        text = f"{prefix}the model ended at {self.check.describe()}; "
        if self.kind == "not_closed":
            text += (
                f"the gates did not close enough in {steps} steps ({at_target} at the full target after the "
                f"warm-up of {self.warmup_steps}). Train longer ({longer}), or raise {name('gate_learning_rate')} "
                f"(now {self.gate_learning_rate}) or {name('lagrangian_learning_rate')} (now "
                f"{self.lagrangian_learning_rate}); a shorter {name('target_warmup_steps')} (now "
                f"{self.target_warmup_steps}) leaves more steps at the target."
            )
        elif self.kind == "closed_too_far":
            text += (
                f"the gates closed too far (expected sparsity {expected:.3f} too). Lower "
                f"{name('gate_learning_rate')} (now {self.gate_learning_rate}), or train longer at the target "
                f"({longer}) so the constraint can reopen them."
            )
        else:
            text += (
                f"the expected sparsity is {expected:.3f}: gates left undecided (neither open nor closed) count "
                f"in expectation but the eval masks drop them. Train longer at the target ({longer}; {at_target} of "
                f"{steps} steps were at the full target) so the gates settle."
            )
        return text + " Compaction keeps the size it ended at, not the target."


class TargetMissedWarning(UserWarning):
    """``PruningTrainer.train()`` ended off the target; ``miss`` holds the facts (``TargetMiss``)."""

    def __init__(self, miss: TargetMiss) -> None:
        super().__init__(miss.message())
        self.miss = miss


def training_facts(trainer) -> dict[str, str]:
    """How ``trainer`` (a ``PruningTrainer`` after ``train()``) pruned its model, for a card's "Training procedure"."""
    args, config, schedule = trainer.args, trainer.flop_config, trainer.schedule
    batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    warmup_of = (
        (" of the pruning phase" if schedule.has_recovery else " of the run")
        if args.target_warmup_steps < 1
        else " steps"
    )
    facts = {
        "pruning": f"{trainer.state.global_step:,} steps of PruningTrainer, batch {batch}, learning rate "
        f"{args.learning_rate:g}, target {config.target_sparsity} (warm-up {args.target_warmup_steps:g}{warmup_of}), "
        f"levels {', '.join(config.levels)}, gate {config.gate}",
        "gate and multiplier learning rates": f"{args.gate_learning_rate:g}, {args.lagrangian_learning_rate:g} "
        f"(lambda_1), {args.quadratic_learning_rate:g} (lambda_2)",
        "distillation": _distillation_fact(trainer.distillation),
        "seed": str(args.seed),
    }
    recovery_steps = max(schedule.max_steps - schedule.pruning_steps, 0)
    if schedule.kind == "one-shot":
        facts["schedule"] = (
            f"one-shot: masks set at the target by {trainer.oneshot_score} scores on calibration data and the "
            f"kept weights refit before training, gates frozen, {schedule.max_steps:,} recovery steps"
            + (" on the compacted model" if trainer.compacted_recovery else "")
            + (_lora_fact(args) if trainer.compacted_recovery and args.recovery_lora_rank is not None else "")
        )
    elif schedule.kind == "two-phase":
        facts["schedule"] = (
            f"two phases: {schedule.pruning_steps:,} pruning steps, then the masks fixed at the target"
            + (" and the kept weights refit on calibration data" if trainer.calibration_data is not None else "")
            + f", gates frozen, {recovery_steps:,} recovery steps"
        )
    if trainer.uniform_fix is not None:
        fix = trainer.uniform_fix
        facts["uniform shapes"] = (
            "after training, the eval masks fixed at the target with the same heads and FFN width in every "
            f"layer (sparsity {fix['sparsity_before']:.3f} -> {fix['sparsity_after']:.3f})"
        )
    if trainer.target_check is not None:
        check = trainer.target_check
        facts["size reached"] = f"sparsity {check.sparsity:.3f} for target {check.target}" + (
            "" if check.met else " (missed)"
        )
    return facts


def _lora_fact(args) -> str:
    config = lora_config(args)
    targets = config.target_modules if isinstance(config.target_modules, str) else ", ".join(sorted(config.target_modules))
    return f", training LoRA adapters (rank {config.r}, alpha {config.lora_alpha:g}, on {targets}) merged after"


def _distillation_fact(distillation) -> str:
    if distillation is None:
        return "none"
    hidden = f"; hidden-state MSE, weight {distillation.hidden_weight:g}" if distillation.uses_hidden_states else ""
    return (
        f"from a teacher model (logit KL, alpha {distillation.alpha:g}, temperature {distillation.temperature:g}"
        f"{hidden})"
    )
