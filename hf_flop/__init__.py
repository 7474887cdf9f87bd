"""hf_flop: structured pruning of transformers models with FLOP (factorized low-rank pruning).

``import hf_flop`` registers the ``FLOP`` PEFT method, so ``peft.get_peft_model(model,
FlopConfig(...))`` and ``PeftModel.from_pretrained`` work.
"""

from __future__ import annotations

from torch import nn

from .accounting import SparsityReport, expected_sparsity, sparsity_report
from .compact import compact
from .config import FlopConfig
from .gates import Gate, HardConcreteGate, TopKGate
from .hub import PushToHubError, push_compacted, save_compacted
from .layers import FlopLinear
from .model import FlopModel
from .modeling import register_auto_classes
from .oneshot import prune_oneshot, prune_to_target, warm_start_gates
from .registration import register
from .scores import compute_scores
from .structures import ARCHITECTURES, ArchSpec, UnsupportedArchitectureError
from .trainer import PruningArguments, PruningTrainer

register()
register_auto_classes()  # compacted models load with AutoModel*.from_pretrained

__version__ = "0.1.0"


def get_flop_model(model: nn.Module, config: FlopConfig, adapter_name: str = "default"):
    """Inject FLOP into ``model`` and return a ``peft.PeftModel`` around it (same as ``peft.get_peft_model``).

    In eval mode the returned model computes what ``model`` computed (within float rounding)
    until its gates are trained.
    """
    import peft

    if not isinstance(config, FlopConfig):
        raise TypeError(f"get_flop_model needs a FlopConfig, got {type(config).__name__}.")
    if isinstance(model, peft.PeftModel):
        raise ValueError(
            "this model is already a PeftModel; FLOP cannot be injected twice. Pass the original transformers model."
        )
    return peft.get_peft_model(model, config, adapter_name=adapter_name)


__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "FlopConfig",
    "FlopLinear",
    "FlopModel",
    "Gate",
    "PruningArguments",
    "PruningTrainer",
    "PushToHubError",
    "HardConcreteGate",
    "SparsityReport",
    "TopKGate",
    "UnsupportedArchitectureError",
    "compact",
    "compute_scores",
    "expected_sparsity",
    "get_flop_model",
    "prune_oneshot",
    "prune_to_target",
    "push_compacted",
    "save_compacted",
    "sparsity_report",
    "warm_start_gates",
]
