"""The compacted model's config and model classes, and their registration with the Auto classes.

``configuration_flop.py`` and ``modeling_flop.py`` are self-contained (torch and transformers only):
``save_pretrained`` copies them next to the weights, so ``from_pretrained(..., trust_remote_code=True)``
works where hf_flop is not installed. ``import hf_flop`` registers them (``register_auto_classes``),
so ``AutoModelFor<Task>.from_pretrained(dir)`` works without ``trust_remote_code`` too.
"""

from __future__ import annotations

import transformers
from transformers import AutoConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from ..structures import ARCHITECTURES
from .configuration_flop import compacted_config_class
from .modeling_flop import (
    FlopCompactedMixin,
    LowRankLinear,
    apply_flop_plan,
    auto_class_names,
    compacted_model_class,
    locate,
)


def register_auto_classes() -> None:
    """Register ``flop_<type>`` configs and their model classes for every architecture hf_flop supports."""
    for model_type in ARCHITECTURES:
        if model_type not in CONFIG_MAPPING:  # an architecture this transformers release lacks
            continue
        config_class = compacted_config_class(CONFIG_MAPPING[model_type])
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for auto_name, class_name in auto_class_names(model_type).items():
            model_class = compacted_model_class(getattr(transformers, class_name))
            getattr(transformers, auto_name).register(config_class, model_class, exist_ok=True)


__all__ = [
    "FlopCompactedMixin",
    "LowRankLinear",
    "apply_flop_plan",
    "compacted_config_class",
    "compacted_model_class",
    "locate",
    "register_auto_classes",
]
