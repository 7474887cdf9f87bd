"""What ``import hf_flop`` registers: FLOP as a PEFT method, the compacted models' Auto classes, and the
verification of layouts hf_flop does not ship.

Every step is idempotent, so calling them again (e.g. in a subprocess that imported hf_flop
already) is harmless.
"""

from __future__ import annotations

from collections.abc import Iterable

import transformers
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import register_peft_method
from transformers import AutoConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .architectures import ARCHITECTURES
from .config import FlopConfig
from .layout_check import verify_layout
from .model import FlopModel
from .modeling import TYPE_PREFIX, auto_class_names, compacted_config_class, compacted_model_class
from .peft_type import PEFT_NAME, flop_peft_type
from .recognition import set_verifier


def register() -> None:
    """Register FLOP with PEFT, so ``peft.get_peft_model(model, FlopConfig(...))`` works, and install the check
    that verifies a recognised or user-given layout on a small copy before injection uses it."""
    set_verifier(verify_layout)
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(flop_peft_type()) is FlopConfig:
        return
    register_peft_method(name=PEFT_NAME, config_cls=FlopConfig, model_cls=FlopModel, prefix="flop_")


def register_auto_classes(model_types: Iterable[str] | None = None) -> None:
    """Register ``flop_<type>`` configs and their model classes for ``model_types`` (default: the table's).

    Then ``AutoModelFor<Task>.from_pretrained(dir)`` loads a compacted model without ``trust_remote_code``.
    Any other type registers itself the first time transformers looks ``flop_<type>`` up (a model compacted
    from a layout hf_flop recognised): see ``_CompactedTypesOnDemand``.
    """
    for model_type in ARCHITECTURES if model_types is None else model_types:
        if model_type not in CONFIG_MAPPING:  # an architecture this transformers release lacks
            continue
        config_class = compacted_config_class(CONFIG_MAPPING[model_type])
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for auto_name, class_name in auto_class_names(model_type).items():
            model_class = compacted_model_class(getattr(transformers, class_name))
            getattr(transformers, auto_name).register(config_class, model_class, exist_ok=True)
    _register_on_demand()


class _CompactedTypesOnDemand(dict):
    """The registered entries of transformers' ``CONFIG_MAPPING``, which also answer ``"flop_<type>"`` for every
    model type transformers has, registering that type's compacted classes on first lookup.

    Registering all of them at import would import every model module transformers ships (tens of
    seconds); a compacted model of a recognised layout names its type in its config, so the lookup
    that reads it is where the classes are needed.
    """

    def __contains__(self, key: object) -> bool:
        return super().__contains__(key) or self._register(key)

    def __getitem__(self, key: str):
        if not super().__contains__(key):
            self._register(key)
        return super().__getitem__(key)

    def _register(self, key: object) -> bool:
        base = key[len(TYPE_PREFIX) :] if isinstance(key, str) and key.startswith(TYPE_PREFIX) else None
        if not base or base.startswith(TYPE_PREFIX) or base not in CONFIG_MAPPING:
            return False
        register_auto_classes([base])
        return super().__contains__(key)


def _register_on_demand() -> None:
    registered = getattr(CONFIG_MAPPING, "_extra_content", None)
    if type(registered) is dict:  # a transformers release that keeps them elsewhere gets the table's types only
        CONFIG_MAPPING._extra_content = _CompactedTypesOnDemand(registered)
