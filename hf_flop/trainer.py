"""`PruningTrainer`: a drop-in `transformers.Trainer` that prunes to an exact size while it trains.

What it adds to `Trainer`:

* the loss ``task + lambda_1 (s - t) + lambda_2 (s - t)^2`` (see ``hf_flop.constraint``), with
  ``s`` the expected sparsity and ``t`` the target, warmed up linearly over ``target_warmup_steps``;
* three optimizer groups on top of Trainer's two: the gates and the multipliers
  (``hf_flop.training.optimizer``);
* optional logit and hidden-state distillation from a ``teacher_model`` (``hf_flop.training.distillation``);
* pruning metrics in every training log and the run state in every checkpoint
  (``hf_flop.training.checkpoint``);
* optionally a recovery phase (``pruning_phase`` < 1): prune, then fix the masks at exactly the
  target (optionally refitting the kept weights on calibration data), freeze the gates and fine-tune
  (``hf_flop.training.phases``); with ``pruning_phase=0`` the fine-tuning runs on the compacted
  model and is written back into the gated one (``hf_flop.training.compacted_recovery``);
* after ``train()``: a ``TargetMissedWarning`` (and a log line) when the final size missed the
  target, and ``trainer.target_check`` saying where it ended (``hf_flop.training.outcome``).

This module is the wiring: the collaborators above do the work, and the methods here are
transformers' override points (``compute_loss``, ``create_optimizer``, ``create_scheduler``,
``log``, checkpoint saving and loading) plus ``train`` and ``save_compacted``.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint

from .accounting import TargetCheck, check_reachable, check_target, expected_sparsity, sparsity_report
from .constraint import CONSTRAINTS
from .fsdp import check_weights_whole
from .hub import save_compacted
from .lookup import find_flop_model
from .oneshot import fix_masks_at_target
from .scores import recommended_oneshot_score
from .training import checkpoint
from .training.arguments import PruningArguments
from .training.calibration_data import checked_calibration_data, sample_training_batches
from .training.compacted_recovery import recovery_model, save_recovery_state, training_compacted
from .training.ddp import broadcast_weights, check_can_freeze, under_ddp
from .training.distillation import Distillation, prepare_teacher
from .training.fsdp_setup import fsdp_version, setup_fsdp
from .training.lora_recovery import check_lora_recovery
from .training.optimizer import (
    ConstantRatesCallback,
    add_missing_multipliers,
    add_pruning_groups,
    has_pruning_groups,
    hold_learning_rates,
)
from .training.outcome import TargetMiss, TargetMissedWarning, training_facts
from .training.phases import GatePhases
from .training.schedule import PRUNING, RECOVERY, PruningSchedule

__all__ = ["PruningArguments", "PruningTrainer", "TargetMissedWarning", "PRUNING", "RECOVERY"]
logger = logging.getLogger(__name__)


class PruningTrainer(Trainer):
    """`Trainer` that drives a FLOP model (from ``hf_flop.get_flop_model``) to its target sparsity.

    Use it exactly like `Trainer`, with `PruningArguments`. ``teacher_model`` (optional) is a model
    whose logits the pruned model learns to match, typically the dense model before injection (a
    copy: injection modifies a model in place). It only needs to return logits, and hidden states
    with ``hidden_distillation_weight`` > 0.

    ``reconstruction_data`` (optional, with ``pruning_phase`` < 1) is an iterable of calibration
    batches (dicts of tensors with ``input_ids``, at least two, e.g. a DataLoader over training text):
    the one-shot scores and the refit use it. Without it, ``calibration_batches`` batches are sampled
    from ``train_dataset``; ``trainer.calibration_data`` holds what is used.

    ``gated_model`` is always the model passed in. With ``pruning_phase=0`` and ``compact_recovery``
    Trainer trains ``compact(model)`` instead (``self.model`` while ``train()`` runs, and what
    callbacks and checkpoints get); ``train()`` writes its weights back into ``gated_model`` and makes
    it ``self.model`` again. ``compacted_recovery`` says whether it did. With ``recovery_lora_rank``
    Trainer trains LoRA adapters on it, merged into its weights before the write-back.
    """

    def __init__(self, model: nn.Module | None = None, args: PruningArguments | None = None, *trainer_args, **kwargs):
        teacher_model = kwargs.pop("teacher_model", None)
        given_data = kwargs.pop("reconstruction_data", None)
        if model is None:
            raise ValueError(
                "PruningTrainer needs a model wrapped by hf_flop.get_flop_model (model_init is not supported)."
            )
        if args is None:
            args = PruningArguments(output_dir="trainer_output")
        if not isinstance(args, PruningArguments):
            raise TypeError(
                f"PruningTrainer needs PruningArguments (a TrainingArguments subclass), got {type(args).__name__}; "
                "replace TrainingArguments(...) by hf_flop.PruningArguments(...) with the same arguments."
            )
        if args.hidden_distillation_weight > 0 and teacher_model is None:
            raise ValueError(
                f"PruningArguments.hidden_distillation_weight={args.hidden_distillation_weight} needs a teacher_model "
                "to distil hidden states from; pass teacher_model=... (the dense model, copied before injection) or "
                "set it to 0."
            )
        self._flop = _checked_flop_model(model)
        # the user's model: its gates, masks and size, also while Trainer trains a compacted copy (self.model)
        self.gated_model = model
        self.compacted_recovery = False  # set by train(): whether the recovery steps train compact(model)
        self.calibration_data = checked_calibration_data(given_data, args, self._flop)
        super().__init__(model, args, *trainer_args, **kwargs)
        setup_fsdp(self, model)  # under accelerate's FSDP2: refusals, whole gates, their gradients averaged
        check_lora_recovery(args, model, self.flop_config, self.optimizer)
        if self.calibration_data is None and args.two_phase and args.calibration_batches:
            collate = self._get_collator_with_removed_columns(self.data_collator, "calibration")
            self.calibration_data = sample_training_batches(
                self.train_dataset, args.calibration_batches, args.per_device_train_batch_size, args.seed, collate
            )
        if args.pruning_phase == 0.0 and self.calibration_data is None:
            raise ValueError(
                "PruningArguments(pruning_phase=0) chooses the masks one-shot from calibration data, and there is "
                f"none (calibration_batches={args.calibration_batches}, train_dataset "
                f"{'given' if self.train_dataset is not None else 'None'}): pass reconstruction_data=... (batches of "
                "training inputs) or a train_dataset with calibration_batches > 0, or set pruning_phase above 0."
            )
        # Top-k gates have no expectation to hold at a target, only a size to push down: they get
        # MLPruning's one-sided adaptive regularizer (same call signature, no multipliers).
        self.constraint = CONSTRAINTS[self.flop_config.gate]().to(self.args.device)
        self.phases = GatePhases(
            self._flop,
            model,
            self.calibration_data,
            log=self.log_aside,
            broadcast=self._broadcast,
            schedule=lambda: self.schedule,
            optimizer=lambda: self.optimizer,
        )
        self.add_callback(self.phases)
        self.add_callback(ConstantRatesCallback(self.constraint, lambda: self.phases.recovering))
        teacher = prepare_teacher(teacher_model, model, self.args.device)
        self.distillation = Distillation.from_args(teacher, args) if teacher is not None else None
        self._tracked: dict[str, torch.Tensor] = {}  # per-step values summed between logs (task_loss, ...)
        self._tracked_first_step = 0
        self.target_check: TargetCheck | None = None  # set by train(): where the size ended against the target
        self.uniform_fix: dict | None = None  # one-phase runs with uniform_shapes: the masks fixed by train()

    # --- what the run is ---------------------------------------------------------------------------
    @property
    def flop_config(self):
        return self._flop.flop_config

    @property
    def schedule(self) -> PruningSchedule:
        """The run's schedule, with the step count Trainer derived (0 before ``train()``)."""
        args = self.args
        return PruningSchedule(
            args.pruning_phase, args.target_warmup_steps, self.flop_config.target_sparsity, self.state.max_steps or 0
        )

    def pruning_steps(self) -> int:
        """Steps of the pruning phase: the whole run, or ``ceil(pruning_phase * max_steps)`` in a two-phase run."""
        return self.schedule.pruning_steps

    def current_target(self) -> float:
        """The target sparsity of the current step (after warm-up: ``FlopConfig.target_sparsity``)."""
        return self.schedule.target_at(self.state.global_step)

    @property
    def oneshot_score(self) -> str | None:
        """``PruningArguments.oneshot_score``, with ``"auto"`` resolved for this model's ``FlopConfig``."""
        score = self.args.oneshot_score
        return recommended_oneshot_score(self.flop_config) if score == "auto" else score

    @property
    def teacher_model(self) -> nn.Module | None:
        return self.distillation.teacher if self.distillation is not None else None

    @property
    def reconstruction_data(self):  # the name of the argument the calibration batches may come from
        return self.calibration_data

    @property
    def phase(self) -> str:
        return self.phases.phase

    @property
    def boundary(self) -> dict | None:
        """What happened at the phase boundary, once crossed (also one log entry)."""
        return self.phases.boundary

    @property
    def recovering(self) -> bool:
        """Whether the masks are fixed and the gates frozen (the recovery phase of a two-phase run)."""
        return self.phases.recovering

    def enter_recovery(self) -> dict:
        """End the pruning phase now (``GatePhases.enter_recovery``); the callback does it when it is due."""
        return self.phases.enter_recovery(self.args, self.state.global_step)

    def _prepare_gates(self) -> None:
        """Before the first step of a fresh run: one-shot masks or warm-started gates (``GatePhases.prepare``)."""
        self.phases.prepare(self.args, self.state.global_step, self.oneshot_score)

    def _broadcast(self, model: nn.Module) -> None:
        if under_ddp(self):
            broadcast_weights(model)

    # --- training ----------------------------------------------------------------------------------
    def train(self, *args, **kwargs):
        """``Trainer.train``, then the final size against the target (``self.target_check``).

        A miss larger than the tolerance (``hf_flop.accounting.check_target``) is reported with a
        ``TargetMissedWarning`` (a ``UserWarning``) and a warning on the ``hf_flop.trainer`` logger,
        saying what to change.

        Under ``FlopConfig(uniform_shapes=True)`` a one-phase run ends as a two-phase run's pruning
        phase does: ``fix_masks_at_target`` sets the eval masks to the same heads and FFN width in
        every layer, at the target (``self.uniform_fix`` holds the sparsity before and after), so
        ``hf_flop.compact`` gives the stock class. A two-phase run's masks were fixed so at the boundary.
        With level ``"layer"`` a one-phase run ends so too: every layer then is kept (1) or removed (0).

        Before anything, a DDP setup that could not freeze the gates is refused (``ddp_find_unused_parameters``).
        """
        resume = kwargs.get("resume_from_checkpoint", args[0] if args else None)
        if resume is True:
            resume = get_last_checkpoint(self.args.output_dir)
            if resume is None:
                raise ValueError(f"resume_from_checkpoint=True, but {self.args.output_dir} holds no checkpoint.")
        resume = resume or None
        compacted_checkpoint = checkpoint.has_gate_state(resume)
        # a compacted checkpoint resumes into a model without gates: nothing freezes inside DDP
        check_can_freeze(self.args, self.schedule, under_ddp(self), resume is not None and not compacted_checkpoint)
        if resume is None and self.state.global_step == 0 and not self.recovering:
            self._prepare_gates()
        elif compacted_checkpoint:
            checkpoint.load_gate_state(self._flop, resume)
            self.phases.freeze(self.args)
        small = recovery_model(self, resume, compacted_checkpoint)
        if small is None:
            output = super().train(*args, **kwargs)
        else:
            self.compacted_recovery = True
            with training_compacted(self, small):
                output = super().train(*args, **kwargs)
        # uniform shapes, and depth gates (a layer kept at 0 < z < 1 compacts to nothing exact), need fixed masks
        if (self.flop_config.uniform_shapes or "layer" in self.flop_config.levels) and not self.recovering:
            before = sparsity_report(self.gated_model).deterministic_sparsity
            result = fix_masks_at_target(self.gated_model)
            self.uniform_fix = {"sparsity_before": before, "sparsity_after": result.deterministic_sparsity}
            logger.info("PruningTrainer: eval masks fixed to uniform shapes at the target: %s", self.uniform_fix)
        self.target_check = check_target(self.gated_model)
        if not self.target_check.met and self.is_world_process_zero():
            miss = TargetMiss.of(self.target_check, self.schedule, self.args)
            logger.warning(miss.message())
            warnings.warn(TargetMissedWarning(miss), stacklevel=2)
        return output

    def missed_target_message(self, names: dict[str, str] | None = None, prefix: str = "PruningTrainer: ") -> str:
        """What ``train()`` warns when the size missed the target, in the caller's ``names`` (``TargetMiss.message``)."""
        check = self.target_check or check_target(self.gated_model)
        return TargetMiss.of(check, self.schedule, self.args).message(names, prefix)

    def training_facts(self) -> dict[str, str]:
        """How this trainer pruned the model, for a model card's "Training procedure"."""
        return training_facts(self)

    # --- optimizer ---------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        """Trainer's optimizer, with the gates and the multipliers moved to groups of their own."""
        if has_pruning_groups(self.optimizer):
            return self.optimizer
        created_here = self.optimizer is None
        optimizer = super().create_optimizer(model)
        multipliers = dict(self.constraint.named_parameters())  # none for the top-k regularizer
        if multipliers and "maximize" not in optimizer.defaults:
            raise ValueError(
                f"{type(optimizer).__name__} has no 'maximize' option, which the Lagrange multipliers need (gradient "
                "ascent). Use a torch optimizer, e.g. PruningArguments(optim='adamw_torch')."
            )
        # every gate, frozen or not: a checkpoint of a run whose gates froze before the optimizer existed
        # (pruning_phase=0) must load into one created before they freeze (resume), and vice versa;
        # none for a passed optimizer, nor for the compacted model (it has no gates)
        gates = list(self._flop.gate_parameters()) if created_here and not self.compacted_recovery else []
        # FSDP2's prepare refuses parameters the model does not hold: the multipliers come in create_scheduler
        add_pruning_groups(optimizer, gates, {} if fsdp_version(self) == 2 else multipliers)
        hold_learning_rates(optimizer, self.args, gates_frozen=self.recovering)
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        add_missing_multipliers(optimizer or self.optimizer, dict(self.constraint.named_parameters()))
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        # the scheduler's first step rescaled them
        hold_learning_rates(optimizer or self.optimizer, self.args, gates_frozen=self.recovering)
        return scheduler

    # --- loss --------------------------------------------------------------------------------------
    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False, num_items_in_batch=None):
        """Task loss (mixed with distillation when there is a teacher) plus the Lagrangian term.

        ``(1 - alpha) task + alpha KL + hidden_distillation_weight * hidden MSE + constraint``; in the
        recovery phase without the constraint term (the gates are frozen). In evaluation only the
        task loss is returned.
        """
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.recovering:
            self.phases.hold_masks()  # after this step's model.train()
        distillation = self.distillation
        teacher_inputs = {k: v for k, v in inputs.items() if k not in self.label_names}
        if distillation is not None:
            inputs = distillation.student_inputs(inputs)
        task, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        # Terms that are one value per optimizer step must add up to that value over the micro-batches
        # of a gradient-accumulation window. If Trainer divides the loss by the window length itself
        # (task loss not normalised by num_items_in_batch), nothing to do; otherwise divide here.
        scaled = self._loss_scaled_for_ga(num_items_in_batch)
        steps_in_window = getattr(self, "current_gradient_accumulation_steps", 1)
        window = 1.0 / steps_in_window if scaled else 1.0
        # logged in the units of Trainer's "loss": what training_step accumulates for the task alone
        self._track("task_loss", task.detach() if scaled else task.detach() / steps_in_window)
        loss = task
        if distillation is not None:
            teacher = distillation.teacher_outputs(teacher_inputs)  # one teacher forward for both distillations
            loss, hidden = distillation.loss(task, outputs, teacher, teacher_inputs.get("attention_mask"), window)
            if hidden is not None:
                self._track("hidden_distillation_loss", hidden.detach() / steps_in_window)
        if not self.recovering:  # frozen gates: the size is fixed, and the term must not move them
            s = expected_sparsity(self.gated_model)
            loss = loss + window * self.constraint(s.to(loss.device), self.current_target())
        return (loss, outputs) if return_outputs else loss

    def _loss_scaled_for_ga(self, num_items_in_batch) -> bool:
        """Whether Trainer treats the task loss as already normalised over the accumulation window."""
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    # --- logging -----------------------------------------------------------------------------------
    def _track(self, name: str, value: torch.Tensor) -> None:
        """Add a micro-batch's value (in the units of Trainer's loss) to what the next log averages per step."""
        if not self._tracked:
            self._tracked_first_step = self.state.global_step
        total = self._tracked.get(name)
        self._tracked[name] = value.clone() if total is None else total + value

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Trainer's log, plus sparsity, target, multipliers and the task loss alone in training logs.

        In a run with a recovery phase also ``phase`` (that of the log's last step) and, with
        hidden-state distillation, ``hidden_distillation_loss``.
        """
        if "loss" in logs:  # a training log (evaluation logs use eval_ keys)
            report = sparsity_report(self.gated_model)
            logs["expected_sparsity"] = report.expected_sparsity
            logs["deterministic_sparsity"] = report.deterministic_sparsity
            logs["target_sparsity"] = self.current_target()
            logs.update(self.constraint.values())
            steps = max(self.state.global_step - self._tracked_first_step, 1)
            for name, total in self._tracked.items():
                logs[name] = self.accelerator.gather(total.reshape(1)).mean().item() / steps
            self._tracked = {}
            if self.args.two_phase:
                logs["phase"] = self.schedule.phase_at(self.state.global_step)
        super().log(logs, start_time)

    def log_aside(self, logs: dict) -> None:
        """Log ``logs`` as an entry of its own, between steps, without dropping the step's own training log.

        Trainer's ``on_log`` clears ``control.should_log``, which it reads afterwards to decide the
        step's training log: the flag is put back.
        """
        should_log = self.control.should_log
        self.log(logs)
        self.control.should_log = should_log

    # --- checkpoints -------------------------------------------------------------------------------
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            state = {**self.constraint.values(), "global_step": self.state.global_step, "target": self.current_target()}
            if self.args.two_phase:  # which side of the boundary; the fixed gates are in the model's weights
                state.update(phase=self.phase, boundary=self.boundary)
            checkpoint.save_run_state(output_dir, state)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        if self.model is not self.gated_model:  # a compacted-recovery checkpoint: its masks are in the gates
            save_recovery_state(self, output_dir or self.args.output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint_dir: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint_dir)
        if checkpoint_dir is None:
            return
        state = checkpoint.load_run_state(checkpoint_dir)
        self.constraint.load_values(state)
        if state.get("phase", PRUNING) == RECOVERY and not self.args.two_phase:
            raise ValueError(
                f"{checkpoint_dir} was saved in the recovery phase of a two-phase run (masks fixed, gates frozen); "
                f"resume it with the same PruningArguments.pruning_phase (< 1), not {self.args.pruning_phase}."
            )
        self.phases.restore(state, self.args)
        hold_learning_rates(self.optimizer, self.args, gates_frozen=self.recovering)  # e.g. other learning rates

    # --- export ------------------------------------------------------------------------------------
    def save_compacted(self, output_dir: str, **kwargs):
        """Compact the pruned model and save it (``hf_flop.save_compacted``), from the main process only.

        The card's "Training procedure" defaults to ``training_facts()``.
        """
        kwargs.setdefault("training", self.training_facts())
        check_weights_whole(self.gated_model, "save_compacted")  # on every process, before the barrier below
        result = save_compacted(self.gated_model, output_dir, **kwargs) if self.args.should_save else None
        self.accelerator.wait_for_everyone()
        return result


def _checked_flop_model(model: nn.Module):
    """The model's FlopModel, after checking that its target can be reached at all."""
    try:
        flop_model = find_flop_model(model)
    except ValueError:
        raise ValueError(
            f"PruningTrainer got a {type(model).__name__} with no FLOP layers; wrap it first with "
            "hf_flop.get_flop_model(model, FlopConfig(target_sparsity=...))."
        ) from None
    if not any(p.requires_grad for p in flop_model.gate_parameters()):
        raise ValueError(
            "the model's FLOP gates are frozen (requires_grad=False); PruningTrainer has nothing to prune."
        )
    check_reachable(model)
    return flop_model
