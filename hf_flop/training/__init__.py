"""The parts of a pruning run that `PruningTrainer` (``hf_flop.trainer``) wires together, one concern each.

* ``arguments``: ``PruningArguments`` (``TrainingArguments`` plus the pruning settings);
* ``schedule``: ``PruningSchedule``, the pure step arithmetic (pruning steps, target and phase at a step);
* ``phases``: ``GatePhases``, the callback that sets one-shot masks, crosses the boundary, freezes gates;
* ``optimizer``: the gate and multiplier groups and their constant learning rates;
* ``distillation``: ``Distillation``, logit and hidden-state distillation from a teacher;
* ``compacted_recovery``: one-shot recovery on the compacted model, written back after;
* ``calibration_data``: the run's calibration batches, given or sampled from train_dataset;
* ``checkpoint``: what a checkpoint holds beyond Trainer's; ``ddp``: DDP helpers; ``fsdp_setup``: under FSDP2;
* ``outcome``: the missed-target facts (``TargetMiss``, ``TargetMissedWarning``) and the card's training facts.
"""

from __future__ import annotations

from .arguments import PruningArguments
from .distillation import Distillation
from .outcome import TargetMiss, TargetMissedWarning
from .phases import GatePhases
from .schedule import PruningSchedule

__all__ = ["Distillation", "GatePhases", "PruningArguments", "PruningSchedule", "TargetMiss", "TargetMissedWarning"]
