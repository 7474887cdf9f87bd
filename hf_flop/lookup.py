"""Finding the FLOP tuner inside whatever wraps it: ``find_flop_model``.

Accounting, compaction, scores, reconstruction, publishing and the trainer all start from "the
``FlopModel`` in this model" (a ``PeftModel``, a ``FlopModel``, a DDP wrapper around a
``PeftModel``). They sit below or beside the tuner module (``hf_flop.model``), which imports the
gated modules and the levels, so the lookup lives here, under all of them: ``FlopModel`` derives
from ``FlopModelBase``, and this module imports nothing of hf_flop.
"""

from __future__ import annotations

from torch import nn


class FlopModelBase:
    """What makes a tuner a FLOP model for ``find_flop_model``; ``hf_flop.model.FlopModel`` is its one subclass."""


def find_flop_model(model: nn.Module) -> FlopModelBase:
    """The ``FlopModel`` inside a ``PeftModel`` or a DDP wrapper around one (or the object itself), or a clear error."""
    for candidate in (
        model,
        getattr(model, "base_model", None),
        getattr(getattr(model, "module", None), "base_model", None),
    ):
        if isinstance(candidate, FlopModelBase):
            return candidate
    raise ValueError(
        f"{type(model).__name__} has no FLOP layers; wrap it first with hf_flop.get_flop_model(model, FlopConfig(...))."
    )
