"""The calibration batches of a pruning run: ``reconstruction_data`` given to PruningTrainer, or a sample of train_dataset.

One-shot runs score and refit on them before the first step; two-phase runs warm-start the gates
on them and refit at the boundary.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable

import torch

from ..scores import reusable_batches


def checked_calibration_data(data: Iterable | None, args, flop_model) -> Iterable | None:
    """``reconstruction_data`` checked before training starts (a one-off iterator is kept for later use)."""
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


def sample_training_batches(dataset, batches: int, batch_size: int, seed: int, collate) -> list[dict] | None:
    """``batches`` collated batches of a seeded sample of ``dataset`` (None without one).

    A generator of its own draws the sample, so the training run's random state (data order,
    dropout) is the same as with ``reconstruction_data`` given. ``collate`` drops the columns the
    model does not take, as Trainer's collator does for training batches.
    """
    if dataset is None:
        return None
    count = batches * batch_size
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        generator = torch.Generator().manual_seed(seed)
        rows = [dataset[i] for i in torch.randperm(len(dataset), generator=generator)[:count].tolist()]
    else:  # an iterable dataset: its first rows
        rows = list(itertools.islice(iter(dataset), count))
    collated = [collate(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
    if len(collated) < 2:
        raise ValueError(
            f"train_dataset gives {len(collated)} calibration batch(es) of {batch_size} rows; the refit needs at "
            "least 2: pass reconstruction_data=..., or use a smaller per_device_train_batch_size."
        )
    return collated
