"""Uniform shapes (``FlopConfig(uniform_shapes=True)``): the same heads and FFN width in every layer.

A stock transformers config holds one head count, one KV-head count and one FFN width for all its
layers. A model pruned to shapes like that compacts to the stock class with a stock config, which
every engine reads (transformers without remote code, and the converters and servers built on the
stock configs). Three pieces make it so:

* ``check_uniform_shapes``: before injection, what the architecture and the targets must allow
  (a stock config that states the head size, for heads; a head/row gate in every layer);
* ``uniform_slices``: the order in which one-shot pruning and ``fix_masks_at_target`` remove units,
  one *slice* at a time: the same number of units of one level in every layer
  (``hf_flop.oneshot.prune_to_target`` removes whole slices only);
* ``uneven_levels``: which levels' kept counts differ between layers (compaction refuses those).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
from torch import nn

from .architectures import ARCHITECTURES, arch_spec
from .config import FlopConfig
from .gated import GatedUnits
from .groups import ROUNDED_LEVELS, StructureGroup, structure_groups


def check_uniform_shapes(model: nn.Module, config: FlopConfig, targets: list[str]) -> None:
    """Raise ``ValueError`` when ``config.uniform_shapes`` cannot give ``model`` stock shapes.

    ``targets`` are the module names injection would replace. Nothing to check without ``uniform_shapes``.
    """
    if not config.uniform_shapes:
        return
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = arch_spec(model_type)
    if {"head", "query_head"} & set(config.levels) and not spec.stock_head_pruning:
        able = sorted(name for name, s in ARCHITECTURES.items() if s.stock_head_pruning)
        raise ValueError(
            f"FlopConfig(uniform_shapes=True) cannot prune heads of model_type={model_type!r}: its stock config "
            f"derives the head size as {spec.hidden_attr} / {spec.heads_attr}, so no stock config describes fewer "
            f"heads of the same size (those that state it: {able}). Use levels=['row'] (the FFN width) with "
            "uniform_shapes=True, or uniform_shapes=False to prune heads too (the compacted model then loads "
            "with its saved remote code)."
        )
    if getattr(model.config, "flop_plan", None):
        raise ValueError(
            "FlopConfig(uniform_shapes=True) needs a model with stock shapes, but this one was compacted to "
            "shapes only hf_flop's plan describes (its config has a flop_plan). Prune the original model with "
            "uniform_shapes=True instead."
        )
    targeted = set(targets)
    ungated = [
        group.layer
        for group in structure_groups(model, spec, set(config.levels))
        if not {group.consumer, *(seg.module for seg in group.producers)} <= targeted
    ]
    if ungated:
        raise ValueError(
            f"FlopConfig(uniform_shapes=True) needs {'/'.join(config.levels)} gates in every transformer layer, "
            f"but target_modules / exclude_modules leave {ungated[:3]}{' ...' if len(ungated) > 3 else ''} "
            "without them (a gate needs its layer's attention or FFN projections all targeted). Target "
            "every layer, or set uniform_shapes=False."
        )


def uniform_counts(n_units: int, step: int, floor: int) -> list[int]:
    """Kept counts one level may take in every layer, from ``n_units`` down: ``n_units`` itself, then
    the multiples of ``step`` below it that are at least ``floor`` (and at least 1)."""
    largest = (n_units - 1) // step * step
    return [n_units, *range(largest, max(floor, 1) - 1, -step)]


def uniform_slices(
    units: list[GatedUnits],
    priority: torch.Tensor,
    round_to: int,
    min_count: int = 1,
    allowed: Mapping[str, Collection[int]] | None = None,
) -> list[tuple[str, torch.Tensor]]:
    """Every removable unit in uniform slices, in removal order: ``[(level, flat unit ids), ...]``.

    ``units`` are head/row gates (one per transformer layer and level) and ``priority`` their units'
    removal priorities, flat in the order of ``units`` (lower: removed earlier). A slice of a level
    takes, from every gate of that level, its lowest-priority units down to the next count of
    ``uniform_counts`` (one unit fewer, or ``GatedUnits.step`` fewer; for rounded levels the next multiple of
    ``round_to``), never
    below ``min_count``, and for a level in ``allowed`` only at the counts it lists (the slice then takes
    every unit down to the next of them). The levels' slices are merged greedily: next comes the slice whose units have
    the lowest mean priority, the rule by which non-uniform pruning picks its next unit, applied to
    slices (ties: the level met first in ``units``). Removing any prefix of the result leaves every
    layer with the same count of each level, and the units each layer keeps are its top-priority ones.
    """
    offsets = [0]
    for s in units:
        offsets.append(offsets[-1] + s.n_units)
    queues: dict[str, list[torch.Tensor]] = {}
    for level in dict.fromkeys(s.level for s in units):
        gates = [(offsets[i], s) for i, s in enumerate(units) if s.level == level]
        sizes = sorted({s.n_units for _, s in gates})
        if len(sizes) > 1:
            raise ValueError(
                f"uniform shapes need every layer to start with the same {level} count; this model has {sizes}."
            )
        n = sizes[0]
        floor = max(min_count, *(getattr(s, "min_kept", 0) for _, s in gates))  # a MoE layer keeps its top-k experts
        step = round_to if level in ROUNDED_LEVELS else max(getattr(s, "step", 1) for _, s in gates)
        counts = uniform_counts(n, step, floor)
        if allowed and level in allowed:
            counts = [c for c in counts if c == n or c in allowed[level]]
        ascending = [start + torch.argsort(priority[start : start + n], stable=True) for start, _ in gates]
        queues[level] = [torch.cat([a[n - hi : n - lo] for a in ascending]) for hi, lo in zip(counts, counts[1:])]
    slices = []
    while any(queues.values()):
        level = min((lv for lv, queue in queues.items() if queue), key=lambda lv: float(priority[queues[lv][0]].mean()))
        slices.append((level, queues[level].pop(0)))
    return slices


def uneven_levels(groups: list[StructureGroup], gates, round_to: int) -> dict[str, list[int]]:
    """Per level whose compacted unit count (KV groups, FFN rows) differs between layers, its sorted counts."""
    counts: dict[str, set[int]] = {}
    for group in groups:
        counts.setdefault(group.level, set()).add(int(group.kept_units(gates[group.key], True, round_to)))
    return {level: sorted(found) for level, found in counts.items() if len(found) > 1}
