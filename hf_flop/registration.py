"""What ``import hf_flop`` registers: FLOP as a PEFT method, and the compacted models' Auto classes.

Both steps are idempotent, so calling them again (e.g. in a subprocess that imported hf_flop
already) is harmless.
"""

from __future__ import annotations

import transformers
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import register_peft_method
from transformers import AutoConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .architectures import ARCHITECTURES
from .config import FlopConfig
from .model import FlopModel
from .modeling import auto_class_names, compacted_config_class, compacted_model_class
from .peft_type import PEFT_NAME, flop_peft_type


def register() -> None:
    """Register FLOP with PEFT, so ``peft.get_peft_model(model, FlopConfig(...))`` works."""
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(flop_peft_type()) is FlopConfig:
        return
    register_peft_method(name=PEFT_NAME, config_cls=FlopConfig, model_cls=FlopModel, prefix="flop_")


def register_auto_classes() -> None:
    """Register ``flop_<type>`` configs and their model classes for every architecture hf_flop supports.

    Then ``AutoModelFor<Task>.from_pretrained(dir)`` loads a compacted model without ``trust_remote_code``.
    """
    for model_type in ARCHITECTURES:
        if model_type not in CONFIG_MAPPING:  # an architecture this transformers release lacks
            continue
        config_class = compacted_config_class(CONFIG_MAPPING[model_type])
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for auto_name, class_name in auto_class_names(model_type).items():
            model_class = compacted_model_class(getattr(transformers, class_name))
            getattr(transformers, auto_name).register(config_class, model_class, exist_ok=True)
