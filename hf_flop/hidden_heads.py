"""Residual channels and attention heads pruned together, into a stock config.

Stock configs such as Llama's require ``hidden_size % num_attention_heads == 0``, even when they
state ``head_dim``. Under ``FlopConfig(uniform_shapes=True)`` the kept head count is one number for
the whole model, and the removal order that prunes every other unit decides it, so the kept channel
count must be a multiple of whichever head count the order ends at. A head unit is a KV group (one
query head without grouped-query attention), so the order can end at ``g * k`` query heads for any
``k`` KV groups, ``g`` query heads per group.

The channel gate therefore keeps a multiple of the least common multiple of all those head counts
(SmolLM2's 9 heads in groups of 3: 3, 6 or 9 heads, a multiple of 18 channels). Where that multiple
is too coarse (more than ``1 / COARSEST`` of the channels: 32 heads in groups of 4 give
lcm(4, 8, ..., 32) = 3360), the head level may end only at counts that divide the model's head
count (4, 8, 16 or 32 heads), whose common multiple is the head count itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import lcm

from .architectures import arch_spec, base_model_type

COARSEST = 8  # the channel multiple stays at most this fraction (1 / COARSEST) of the channels


@dataclass(frozen=True)
class HeadChannelPlan:
    """How kept channels and kept heads stay compatible in a stock config."""

    multiple: int  # the kept channel count is rounded up to a multiple of this
    head_units: tuple[int, ...] | None  # KV-group counts the head level may end at; None: any


def head_channel_plan(model_config, levels) -> HeadChannelPlan:
    """The plan for a model's config under uniform shapes with level ``hidden`` and ``levels``."""
    spec = arch_spec(base_model_type(model_config.model_type))
    heads = int(getattr(model_config, spec.heads_attr))
    if "head" not in levels:
        return HeadChannelPlan(heads, None)
    kv_heads = _kv_heads(model_config, spec, heads)
    group = heads // kv_heads
    every = lcm(*(group * k for k in range(1, kv_heads + 1)))
    if every * COARSEST <= int(getattr(model_config, spec.hidden_attr)):
        return HeadChannelPlan(every, None)
    return HeadChannelPlan(heads, tuple(k for k in range(1, kv_heads + 1) if heads % (group * k) == 0))


def allowed_kept_counts(flop_model) -> dict[str, tuple[int, ...]]:
    """Per level, the kept unit counts a uniform removal may end at ({} when every count will do)."""
    config = flop_model.flop_config
    if not (config.uniform_shapes and "hidden" in config.levels and "head" in config.levels):
        return {}
    plan = head_channel_plan(flop_model.model.config, config.levels)
    return {} if plan.head_units is None else {"head": plan.head_units}


def _kv_heads(model_config, spec, heads: int) -> int:
    """KV heads as the config states them (none stated, or no such field: one per query head)."""
    stated = getattr(model_config, spec.kv_heads_attr, None) if spec.kv_heads_attr else None
    return int(stated or heads)
