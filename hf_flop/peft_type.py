"""The ``PeftType.FLOP`` member that PEFT's closed enum lacks.

PEFT has no open registry for methods that live outside its code base: ``register_peft_method``
insists on a ``PeftType`` member, and ``PeftType`` is a closed ``enum``. We add the member with
enum's own bookkeeping (``_member_map_``, ``_value2member_map_``, ``_member_names_``); the step is
idempotent. ``tests/test_peft_integration.py`` checks every PEFT entry point we rely on, so a PEFT
release that changes them fails loudly there.
"""

from __future__ import annotations

from peft.utils import PeftType

PEFT_NAME = "flop"


def flop_peft_type() -> PeftType:
    """The ``PeftType.FLOP`` member, created on first use."""
    key = PEFT_NAME.upper()
    if key in PeftType.__members__:
        return PeftType[key]
    member = str.__new__(PeftType, key)
    member._name_ = key
    member._value_ = key
    member._sort_order_ = len(PeftType._member_names_)
    member.__objclass__ = PeftType
    type.__setattr__(PeftType, key, member)
    PeftType._member_map_[key] = member
    PeftType._value2member_map_[key] = member
    PeftType._member_names_.append(key)
    return member
