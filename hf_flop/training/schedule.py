"""The pruning schedule as a pure object: which steps prune, the target at a step, the phase of a step.

Three kinds of run, chosen by ``PruningArguments.pruning_phase``:

* ``"one-shot"`` (0): the masks are set before the first step; every step recovers;
* ``"two-phase"`` (between 0 and 1): ``ceil(pruning_phase * max_steps)`` steps learn the masks,
  then they are fixed at the target and the rest recover;
* ``"learned"`` (1): every step learns the masks (FLOP's single phase).

Nothing here touches a model or a trainer: the numbers depend only on the arguments, the target and
the run's length, so they can be checked and printed before any training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..constraint import resolve_warmup_steps, warmed_up_target

PRUNING, RECOVERY = "pruning", "recovery"  # the phases of a run with a recovery phase
ScheduleKind = Literal["one-shot", "two-phase", "learned"]


@dataclass(frozen=True)
class PruningSchedule:
    """Steps, targets and phases of one run.

    ``pruning_phase`` and ``target_warmup_steps`` are ``PruningArguments``' fields, ``target_sparsity``
    the model's ``FlopConfig.target_sparsity``, ``max_steps`` the run's optimizer steps (0 while unknown).
    """

    pruning_phase: float
    target_warmup_steps: float
    target_sparsity: float
    max_steps: int = 0

    @property
    def kind(self) -> ScheduleKind:
        if self.pruning_phase == 0.0:
            return "one-shot"
        return "learned" if self.pruning_phase >= 1.0 else "two-phase"

    @property
    def has_recovery(self) -> bool:
        """Whether the masks are fixed at some point and the remaining steps recover (one-shot and two-phase)."""
        return self.kind != "learned"

    @property
    def pruning_steps(self) -> int:
        """Steps that learn the masks: the whole run, none (one-shot), or ``ceil(pruning_phase * max_steps)``."""
        if self.kind == "learned":
            return self.max_steps
        if self.kind == "one-shot" or not self.max_steps:
            return 0
        # the small offset keeps float products such as 0.7 * 10 = 7.000000000000001 from rounding up
        return max(1, math.ceil(self.pruning_phase * self.max_steps - 1e-9))

    @property
    def warmup_steps(self) -> int:
        """Steps over which the target rises from 0; a fraction is one of the pruning phase."""
        return resolve_warmup_steps(self.target_warmup_steps, self.pruning_steps)

    def target_at(self, step: int) -> float:
        """The target sparsity at optimizer step ``step`` (after the warm-up: ``target_sparsity``)."""
        return warmed_up_target(self.target_sparsity, step, self.warmup_steps)

    def phase_at(self, step: int) -> str:
        """``"pruning"`` or ``"recovery"``: the phase of the log at ``step`` (the boundary step is still pruning)."""
        return PRUNING if step <= self.pruning_steps else RECOVERY

    def boundary_due(self, step: int) -> bool:
        """Whether the masks are to be fixed after step ``step`` (``>=``: a run resumed with a shorter pruning
        phase than it was saved with crosses at once)."""
        return self.has_recovery and step >= self.pruning_steps
