"""The phase work of a pruning run, as one `TrainerCallback`: masks before the first step, the boundary, frozen gates.

Lifecycle (``PruningSchedule.kind`` says which parts run):

1. ``prepare`` (called by ``PruningTrainer.train()`` before Trainer builds the optimizer, fresh runs
   only): a one-shot run sets the masks from ``oneshot_score`` scores on the calibration data, refits
   the kept weights and freezes the gates, so the optimizer and DDP never see trainable gates; a
   two-phase run warm-starts the gates from the same scores (``warm_start_gates``).
2. ``on_train_begin``: a boundary already crossed before training (one-shot) gets its log entry.
3. ``on_step_end`` of the step that completes the pruning phase: ``enter_recovery`` fixes the masks
   at exactly the target, refits with calibration data, freezes the gates.
4. From then on every step holds the gates at their eval masks (``hold_masks``, after Trainer's
   ``model.train()``).

The model is not compacted in place at the boundary: the optimizer (its groups and Adam state), DDP
(its gradient buckets) and the checkpoints all refer to the original parameters. Recovery runs at
the original shapes with exactly-zero gates (or, one-shot, on a compacted copy: ``compacted_recovery``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from torch import nn
from transformers import TrainerCallback

from ..accounting import sparsity_report
from ..oneshot import fix_masks_at_target, prune_oneshot, warm_start_gates
from ..reconstruction import reconstruct
from ..scores import compute_scores
from .optimizer import hold_learning_rates
from .schedule import PRUNING, RECOVERY, PruningSchedule

logger = logging.getLogger("hf_flop.trainer")  # the trainer's one logger, whatever module speaks


class GatePhases(TrainerCallback):
    """Which phase the run is in, what the boundary did, and the verbs that move between phases.

    ``log`` records a dict as its own log entry (``PruningTrainer.log_aside``), ``broadcast`` makes
    every process hold process 0's weights after a refit (a no-op outside DDP), ``schedule`` gives the
    run's current ``PruningSchedule`` and ``optimizer`` the optimizer once Trainer has built it.
    """

    def __init__(
        self,
        flop_model,
        gated_model: nn.Module,
        calibration_data: Iterable | None,
        log: Callable[[dict], None],
        broadcast: Callable[[nn.Module], None],
        schedule: Callable[[], PruningSchedule],
        optimizer: Callable[[], object],
    ) -> None:
        self.flop_model = flop_model
        self.gated_model = gated_model
        self.calibration_data = calibration_data
        self._log, self._broadcast, self._schedule, self._optimizer = log, broadcast, schedule, optimizer
        self.phase = PRUNING
        self.boundary: dict | None = None  # what happened at the phase boundary, once crossed
        self._frozen_gates: list[nn.Module] = []

    @property
    def recovering(self) -> bool:
        """Whether the masks are fixed and the gates frozen (the recovery phase)."""
        return self.phase == RECOVERY

    # --- verbs -------------------------------------------------------------------------------------
    def prepare(self, args, step: int, score: str | None) -> None:
        """Before the first step of a fresh run: one-shot masks (``pruning_phase=0``) or gates warm-started by ``score``."""
        data, schedule = self.calibration_data, self._schedule()
        if data is None or score is None or not schedule.has_recovery:
            return
        if schedule.kind == "two-phase":
            warm_start_gates(self.gated_model, compute_scores(self.gated_model, data, score))
            return
        before = sparsity_report(self.gated_model)
        prune_oneshot(self.gated_model, None, data, score, reconstruct=False)
        report = reconstruct(self.gated_model, data, progress=not args.disable_tqdm)
        self._broadcast(self.gated_model)
        budget = before.prunable_params * (1 - self.flop_model.flop_config.target_sparsity)
        self._record_boundary(step, before, budget, sum(r.applied for r in report.layers), args)

    def adopt_masks(self, args, step: int, reconstructed: int) -> None:
        """The masks were set (and the kept weights refit) before training, e.g. by ``hf_flop.search_shape``: the
        one-shot step of ``prepare`` is skipped, the boundary recorded as is and the gates frozen (one-shot runs).
        ``reconstructed``: the modules that refit changed."""
        if self._schedule().kind != "one-shot":
            raise ValueError(
                "masks set before training are kept by a one-shot run only (PruningArguments.pruning_phase=0); the "
                "other schedules learn them."
            )
        report = sparsity_report(self.gated_model)
        budget = report.prunable_params * (1 - self.flop_model.flop_config.target_sparsity)
        self._record_boundary(step, report, budget, reconstructed, args)

    def enter_recovery(self, args, step: int) -> dict:
        """End the pruning phase: fix the masks at the target, refit (with data), freeze the gates.

        1. every gated unit is ranked by its gate (units the eval mask keeps above the ones it drops,
           then by ``Gate.keep_strength``) and ``fix_masks_at_target`` closes units in that order until
           the eval-mask size is the target to within half a unit; every eval mask is exactly 0 or 1;
        2. with calibration data, ``hf_flop.reconstruct`` refits the kept weights (under DDP process
           0's refit is broadcast, so the processes cannot drift apart);
        3. the gates are frozen (``requires_grad=False``, learning rate 0 in their optimizer group) and
           compute their eval masks from then on, also in training mode. The multipliers keep their values.

        Returns the boundary facts (also ``self.boundary`` and one log entry).
        """
        if not self._schedule().has_recovery:
            raise ValueError(
                "enter_recovery belongs to a two-phase run (PruningArguments.pruning_phase < 1), whose checkpoints "
                "record the phase; to fix the masks of a one-phase run at the target, use "
                "hf_flop.oneshot.fix_masks_at_target(model)."
            )
        if self.recovering:
            raise RuntimeError("the recovery phase has already begun: the masks are fixed.")
        before = sparsity_report(self.gated_model)
        result = fix_masks_at_target(self.gated_model)
        reconstructed = 0
        if self.calibration_data is not None:
            report = reconstruct(self.gated_model, self.calibration_data, progress=not args.disable_tqdm)
            self._broadcast(self.gated_model)
            reconstructed = sum(r.applied for r in report.layers)
        self._record_boundary(step, before, result.budget, reconstructed, args)
        self._log(dict(self.boundary))
        return self.boundary

    def freeze(self, args) -> None:
        """Gates fixed for the rest of the run: no gradient, no optimizer step, eval masks in training too."""
        self.phase = RECOVERY
        for param in self.flop_model.gate_parameters():
            param.requires_grad_(False)
            param.grad = None
        optimizer = self._optimizer()
        if optimizer is not None:
            hold_learning_rates(optimizer, args, gates_frozen=True)
        self._frozen_gates = list(self.flop_model.gates().values())
        self.hold_masks()

    def restore(self, state: dict, args) -> None:
        """Take the phase a checkpoint was saved in (``hf_flop.training.checkpoint.load_run_state``)."""
        if state.get("phase", PRUNING) == RECOVERY:
            # the checkpointed gates already hold the fixed masks: freeze them, do not fix them again
            self.boundary = state.get("boundary")
            self.freeze(args)
        elif self.recovering:  # this run went past the boundary before; the checkpoint is from before it
            self.phase, self.boundary = PRUNING, None
            self._frozen_gates = []
            for param in self.flop_model.gate_parameters():
                param.requires_grad_(True)

    def hold_masks(self) -> None:
        # Trainer calls model.train() before every step, which would make the gates sample again
        # (hard-concrete samples of an open gate fall below 1 now and then): back to the eval masks.
        for gate in self._frozen_gates:
            gate.eval()

    def _record_boundary(self, step: int, before, budget: float, reconstructed: int, args) -> None:
        after = sparsity_report(self.gated_model)
        self.freeze(args)
        self.boundary = {
            "boundary_step": step,
            "boundary_deterministic_sparsity_before": before.deterministic_sparsity,
            "boundary_expected_sparsity_before": float(before.expected_sparsity),
            "boundary_deterministic_sparsity_after": after.deterministic_sparsity,
            "boundary_kept_params": after.deterministic_kept_params,
            "boundary_budget_params": budget,
            "boundary_reconstructed_modules": reconstructed,
        }
        logger.info("PruningTrainer: phase boundary at step %d: %s", step, self.boundary)

    # --- events ------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        if self.boundary is not None and self.boundary["boundary_step"] == 0 and state.global_step == 0:
            self._log(dict(self.boundary))  # one-shot masks, set before train() began

    def on_step_end(self, args, state, control, **kwargs):
        # after the step that completes the pruning phase, before that step's log and checkpoint
        if not self.recovering and self._schedule().boundary_due(state.global_step):
            self.enter_recovery(args, state.global_step)
