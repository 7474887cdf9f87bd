"""The calibration batches of a pruning run: ``reconstruction_data`` given to PruningTrainer, or a sample of train_dataset.

One-shot runs score and refit on them before the first step; two-phase runs warm-start the gates
on them and refit at the boundary. The checks and the sampling are ``hf_flop.calibration``'s; what
is the trainer's own is which run may have them and in whose words the errors speak.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

from ..calibration import check_calibration_data, sample_batches

# the trainer's names for sample_batches' parameters, so its errors name what the user can change
SAMPLING_NAMES = {
    "dataset": "train_dataset",
    "batches": "PruningArguments.calibration_batches",
    "batch_size": "per_device_train_batch_size",
    "calibration_data": "reconstruction_data=...",
}


def checked_calibration_data(data: Iterable | None, args, flop_model) -> Iterable | None:
    """``reconstruction_data`` checked before training starts (a one-off iterator is kept for later use)."""
    if data is None:
        return None
    if not args.two_phase:
        raise ValueError(
            "reconstruction_data is used at the end of the pruning phase, and with pruning_phase=1.0 there is none: "
            "set PruningArguments.pruning_phase below 1 (e.g. 0.5), or leave reconstruction_data out."
        )
    data = check_calibration_data(data, name="reconstruction_data", min_batches=2, why="most to fit, one held out")
    if not flop_model.flop_config.train_base and args.save_strategy != "no":
        warnings.warn(
            "reconstruction_data with FlopConfig(train_base=False): the refit changes base-layer weights that the "
            "adapter checkpoints do not hold, so resuming after the phase boundary would lose it.",
            UserWarning,
            stacklevel=3,
        )
    return data


def sample_training_batches(dataset, batches: int, batch_size: int, seed: int, collate) -> list | None:
    """``batches`` collated batches of a seeded sample of ``dataset`` (None without one); see ``sample_batches``."""
    if dataset is None:
        return None
    return sample_batches(dataset, batches, batch_size, seed, collate, names=SAMPLING_NAMES)
