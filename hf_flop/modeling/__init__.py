"""The compacted model's config and model classes (what a model compacted by hf_flop is).

Every file in this folder is self-contained (torch and transformers only, plus its siblings):
``save_pretrained`` copies ``CODE_FILES`` next to the weights, so
``from_pretrained(..., trust_remote_code=True)`` works where hf_flop is not installed. This package
therefore imports nothing from the rest of hf_flop; ``hf_flop.registration`` registers these
classes with the Auto classes.
"""

from __future__ import annotations

from .configuration_flop import TYPE_PREFIX, compacted_config_class
from .modeling_flop import (
    CODE_FILES,
    FlopCompactedMixin,
    LowRankLinear,
    apply_flop_plan,
    auto_class_names,
    compacted_model_class,
    locate,
    read_attribute,
)

__all__ = [
    "CODE_FILES",
    "FlopCompactedMixin",
    "LowRankLinear",
    "TYPE_PREFIX",
    "apply_flop_plan",
    "auto_class_names",
    "compacted_config_class",
    "compacted_model_class",
    "locate",
    "read_attribute",
]
