"""`PruningTrainer`: a drop-in `transformers.Trainer` that prunes to an exact size while it trains.

What it adds to `Trainer`:

* the loss ``task + lambda_1 (s - t) + lambda_2 (s - t)^2`` (see ``hf_flop.constraint``), with
  ``s`` the expected sparsity and ``t`` the target, warmed up linearly over ``target_warmup_steps``;
* three optimizer groups on top of Trainer's two: the gates (own learning rate, no weight decay,
  no momentum) and the multipliers (gradient ascent, no weight decay, constant learning rate, outside gradient
  clipping since they are not model parameters);
* optional logit distillation from a ``teacher_model``, and hidden-state (layer) distillation;
* pruning metrics in every training log and the multipliers in every checkpoint;
* optionally two phases in one run (``pruning_phase`` < 1): prune, then fix the masks at exactly the
  target (optionally refitting the kept weights, ``reconstruction_data``), freeze the gates and
  fine-tune (see ``PruningTrainer.enter_recovery``); with ``pruning_phase=0`` the fine-tuning runs
  on the compacted model and is written back into the gated one (``compact_recovery``);
* after ``train()``: a ``UserWarning`` (and a log line) when the final size missed the target, and
  ``trainer.target_check`` saying where it ended.
"""

from __future__ import annotations

import inspect
import itertools
import json
import logging
import math
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint, unwrap_peft_model
from transformers.training_args import ParallelMode

from .accounting import TargetCheck, check_reachable, check_target, expected_sparsity, sparsity_report
from .compact import compact, gated_counterparts, kept_slices, write_back
from .constraint import CONSTRAINTS, gate_group_overrides, resolve_warmup_steps, warmed_up_target
from .files import write_json_atomic
from .groups import GROUP_LEVELS
from .hub import save_compacted
from .linear import per_input
from .model import find_flop_model
from .oneshot import fix_masks_at_target, prune_oneshot, warm_start_gates
from .reconstruction import reconstruct
from .scores import SCORES, compute_scores, reusable_batches

CONSTRAINT_STATE_NAME = "flop_constraint.json"
GATE_STATE_NAME = "flop_gates.pt"  # the gates (hence the masks) next to a compacted-recovery checkpoint's model
PRUNING, RECOVERY = "pruning", "recovery"  # the phases of a two-phase run (PruningArguments.pruning_phase)
logger = logging.getLogger(__name__)


@dataclass
class PruningArguments(TrainingArguments):
    """`TrainingArguments` plus the pruning schedule.

    The target sparsity itself lives in the model's ``FlopConfig.target_sparsity``.
    """

    target_warmup_steps: float = field(
        default=0.5,
        metadata={
            "help": "Steps over which the target sparsity rises linearly from 0 to its final value; a value "
            "below 1 is a fraction of the run (as for warmup_steps). Training after the warm-up settles the "
            "gates at the target."
        },
    )
    gate_learning_rate: float = field(
        default=0.2,
        metadata={
            "help": "Learning rate of the gate parameters (hard-concrete log_alpha, top-k scores/threshold), "
            "constant, no weight decay, no momentum. Hard-concrete gates start fully open (log_alpha near 7) and "
            "travel several units to close, so this is far larger than a fine-tuning learning rate."
        },
    )
    lagrangian_learning_rate: float = field(
        default=0.1,
        metadata={
            "help": "Learning rate of lambda_1, the linear multiplier (gradient ascent, constant, no weight decay)."
        },
    )
    quadratic_learning_rate: float = field(
        default=2.0,
        metadata={
            "help": "Learning rate of lambda_2, the quadratic multiplier (gradient ascent, constant). Its gradient "
            "(s - t)^2 vanishes near the target, and the quadratic term is what damps lambda_1's overshoot, so it "
            "learns faster than lambda_1."
        },
    )
    distillation_alpha: float = field(
        default=0.5,
        metadata={"help": "With a teacher_model: loss = (1 - alpha) * task + alpha * distillation."},
    )
    distillation_temperature: float = field(
        default=2.0, metadata={"help": "Softmax temperature of the logit distillation (KL, scaled by T^2)."}
    )
    hidden_distillation_weight: float = field(
        default=0.0,
        metadata={
            "help": "With a teacher_model: add this weight times the mean over transformer layers of the MSE between "
            "the model's and the teacher's hidden states (padding left out with the attention mask). 0 = off. "
            "Both models must return hidden_states and have the same number of layers and hidden size."
        },
    )
    pruning_phase: float = field(
        default=0.0,
        metadata={
            "help": "Fraction of the run's steps that prune, in [0, 1]. Default 0: the measured best at a fine-tuning "
            "budget (README, 'Equal budget'). 1.0: the whole run prunes (FLOP's single phase). "
            "Below 1: after ceil(pruning_phase * max_steps) steps the eval masks are fixed at exactly the target, "
            "the gates frozen and the constraint dropped; the remaining steps fine-tune the pruned model. "
            "target_warmup_steps (as a fraction) is then a fraction of the pruning phase. 0: no pruning steps; "
            "before the first step the masks are set one-shot by oneshot_score on the reconstruction_data "
            "(hf_flop.prune_oneshot, with the refit; calibration data from train_dataset unless given), and every "
            "step recovers."
        },
    )
    calibration_batches: int = field(
        default=32,
        metadata={
            "help": "With pruning_phase < 1 and no reconstruction_data given to PruningTrainer: this many batches "
            "of per_device_train_batch_size rows, a seeded sample of train_dataset, are the calibration data of "
            "the one-shot scores and the refit. 0: none (pruning_phase=0 then needs reconstruction_data)."
        },
    )
    oneshot_score: str | None = field(
        default="obs",
        metadata={
            "help": "Score of every gated unit on PruningTrainer's reconstruction_data (see hf_flop.scores: "
            f"{', '.join(SCORES)}). With pruning_phase=0 it chooses the masks; with 0 < pruning_phase < 1 it "
            "warm-starts the gates (hf_flop.warm_start_gates: important units start more open). None: gates start "
            "fully open. Unused without reconstruction_data or with pruning_phase=1. 'obs' (the default) measured "
            "best on MiniLM and tied 'activation' on SmolLM2; with FlopConfig(uniform_shapes=True) 'activation' "
            "measured better on SmolLM2 (the CLI then picks it)."
        },
    )
    compact_recovery: bool = field(
        default=True,
        metadata={
            "help": "With pruning_phase=0 (fresh or resumed): the recovery steps train hf_flop.compact(model), the "
            "smaller dense model, instead of the full-size gated model with its masks held; after train() its "
            "weights are written back into the gated model (kept rows and columns; the pruned ones set to 0), so "
            "the model, trainer.model and hf_flop.compact(model) hold the result. Checkpoints then hold the "
            "compacted model and the gates (flop_gates.pt). Only for levels head and row (rank, block and "
            "embedding compact to other module types) and without an optimizer passed to PruningTrainer; "
            "otherwise, and with 0 < pruning_phase < 1 (the optimizer already holds the gated model's "
            "parameters at the boundary), recovery trains the gated model, logged at info level. Ignored with "
            "pruning_phase=1."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_warmup_steps < 0:
            raise ValueError(f"PruningArguments.target_warmup_steps={self.target_warmup_steps} must be >= 0.")
        for name in (
            "gate_learning_rate",
            "lagrangian_learning_rate",
            "quadratic_learning_rate",
            "distillation_temperature",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"PruningArguments.{name}={getattr(self, name)} must be > 0.")
        if not 0.0 <= self.distillation_alpha <= 1.0:
            raise ValueError(f"PruningArguments.distillation_alpha={self.distillation_alpha} must be in [0, 1].")
        if not self.hidden_distillation_weight >= 0.0:
            raise ValueError(
                f"PruningArguments.hidden_distillation_weight={self.hidden_distillation_weight} must be >= 0 (0 = off)."
            )
        if not 0.0 <= self.pruning_phase <= 1.0:
            raise ValueError(
                f"PruningArguments.pruning_phase={self.pruning_phase} must be in [0, 1]: the fraction of the run's "
                "steps that prune (1.0 = the whole run, no recovery phase; 0 = one-shot masks, then only recovery)."
            )
        if not (isinstance(self.calibration_batches, int) and self.calibration_batches >= 0):
            raise ValueError(
                f"PruningArguments.calibration_batches={self.calibration_batches!r} must be an integer >= 0 (0 = none)."
            )
        if self.oneshot_score is not None and self.oneshot_score not in SCORES:
            raise ValueError(
                f"PruningArguments.oneshot_score={self.oneshot_score!r} is not a score; use one of {list(SCORES)} or None."
            )
        if not isinstance(self.compact_recovery, bool):
            raise ValueError(f"PruningArguments.compact_recovery={self.compact_recovery!r} must be True or False.")
        if self.pruning_phase == 0.0 and self.oneshot_score is None:
            raise ValueError(
                "PruningArguments(pruning_phase=0) sets the masks one-shot before the first step and needs "
                "oneshot_score (e.g. 'activation'); or set pruning_phase above 0 to learn them."
            )

    @property
    def two_phase(self) -> bool:
        """Whether the run ends with a recovery phase (``pruning_phase`` < 1)."""
        return self.pruning_phase < 1.0


class PruningTrainer(Trainer):
    """`Trainer` that drives a FLOP model (from ``hf_flop.get_flop_model``) to its target sparsity.

    Use it exactly like `Trainer`, with `PruningArguments`. ``teacher_model`` (optional) is a model
    whose logits the pruned model learns to match, typically the dense model before injection (a
    copy: injection modifies a model in place). It only needs to return logits, and hidden states
    with ``hidden_distillation_weight`` > 0.

    ``reconstruction_data`` (optional, with ``pruning_phase`` < 1) is an iterable of calibration
    batches (dicts of tensors with ``input_ids``, at least two, e.g. a DataLoader over training text):
    at the phase boundary ``hf_flop.reconstruct`` refits the kept weights on it. Without it the
    boundary only fixes the masks.

    ``gated_model`` is always the model passed in. With ``pruning_phase=0`` and ``compact_recovery``
    Trainer trains ``compact(model)`` instead (``self.model`` while ``train()`` runs, and what
    callbacks and checkpoints get); ``train()`` writes its weights back into ``gated_model`` and makes
    it ``self.model`` again. ``compacted_recovery`` says whether it did.
    """

    def __init__(self, model: nn.Module | None = None, args: PruningArguments | None = None, *trainer_args, **kwargs):
        teacher_model = kwargs.pop("teacher_model", None)
        reconstruction_data = kwargs.pop("reconstruction_data", None)
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
        self.reconstruction_data = _checked_reconstruction_data(reconstruction_data, args, self._flop)
        super().__init__(model, args, *trainer_args, **kwargs)
        if self.reconstruction_data is None and args.two_phase and args.calibration_batches:
            self.reconstruction_data = self._training_calibration()
        if args.pruning_phase == 0.0 and self.reconstruction_data is None:
            raise ValueError(
                "PruningArguments(pruning_phase=0) chooses the masks one-shot from calibration data, and there is "
                f"none (calibration_batches={args.calibration_batches}, train_dataset "
                f"{'given' if self.train_dataset is not None else 'None'}): pass reconstruction_data=... (batches of "
                "training inputs) or a train_dataset with calibration_batches > 0, or set pruning_phase above 0."
            )
        # Top-k gates have no expectation to hold at a target, only a size to push down: they get
        # MLPruning's one-sided adaptive regularizer (same call signature, no multipliers).
        self.constraint = CONSTRAINTS[self.flop_config.gate]().to(self.args.device)
        self.add_callback(_PruningStepCallback(self))
        self.teacher_model = _prepared_teacher(teacher_model, model, self.args.device)
        self._tracked: dict[str, torch.Tensor] = {}  # per-step values summed between logs (task_loss, ...)
        self._tracked_first_step = 0
        self.target_check: TargetCheck | None = None  # set by train(): where the size ended against the target
        self.phase = PRUNING
        self.boundary: dict | None = None  # what happened at the phase boundary, once crossed
        self.uniform_fix: dict | None = None  # one-phase runs with uniform_shapes: the masks fixed by train()
        self._frozen_gates: list[nn.Module] = []

    def _training_calibration(self) -> list[dict] | None:
        """``calibration_batches`` collated batches of a seeded sample of ``train_dataset`` (None without one).

        A generator of its own draws the sample, so the training run's random state (data order,
        dropout) is the same as with ``reconstruction_data`` given. Columns the model does not take
        are dropped, as Trainer's collator does for training batches.
        """
        dataset, size = self.train_dataset, self.args.per_device_train_batch_size
        if dataset is None:
            return None
        count = self.args.calibration_batches * size
        if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
            generator = torch.Generator().manual_seed(self.args.seed)
            rows = [dataset[i] for i in torch.randperm(len(dataset), generator=generator)[:count].tolist()]
        else:  # an iterable dataset: its first rows
            rows = list(itertools.islice(iter(dataset), count))
        collate = self._get_collator_with_removed_columns(self.data_collator, "calibration")
        batches = [collate(rows[i : i + size]) for i in range(0, len(rows), size)]
        if len(batches) < 2:
            raise ValueError(
                f"train_dataset gives {len(batches)} calibration batch(es) of {size} rows; the refit needs at least "
                "2: pass reconstruction_data=..., or use a smaller per_device_train_batch_size."
            )
        return batches

    # --- the schedule ------------------------------------------------------------------------------
    @property
    def flop_config(self):
        return self._flop.flop_config

    def pruning_steps(self) -> int:
        """Steps of the pruning phase: the whole run, or ``ceil(pruning_phase * max_steps)`` in a two-phase run."""
        steps = self.state.max_steps or 0
        if not self.args.two_phase:
            return steps
        if self.args.pruning_phase == 0.0:
            return 0
        # the small offset keeps float products such as 0.7 * 10 = 7.000000000000001 from rounding up
        return max(1, math.ceil(self.args.pruning_phase * steps - 1e-9)) if steps else 0

    def current_target(self) -> float:
        """The target sparsity of the current step (after warm-up: ``FlopConfig.target_sparsity``).

        The warm-up, as a fraction, is one of the pruning phase.
        """
        warmup = resolve_warmup_steps(self.args.target_warmup_steps, self.pruning_steps())
        return warmed_up_target(self.flop_config.target_sparsity, self.state.global_step, warmup)

    @property
    def recovering(self) -> bool:
        """Whether the masks are fixed and the gates frozen (the recovery phase of a two-phase run)."""
        return self.phase == RECOVERY

    # --- the phase boundary ------------------------------------------------------------------------
    def enter_recovery(self) -> dict:
        """End the pruning phase: fix the masks at the target, refit (with data), freeze the gates.

        Called once, at the end of the optimizer step that completes the pruning phase (before that
        step's log and checkpoint, which therefore show the fixed masks):

        1. every gated unit of the model is ranked by its gate (units the eval mask keeps above the
           ones it drops, then by ``Gate.keep_strength``) and ``prune_to_target`` closes units in that
           order until the eval-mask size is the target to within half a unit
           (``hf_flop.oneshot.fix_masks_at_target``); every gate is set with ``set_mask``, so the
           eval masks are exactly 0 or 1;
        2. with ``reconstruction_data``, ``hf_flop.reconstruct`` refits the kept weights (under DDP
           process 0's refit is broadcast, so the processes cannot drift apart);
        3. the gates are frozen (``requires_grad=False``, learning rate 0 in their optimizer group) and
           compute their eval masks from then on, also in training mode; the constraint term leaves
           the loss. The multipliers keep their values.

        The model is not compacted in place: compaction replaces parameters by smaller ones, while
        the optimizer (its parameter groups and Adam state), DDP (its gradient buckets) and the
        checkpoints all refer to the original parameters. The recovery phase runs at the original
        shapes with exactly-zero gates instead (the rank level then skips its closed components).

        Returns the boundary facts (also ``self.boundary`` and one log entry).
        """
        if not self.args.two_phase:
            raise ValueError(
                "enter_recovery belongs to a two-phase run (PruningArguments.pruning_phase < 1), whose checkpoints "
                "record the phase; to fix the masks of a one-phase run at the target, use "
                "hf_flop.oneshot.fix_masks_at_target(model)."
            )
        if self.recovering:
            raise RuntimeError("the recovery phase has already begun: the masks are fixed.")
        before = sparsity_report(self.gated_model)
        result = fix_masks_at_target(self.gated_model)
        report = None
        if self.reconstruction_data is not None:
            report = reconstruct(self.gated_model, self.reconstruction_data, progress=not self.args.disable_tqdm)
            self._broadcast_weights()
        self._record_boundary(before, result.budget, sum(r.applied for r in report.layers) if report else 0)
        # Trainer's on_log clears should_log, which would drop this step's training log: keep it
        should_log = self.control.should_log
        self.log(dict(self.boundary))
        self.control.should_log = should_log
        return self.boundary

    def _record_boundary(self, before, budget: float, reconstructed: int) -> None:
        """Freeze the gates and keep what the boundary did (``self.boundary``, logged by the caller)."""
        after = sparsity_report(self.gated_model)
        self._freeze_gates()
        self.boundary = {
            "boundary_step": self.state.global_step,
            "boundary_deterministic_sparsity_before": before.deterministic_sparsity,
            "boundary_expected_sparsity_before": float(before.expected_sparsity),
            "boundary_deterministic_sparsity_after": after.deterministic_sparsity,
            "boundary_kept_params": after.deterministic_kept_params,
            "boundary_budget_params": budget,
            "boundary_reconstructed_modules": reconstructed,
        }
        logger.info("PruningTrainer: phase boundary at step %d: %s", self.state.global_step, self.boundary)

    def _prepare_gates(self) -> None:
        """Before the first step of a fresh run: one-shot masks (``pruning_phase=0``) or warm-started gates.

        With ``pruning_phase=0`` the boundary is crossed here: ``prune_oneshot`` scores the dense model
        with ``oneshot_score`` on ``reconstruction_data``, sets the masks at the target and refits the
        kept weights, and the gates are frozen before the optimizer exists. In a two-phase run the
        gates start from the same scores (``warm_start_gates``) so the pruning phase begins where a
        one-shot prune would, and learns from there.
        """
        args, data = self.args, self.reconstruction_data
        if data is None or args.oneshot_score is None or not args.two_phase:
            return
        if args.pruning_phase == 0.0:
            before = sparsity_report(self.gated_model)
            prune_oneshot(self.gated_model, None, data, args.oneshot_score, reconstruct=False)
            report = reconstruct(self.gated_model, data, progress=not args.disable_tqdm)
            self._broadcast_weights()
            budget = before.prunable_params * (1 - self.flop_config.target_sparsity)
            self._record_boundary(before, budget, sum(r.applied for r in report.layers))
        else:
            warm_start_gates(self.gated_model, compute_scores(self.gated_model, data, args.oneshot_score))

    def _check_ddp_can_freeze(self, resuming: bool) -> None:
        """Refuse a run that would freeze the gates inside a DDP wrapper built with ``find_unused_parameters=False``.

        DDP's reducer then waits, every step, for a gradient of each parameter that required one when
        the wrapper was built; frozen gates never send one, so the first recovery step fails with DDP's
        "Expected to have finished reduction" error, after the whole pruning phase and the refit. The
        gates freeze after the wrap at the boundary (0 < pruning_phase < 1) and on resuming (the
        checkpoint's recovery phase is restored after it); only a fresh ``pruning_phase=0`` run freezes
        them before, so DDP leaves them out. Checked in ``train()``, before the first step.
        """
        args = self.args
        if not (args.two_phase and args.ddp_find_unused_parameters is False and self._ddp()):
            return
        if args.pruning_phase > 0 or resuming:
            raise ValueError(
                f"PruningArguments(pruning_phase={args.pruning_phase}) under DDP with ddp_find_unused_parameters=False: "
                "the gates freeze after DDP wrapped the model ("
                + ("when the checkpoint's recovery phase is restored" if resuming else "at the phase boundary")
                + "), and DDP then fails at the first recovery step waiting for their gradients. Leave "
                "ddp_find_unused_parameters unset (Trainer uses True for a PEFT model) or set it to True."
            )

    def _freeze_gates(self) -> None:
        """Gates fixed for the rest of the run: no gradient, no optimizer step, eval masks in training too."""
        self.phase = RECOVERY
        for param in self._flop.gate_parameters():
            param.requires_grad_(False)
            param.grad = None
        if self.optimizer is not None:
            _hold_learning_rates(self.optimizer, self.args, gates_frozen=True)
        self._frozen_gates = list(self._flop.gates().values())
        self._set_gates_to_masks()

    def _set_gates_to_masks(self) -> None:
        # Trainer calls model.train() before every step, which would make the gates sample again
        # (hard-concrete samples of an open gate fall below 1 now and then): back to the eval masks.
        for gate in self._frozen_gates:
            gate.eval()

    def _ddp(self) -> bool:
        """Whether the model trains under DDP: several processes, each with the whole weights.

        Not under FSDP or DeepSpeed: sharded engines (not supported by the refit anyway) hold no whole weights.
        """
        distributed = self.args.parallel_mode == ParallelMode.DISTRIBUTED and self.args.world_size > 1
        return distributed and not self.is_fsdp_enabled and not self.is_deepspeed_enabled

    def _broadcast_weights(self) -> None:
        """Under DDP, make every process hold process 0's weights (each ran the refit on its own)."""
        if not self._ddp():
            return
        for param in self.gated_model.parameters():
            torch.distributed.broadcast(param.data, src=0)

    # --- training ----------------------------------------------------------------------------------
    def train(self, *args, **kwargs):
        """``Trainer.train``, then the final size against the target (``self.target_check``).

        A miss larger than the tolerance (``hf_flop.accounting.check_target``) is reported with a
        ``UserWarning`` and a warning on the ``hf_flop.trainer`` logger, saying what to change.

        Under ``FlopConfig(uniform_shapes=True)`` a one-phase run ends as a two-phase run's pruning
        phase does: ``fix_masks_at_target`` sets the eval masks to the same heads and FFN width in
        every layer, at the target (``self.uniform_fix`` holds the sparsity before and after), so
        ``hf_flop.compact`` gives the stock class. A two-phase run's masks were fixed so at the boundary.

        With ``pruning_phase=0`` and ``compact_recovery`` the recovery steps train ``compact(model)``
        (``self.model`` while Trainer runs), whose weights are then written back into the gated model
        (``hf_flop.compact.write_back``; also when training stops on an error); see ``_recovery_copy``.

        Before anything, a DDP setup that could not freeze the gates is refused (``ddp_find_unused_parameters``).
        """
        resume = kwargs.get("resume_from_checkpoint", args[0] if args else None)
        if resume is True:
            resume = get_last_checkpoint(self.args.output_dir)
            if resume is None:
                raise ValueError(f"resume_from_checkpoint=True, but {self.args.output_dir} holds no checkpoint.")
        resume = resume or None
        compacted_checkpoint = resume is not None and os.path.isfile(os.path.join(resume, GATE_STATE_NAME))
        # a compacted checkpoint resumes into a model without gates: nothing freezes inside DDP
        self._check_ddp_can_freeze(resume is not None and not compacted_checkpoint)
        if resume is None and self.state.global_step == 0 and not self.recovering:
            self._prepare_gates()
        elif compacted_checkpoint:
            self._load_gate_state(resume)
        small = self._recovery_copy(resume, compacted_checkpoint)
        if small is None:
            output = super().train(*args, **kwargs)
        else:
            handles = _hold_padding_at_zero(self.gated_model, small)
            saved = self._train_on(small)
            try:
                output = super().train(*args, **kwargs)
            finally:  # the user's model gets what was trained, even when training stopped on an error
                write_back(self.gated_model, small)
                for handle in handles:
                    handle.remove()
                self._train_on(self.gated_model, saved)
        if self.flop_config.uniform_shapes and not self.recovering:
            before = sparsity_report(self.gated_model).deterministic_sparsity
            result = fix_masks_at_target(self.gated_model)
            self.uniform_fix = {"sparsity_before": before, "sparsity_after": result.deterministic_sparsity}
            logger.info("PruningTrainer: eval masks fixed to uniform shapes at the target: %s", self.uniform_fix)
        self.target_check = check_target(self.gated_model)
        if not self.target_check.met and self.is_world_process_zero():
            message = self.missed_target_message()
            logger.warning(message)
            warnings.warn(message, UserWarning, stacklevel=2)
        return output

    def _recovery_copy(self, resume: str | None, compacted_checkpoint: bool) -> PreTrainedModel | None:
        """The compacted model the recovery steps train, or None to train the gated model with its masks held.

        ``compact_recovery`` with ``pruning_phase=0``: after the one-shot masks and refit (or the
        checkpoint's gates), ``compact(model)``, its parameters trainable where the gated model's are.
        Every process compacts the same masks and weights (process 0's refit was broadcast), before
        Trainer wraps the model in DDP. Not possible, logged at info level: levels other than head and
        row (they compact to other module types, so no exact write-back), an optimizer passed to
        PruningTrainer (it holds the gated model's parameters), a checkpoint of the gated model.
        """
        args = self.args
        if not (args.compact_recovery and args.pruning_phase == 0.0) and not compacted_checkpoint:
            return None
        why = None
        if not set(self.flop_config.levels) <= set(GROUP_LEVELS):
            why = (
                f"FlopConfig.levels={self.flop_config.levels}: only head and row compact to cut linears whose "
                "weights write back exactly (rank, block and embedding compact to other module types)"
            )
        elif self.optimizer is not None:
            why = "an optimizer was passed to PruningTrainer, and it holds the gated model's parameters"
        elif not self.recovering:
            why = "the gates are not fixed (no one-shot masks were set)"
        elif any(not bool(((scale == 0) | (scale == 1)).all()) for *_, scale in kept_slices(self.gated_model).values()):
            why = "some eval masks hold values other than 0 and 1"
        if compacted_checkpoint and (why or not args.compact_recovery or args.pruning_phase != 0.0):
            raise ValueError(
                f"{resume} holds the compacted model of a compact_recovery run ({GATE_STATE_NAME}); resume it with "
                f"PruningArguments(pruning_phase=0, compact_recovery=True), the same FlopConfig and no optimizer "
                f"passed (now pruning_phase={args.pruning_phase}, compact_recovery={args.compact_recovery}"
                + (f"; {why}" if why else "")
                + ")."
            )
        if resume is not None and not compacted_checkpoint:
            why = f"{resume} holds the gated model (a run with compact_recovery=False, or a masked fallback)"
        if why:
            logger.info("PruningTrainer: recovery trains the gated model with its masks held, not compacted: %s.", why)
            return None
        # building the compacted model initialises its layers from the global RNG before loading the weights;
        # forked, so the seed's dropout draws stay those a plain Trainer on the one-shot model would make
        with torch.random.fork_rng(devices=[]):
            small = compact(self.gated_model)
        counterparts = gated_counterparts(self.gated_model, small)
        for name, param in small.named_parameters():
            param.requires_grad_(counterparts[name].requires_grad)
        self.compacted_recovery = True
        logger.info(
            "PruningTrainer: recovery trains the compacted model (%d parameters, %d trainable).",
            sum(p.numel() for p in small.parameters()),
            sum(p.numel() for p in small.parameters() if p.requires_grad),
        )
        return small

    def _train_on(self, model: nn.Module, saved: dict | None = None) -> dict:
        """Make ``model`` the one Trainer trains, evaluates and checkpoints; returns what it replaced.

        Trainer derived ``model_accepts_loss_kwargs`` from the model in ``__init__``: derived again
        (or put back from ``saved``). Label names and loss type come from the model's class, which
        compaction keeps (the same class or a subclass with the same forward).
        """
        previous = {"model_accepts_loss_kwargs": self.model_accepts_loss_kwargs}
        self.model = self.model_wrapped = self.callback_handler.model = model
        if saved is not None:
            self.model_accepts_loss_kwargs = saved["model_accepts_loss_kwargs"]
            return previous
        unwrapped = unwrap_peft_model(self.accelerator.unwrap_model(model))
        if hasattr(unwrapped, "accepts_loss_kwargs"):
            self.model_accepts_loss_kwargs = unwrapped.accepts_loss_kwargs
        else:
            parameters = inspect.signature(unwrapped.forward).parameters.values()
            self.model_accepts_loss_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters)
        return previous

    def _load_gate_state(self, checkpoint: str) -> None:
        """Set the gates of the user's (fresh) model to those of a compacted-recovery checkpoint, frozen."""
        state = torch.load(os.path.join(checkpoint, GATE_STATE_NAME), map_location="cpu", weights_only=True)
        expected = _gate_state(self._flop)
        if state.keys() != expected.keys() or any(state[k].shape != v.shape for k, v in expected.items()):
            raise ValueError(
                f"the gates saved in {checkpoint} ({GATE_STATE_NAME}) do not match this model's: resume with the "
                "model and FlopConfig the run started from."
            )
        with torch.no_grad():
            for key, gate in self._flop.gates().items():
                for name, tensor in gate.state_dict(keep_vars=True).items():
                    tensor.copy_(state[f"{key}.{name}"])
        self._freeze_gates()

    def missed_target_message(self, names: dict[str, str] | None = None) -> str:
        """What ``train()`` warns when the size missed the target: by how much, and what to change.

        ``names`` maps ``PruningArguments`` fields (and ``"max_steps / num_train_epochs"``) to what the
        caller's interface calls them, e.g. command-line options.
        """
        names = names or {}

        def name(field: str) -> str:
            return names.get(field, field)

        check = self.target_check or check_target(self.gated_model)
        steps = self.pruning_steps()  # the whole run in one phase
        warmup = resolve_warmup_steps(self.args.target_warmup_steps, steps)
        at_target = max(steps - warmup, 0)
        longer = name("max_steps / num_train_epochs")
        text = f"PruningTrainer: the model ended at {check.describe()}; "
        if check.gap < 0:
            text += (
                f"the gates did not close enough in {steps} steps ({at_target} at the full target after the "
                f"warm-up of {warmup}). Train longer ({longer}), or raise {name('gate_learning_rate')} (now "
                f"{self.args.gate_learning_rate}) or {name('lagrangian_learning_rate')} (now "
                f"{self.args.lagrangian_learning_rate}); a shorter {name('target_warmup_steps')} (now "
                f"{self.args.target_warmup_steps}) leaves more steps at the target."
            )
        elif check.expected - check.target > check.tolerance:
            text += (
                f"the gates closed too far (expected sparsity {check.expected:.3f} too). Lower "
                f"{name('gate_learning_rate')} (now {self.args.gate_learning_rate}), or train longer at the target "
                f"({longer}) so the constraint can reopen them."
            )
        else:
            text += (
                f"the expected sparsity is {check.expected:.3f}: gates left undecided (neither open nor closed) count "
                f"in expectation but the eval masks drop them. Train longer at the target ({longer}; {at_target} of "
                f"{steps} steps were at the full target) so the gates settle."
            )
        return text + " Compaction keeps the size it ended at, not the target."

    def training_facts(self) -> dict[str, str]:
        """How this trainer pruned the model, for a model card's "Training procedure"."""
        args, config = self.args, self.flop_config
        batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        facts = {
            "pruning": f"{self.state.global_step:,} steps of PruningTrainer, batch {batch}, learning rate "
            f"{args.learning_rate:g}, target {config.target_sparsity} (warm-up {args.target_warmup_steps:g}"
            f"{(' of the pruning phase' if args.two_phase else ' of the run') if args.target_warmup_steps < 1 else ' steps'}"
            f"), levels {', '.join(config.levels)}, "
            f"gate {config.gate}",
            "gate and multiplier learning rates": f"{args.gate_learning_rate:g}, {args.lagrangian_learning_rate:g} "
            f"(lambda_1), {args.quadratic_learning_rate:g} (lambda_2)",
            "distillation": f"from a teacher model (logit KL, alpha {args.distillation_alpha:g}, temperature "
            f"{args.distillation_temperature:g}"
            + (f"; hidden-state MSE, weight {args.hidden_distillation_weight:g}" if self._hidden_distillation else "")
            + ")"
            if self.teacher_model is not None
            else "none",
            "seed": str(args.seed),
        }
        if args.pruning_phase == 0.0:
            facts["schedule"] = (
                f"one-shot: masks set at the target by {args.oneshot_score} scores on calibration data and the "
                f"kept weights refit before training, gates frozen, {self.state.max_steps or 0:,} recovery steps"
                + (" on the compacted model" if self.compacted_recovery else "")
            )
        elif args.two_phase:
            pruning = self.pruning_steps()
            facts["schedule"] = (
                f"two phases: {pruning:,} pruning steps, then the masks fixed at the target"
                + (" and the kept weights refit on calibration data" if self.reconstruction_data is not None else "")
                + f", gates frozen, {max((self.state.max_steps or 0) - pruning, 0):,} recovery steps"
            )
        if self.uniform_fix is not None:
            fix = self.uniform_fix
            facts["uniform shapes"] = (
                "after training, the eval masks fixed at the target with the same heads and FFN width in every "
                f"layer (sparsity {fix['sparsity_before']:.3f} -> {fix['sparsity_after']:.3f})"
            )
        if self.target_check is not None:
            check = self.target_check
            facts["size reached"] = f"sparsity {check.sparsity:.3f} for target {check.target}" + (
                "" if check.met else " (missed)"
            )
        return facts

    # --- optimizer ---------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        """Trainer's optimizer, with the gates and the multipliers moved to groups of their own."""
        if self.optimizer is not None and any("flop_role" in g for g in self.optimizer.param_groups):
            return self.optimizer
        created_here = self.optimizer is None
        optimizer = super().create_optimizer(model)
        multipliers = dict(self.constraint.named_parameters())  # none for the top-k regularizer
        if multipliers and "maximize" not in optimizer.defaults:
            raise ValueError(
                f"{type(optimizer).__name__} has no 'maximize' option, which the Lagrange multipliers need (gradient "
                "ascent). Use a torch optimizer, e.g. PruningArguments(optim='adamw_torch')."
            )
        if created_here and not self.compacted_recovery:  # the compacted model has no gates
            # every gate, frozen or not: a checkpoint of a run whose gates froze before the optimizer existed
            # (pruning_phase=0) must load into one created before they freeze (resume), and vice versa
            gates = list(self._flop.gate_parameters())
            gate_ids = {id(p) for p in gates}
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in gate_ids]
            settings = {"weight_decay": 0.0, "flop_role": "gates", **_gate_settings(optimizer)}
            optimizer.add_param_group({"params": gates, **settings})
        for name, param in multipliers.items():
            optimizer.add_param_group({"params": [param], "weight_decay": 0.0, "maximize": True, "flop_role": name})
        _hold_learning_rates(optimizer, self.args, gates_frozen=self.recovering)
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        # the scheduler's first step rescaled them
        _hold_learning_rates(optimizer or self.optimizer, self.args, gates_frozen=self.recovering)
        return scheduler

    # --- loss --------------------------------------------------------------------------------------
    @property
    def _hidden_distillation(self) -> bool:
        return self.teacher_model is not None and self.args.hidden_distillation_weight > 0

    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False, num_items_in_batch=None):
        """Task loss (mixed with distillation when there is a teacher) plus the Lagrangian term.

        ``(1 - alpha) task + alpha KL + hidden_distillation_weight * hidden MSE + constraint``; in the
        recovery phase of a two-phase run without the constraint term (the gates are frozen). In
        evaluation only the task loss is returned.
        """
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.recovering:
            self._set_gates_to_masks()  # after this step's model.train()
        teacher_inputs = {k: v for k, v in inputs.items() if k not in self.label_names}
        if self._hidden_distillation:
            inputs = {**inputs, "output_hidden_states": True}
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
        if self.teacher_model is not None:
            alpha = self.args.distillation_alpha
            teacher = self._teacher_outputs(teacher_inputs)  # one teacher forward for both distillations
            mask = teacher_inputs.get("attention_mask")
            distill = self._distillation_loss(_logits(outputs), _logits(teacher), mask)
            loss = (1.0 - alpha) * task + alpha * window * distill
            if self._hidden_distillation:
                hidden = self._hidden_distillation_loss(outputs, teacher, mask)
                self._track("hidden_distillation_loss", hidden.detach() / steps_in_window)
                loss = loss + self.args.hidden_distillation_weight * window * hidden
        if not self.recovering:  # frozen gates: the size is fixed, and the term must not move them
            s = expected_sparsity(self.gated_model)
            loss = loss + window * self.constraint(s.to(loss.device), self.current_target())
        return (loss, outputs) if return_outputs else loss

    def _loss_scaled_for_ga(self, num_items_in_batch) -> bool:
        """Whether Trainer treats the task loss as already normalised over the accumulation window."""
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    def _teacher_outputs(self, teacher_inputs: dict):
        """The teacher's forward on this batch, without gradients: logits and, if asked, hidden states."""
        if self._hidden_distillation:
            teacher_inputs = {**teacher_inputs, "output_hidden_states": True}
        with torch.no_grad():
            return self.teacher_model(**teacher_inputs)

    def _distillation_loss(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"teacher_model logits have shape {tuple(teacher_logits.shape)} but the model's have "
                f"{tuple(student_logits.shape)}; the teacher must share the task head and vocabulary."
            )
        temp = self.args.distillation_temperature
        per_position = F.kl_div(
            F.log_softmax(student_logits.float() / temp, dim=-1),
            F.log_softmax(teacher_logits.float() / temp, dim=-1),
            log_target=True,
            reduction="none",
        ).sum(-1) * (temp * temp)
        return _masked_mean(per_position, mask)

    def _hidden_distillation_loss(self, outputs, teacher_outputs, mask: torch.Tensor | None) -> torch.Tensor:
        """Mean over transformer layers of the MSE between the model's and the teacher's hidden states.

        ``hidden_states[0]`` (the embedding output) is left out, as in CoFi's layer distillation: the
        layers' outputs are what pruning changes. Per position the squared error is averaged over the
        hidden size, then over the positions the attention mask keeps.
        """
        student = _hidden_states(outputs, "the model")
        teacher = _hidden_states(teacher_outputs, "teacher_model")
        if len(student) != len(teacher):
            raise ValueError(
                f"the model returns {len(student)} hidden states but teacher_model {len(teacher)}: hidden-state "
                "distillation matches layers one to one, so both need the same number of layers."
            )
        if len(student) < 2:
            raise ValueError("the model returns no transformer-layer hidden states to distil (only the embeddings).")
        terms = []
        for i, (s, t) in enumerate(zip(student[1:], teacher[1:]), start=1):
            if s.shape != t.shape:
                raise ValueError(
                    f"hidden state {i}: the model's has shape {tuple(s.shape)} but teacher_model's "
                    f"{tuple(t.shape)}; hidden-state distillation needs the same hidden size."
                )
            terms.append(_masked_mean((s.float() - t.float()).pow(2).mean(-1), mask))
        return torch.stack(terms).mean()

    # --- logging -----------------------------------------------------------------------------------
    def _track(self, name: str, value: torch.Tensor) -> None:
        """Add a micro-batch's value (in the units of Trainer's loss) to what the next log averages per step."""
        if not self._tracked:
            self._tracked_first_step = self.state.global_step
        total = self._tracked.get(name)
        self._tracked[name] = value.clone() if total is None else total + value

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Trainer's log, plus sparsity, target, multipliers and the task loss alone in training logs.

        In a two-phase run also ``phase`` (that of the log's last step) and, with hidden-state
        distillation, ``hidden_distillation_loss``.
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
                logs["phase"] = PRUNING if self.state.global_step <= self.pruning_steps() else RECOVERY
        super().log(logs, start_time)

    # --- checkpoints -------------------------------------------------------------------------------
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            state = {**self.constraint.values(), "global_step": self.state.global_step, "target": self.current_target()}
            if self.args.two_phase:  # which side of the boundary; the fixed gates are in the model's weights
                state.update(phase=self.phase, boundary=self.boundary)
            write_json_atomic(os.path.join(output_dir, CONSTRAINT_STATE_NAME), state)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        if self.model is not self.gated_model:  # a compacted-recovery checkpoint: its masks are in the gates
            torch.save(_gate_state(self._flop), os.path.join(output_dir or self.args.output_dir, GATE_STATE_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, CONSTRAINT_STATE_NAME)
        if not os.path.isfile(path):
            raise ValueError(
                f"{checkpoint} has no {CONSTRAINT_STATE_NAME}: it was not written by PruningTrainer, so the "
                "Lagrange multipliers cannot be restored. Resume from a PruningTrainer checkpoint."
            )
        with open(path) as f:
            state = json.load(f)
        self.constraint.load_values(state)
        if state.get("phase", PRUNING) == RECOVERY:
            if not self.args.two_phase:
                raise ValueError(
                    f"{checkpoint} was saved in the recovery phase of a two-phase run (masks fixed, gates frozen); "
                    f"resume it with the same PruningArguments.pruning_phase (< 1), not {self.args.pruning_phase}."
                )
            # the checkpointed gates already hold the fixed masks: freeze them, do not fix them again
            self.boundary = state.get("boundary")
            self._freeze_gates()
        elif self.recovering:  # this trainer went past the boundary before; the checkpoint is from before it
            self.phase, self.boundary = PRUNING, None
            for param in self._flop.gate_parameters():
                param.requires_grad_(True)
        _hold_learning_rates(self.optimizer, self.args, gates_frozen=self.recovering)  # e.g. other learning rates

    # --- export ------------------------------------------------------------------------------------
    def save_compacted(self, output_dir: str, **kwargs):
        """Compact the pruned model and save it (``hf_flop.save_compacted``), from the main process only.

        The card's "Training procedure" defaults to ``training_facts()``.
        """
        kwargs.setdefault("training", self.training_facts())
        result = save_compacted(self.gated_model, output_dir, **kwargs) if self.args.should_save else None
        self.accelerator.wait_for_everyone()
        return result


def _gate_state(flop_model) -> dict[str, torch.Tensor]:
    """Every gate's parameters and buffers, keyed ``<gate name>.<tensor name>`` (CPU copies)."""
    return {
        f"{key}.{name}": tensor.detach().cpu().clone()
        for key, gate in flop_model.gates().items()
        for name, tensor in gate.state_dict().items()
    }


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


def _gate_settings(optimizer: torch.optim.Optimizer) -> dict:
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


def _hold_learning_rates(optimizer: torch.optim.Optimizer, args: PruningArguments, gates_frozen: bool = False) -> None:
    """Put the constant learning rates of the gate and multiplier groups back.

    Gates and multipliers are not on Trainer's schedule (CoFi does the same): a decayed gate or
    multiplier step would freeze the constraint before it is met. Trainer's scheduler rescales every
    group, so this runs after each scheduler step. The ``flop_role`` tag survives optimizer checkpoints.
    With ``gates_frozen`` (the recovery phase) the gate group's rate is 0: the gates carry Adam state
    from the pruning phase, which must not move them.
    """
    rates = {
        "gates": 0.0 if gates_frozen else args.gate_learning_rate,
        "lambda_1": args.lagrangian_learning_rate,
        "lambda_2": args.quadratic_learning_rate,
    }
    for group in optimizer.param_groups:
        if "flop_role" in group:
            group["lr"] = rates[group["flop_role"]]


class _PruningStepCallback(TrainerCallback):
    """After each optimizer step: clear the multipliers' gradients, cross the phase boundary when it is
    due, restore the constant learning rates.

    Trainer zeroes gradients with ``model.zero_grad()``, and the multipliers are not model parameters.
    The boundary is crossed in ``on_step_end``, after the step whose ``global_step`` completes the
    pruning phase and before that step's log and checkpoint.
    """

    def __init__(self, trainer: PruningTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        boundary = self.trainer.boundary
        if boundary is not None and boundary["boundary_step"] == 0 and state.global_step == 0:
            self.trainer.log(dict(boundary))  # one-shot masks (pruning_phase=0), set before train() began

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.constraint.zero_grad(set_to_none=True)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        trainer = self.trainer
        # ">=": a run resumed with a shorter pruning phase than it was saved with crosses at once
        if args.two_phase and not trainer.recovering and state.global_step >= trainer.pruning_steps():
            trainer.enter_recovery()
        if optimizer is not None:
            _hold_learning_rates(optimizer, args, gates_frozen=trainer.recovering)


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


def _prepared_teacher(teacher: nn.Module | None, student: nn.Module, device) -> nn.Module | None:
    if teacher is None:
        return None
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher_model must be a torch nn.Module, got {type(teacher).__name__}.")
    student_params = {id(p) for p in student.parameters()}
    if any(id(p) in student_params for p in teacher.parameters()):
        raise ValueError(
            "teacher_model shares parameters with the model being pruned (get_flop_model modifies a model in "
            "place); pass a copy made before injection, e.g. teacher = copy.deepcopy(model) first."
        )
    return teacher.to(device).eval().requires_grad_(False)


def _logits(outputs) -> torch.Tensor:
    """The logits of a model output (ModelOutput, dict, tuple with or without a loss, or a tensor)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict):
        if "logits" not in outputs:
            raise ValueError(f"model outputs have no 'logits' (keys: {list(outputs)}); distillation needs logits.")
        return outputs["logits"]
    return outputs[1] if len(outputs) > 1 and outputs[0].dim() == 0 else outputs[0]


def _masked_mean(per_position: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over positions, leaving out padding when an attention mask of the same shape is given."""
    if mask is not None and mask.shape == per_position.shape:
        mask = mask.to(per_position.dtype)
        return (per_position * mask).sum() / mask.sum().clamp(min=1.0)
    return per_position.mean()


def _hidden_states(outputs, who: str) -> tuple[torch.Tensor, ...]:
    """The ``hidden_states`` of a model output called with ``output_hidden_states=True``, or a clear error."""
    states = outputs.get("hidden_states") if isinstance(outputs, dict) else getattr(outputs, "hidden_states", None)
    if not states:
        raise ValueError(
            f"{who} returned no hidden_states when called with output_hidden_states=True (got a "
            f"{type(outputs).__name__}); hidden_distillation_weight > 0 needs two models that return them, as "
            "transformers models do. Set hidden_distillation_weight=0 to distil the logits only."
        )
    return tuple(states)


def _checked_reconstruction_data(data: Iterable | None, args: PruningArguments, flop_model) -> Iterable | None:
    """The calibration batches for the refit at the phase boundary, checked before training starts."""
    if data is None:
        return None
    if not args.two_phase:
        raise ValueError(
            "reconstruction_data is used at the end of the pruning phase, and with pruning_phase=1.0 there is none: "
            "set PruningArguments.pruning_phase below 1 (e.g. 0.5), or leave reconstruction_data out."
        )
    if isinstance(data, (str, bytes, dict)) or not isinstance(data, Iterable):
        raise TypeError(
            f"reconstruction_data must be an iterable of batches (dicts of tensors with input_ids, e.g. a DataLoader), "
            f"got {type(data).__name__}."
        )
    data = reusable_batches(data)  # a one-off iterator is kept, so the refit (once, later) still has it
    if hasattr(data, "__len__") and len(data) < 2:
        raise ValueError(
            f"reconstruction_data has {len(data)} batch(es); the refit needs at least 2 (most to fit, one held out)."
        )
    if not flop_model.flop_config.train_base and args.save_strategy != "no":
        warnings.warn(
            "reconstruction_data with FlopConfig(train_base=False): the refit changes base-layer weights that the "
            "adapter checkpoints do not hold, so resuming after the phase boundary would lose it.",
            UserWarning,
            stacklevel=3,
        )
    return data
