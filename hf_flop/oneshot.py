"""One-shot pruning from importance scores, and warm starts of the gates for ``PruningTrainer``.

``prune_oneshot`` scores every gated unit, then closes the least important ones, in score order,
until the deterministic kept count (``sparsity_report(model).deterministic_kept_params``,
exactly what compaction writes) is as close to the budget ``(1 - target_sparsity) * prunable`` as
units allow. That count is not linear in the units (per layer ``min(r'(in' + out'), in' out')``,
rounding to ``round_to``), but it never grows when a unit is removed, so the number of units to
remove along the score order is found by bisection on the true count. Under
``FlopConfig(uniform_shapes=True)`` the same search runs over uniform slices (``hf_flop.uniform``),
so every layer keeps the same heads and FFN width.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from peft import PeftModel
from torch import nn

from .accounting import sparsity_report
from .calibration import reusable_batches
from .config import FlopConfig
from .gated import GatedUnits
from .hidden import hidden_channels
from .hidden_cuts import compensate_norms
from .lookup import find_flop_model
from .model import check_flop_config, get_flop_model
from .ranking import check_scores, keep_masks, removal_order, removal_path
from .reconstruction import reconstruct as reconstruct_layers
from .scores import SCORE_TYPES, compute_scores, find_gated_units, recommended_oneshot_score, score_type
from .uniform import uneven_levels


@dataclass
class OneShotResult:
    """What ``prune_to_target`` did. ``abs(kept_params - budget) <= step / 2`` by construction."""

    keep: dict[str, torch.Tensor]  # gate name -> bool mask of the kept units
    kept_params: int  # deterministic kept prunable parameters
    budget: float  # (1 - target_sparsity) * prunable parameters
    step: int  # parameters the boundary unit (or uniform slice) is worth: the granularity around the budget
    deterministic_sparsity: float
    target_sparsity: float


# --- setting gates ----------------------------------------------------------------------------------


def _set_all(units: list[GatedUnits], keep: dict[str, torch.Tensor]) -> None:
    for s in units:
        s.gate.set_mask(keep[s.key])


def open_all_gates(model: nn.Module) -> None:
    """Open every gate of a FLOP model: eval mode then computes the dense model (up to float rounding)."""
    for s in find_gated_units(model):
        s.gate.set_mask(torch.ones(s.n_units, dtype=torch.bool))


# --- pruning to a target ---------------------------------------------------------------------------


def prune_to_target(
    model: nn.Module,
    scores: dict[str, torch.Tensor],
    target_sparsity: float | None = None,
    *,
    ranking: str = "per_gate",
    min_units_per_gate: int = 1,
    refinements: int = 3,
    protect_layers: Sequence[int] = (),
) -> OneShotResult:
    """Close the least important units to hit ``target_sparsity`` (default: the model's config).

    Units are removed in ``ranking`` order (``"per_gate"``: score relative to its gate's mean;
    ``"per_parameter"``: score per parameter; ``"absolute"``: the score itself; see ``priorities``)
    until the deterministic kept count is as close to the budget as one unit allows:
    ``|kept - budget| <= step / 2``, ``step`` being what the unit at the boundary is worth (at most
    one unit's parameters, times ``round_to`` where that rounding applies). When that unit is coarse
    (a head among rank components and rows), up to ``refinements`` times it is kept instead and the
    next, finer units fill the gap; the closest result wins. Rank components closed in a layer that
    still compacts to a dense matrix save nothing, so they are opened again (the count does not
    change). ``min_units_per_gate`` units with the highest scores stay open in every gate, and every
    unit in the transformer layers ``protect_layers`` (indices, e.g. ``(0, -1)`` for the first and
    the last). The gates are left set; the result says what was done.

    Under ``FlopConfig(uniform_shapes=True)`` units go in uniform slices instead
    (``hf_flop.uniform.uniform_slices``): one unit of a level (a head or KV group; ``round_to`` FFN rows)
    in every layer at once, the slice of lower mean priority first, each layer keeping its top-scored
    units. ``step`` is then the boundary slice, and a refinement keeps that slice and stops cutting
    its level. Every layer ends with the same heads and FFN width, at least one of each.
    """
    flop_model = find_flop_model(model)
    target = flop_model.flop_config.target_sparsity if target_sparsity is None else target_sparsity
    if not isinstance(target, (int, float)) or not 0.0 <= target < 1.0:
        raise ValueError(f"target_sparsity={target!r} must be in [0, 1), the fraction of prunable parameters removed.")
    if not isinstance(min_units_per_gate, int) or min_units_per_gate < 0:
        raise ValueError(f"min_units_per_gate={min_units_per_gate!r} must be a non-negative integer.")
    if not isinstance(refinements, int) or refinements < 0:
        raise ValueError(f"refinements={refinements!r} must be a non-negative integer.")
    units = find_gated_units(flop_model)
    checked = check_scores(units, scores)
    path = removal_path(flop_model, units, checked, ranking, min_units_per_gate, protect_layers)

    def kept_with(removed: torch.Tensor) -> int:  # deterministic kept parameters with these units removed
        _set_all(units, keep_masks(units, removed))
        return sparsity_report(flop_model).deterministic_kept_params

    prunable = sparsity_report(flop_model).prunable_params
    budget = (1.0 - target) * prunable
    floor = kept_with(path.order)
    if floor > budget:
        raise ValueError(
            f"target_sparsity={target} cannot be reached: removing every candidate unit leaves sparsity "
            f"{1.0 - floor / prunable:.4f} (levels {flop_model.flop_config.levels}, min_units_per_gate="
            f"{min_units_per_gate}, protect_layers={list(protect_layers)}). Lower the target, add levels, or lower "
            "min_units_per_gate or protect fewer layers."
        )
    best = None  # (distance to the budget, removed units, step)
    for _ in range(1 + refinements):
        kept = functools.cache(lambda k, p=path: kept_with(p.removed(k)))
        if kept(len(path)) > budget:
            break
        lo, hi = 0, len(path)  # the fewest steps hi with kept(hi) <= budget, by bisection
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if kept(mid) <= budget else (mid + 1, hi)
        step = kept(hi - 1) - kept(hi) if hi > 0 else 0
        k = hi - 1 if hi > 0 and kept(hi - 1) - budget < budget - kept(hi) else hi  # ties: sparser side
        if best is None or abs(kept(k) - budget) < best[0]:
            best = (abs(kept(k) - budget), path.removed(k), step)
        if hi == 0 or best[0] == 0:
            break
        # the boundary step may be coarse (a head): keep it, and let the finer steps after it fill the gap
        path = path.without(hi - 1)
    _, removed, step = best
    keep = keep_masks(units, removed)
    kept_params = kept_with(removed)
    modules = sparsity_report(flop_model).modules
    for s in units:
        if s.entry is not None and not modules[s.entry].factorized_after_compaction:
            keep[s.key] = torch.ones_like(keep[s.key])
    _set_all(units, keep)
    report = sparsity_report(flop_model)
    for s in units:  # the gates must now say exactly what the plan says
        if not torch.equal(s.gate.deterministic_mask().detach().cpu() != 0, keep[s.key]):
            raise RuntimeError(f"gate '{s.key}' did not take its one-shot mask; its settings cannot express it.")
    if report.deterministic_kept_params != kept_params:
        raise RuntimeError("re-opening rank components of dense layers changed the count; please report this.")
    config = flop_model.flop_config
    uneven = uneven_levels(flop_model.structure_groups, flop_model.flop_structure_gates, config.round_to)
    if config.uniform_shapes and uneven:
        raise RuntimeError(f"uniform pruning left different counts per layer {uneven}; please report this.")
    return OneShotResult(
        keep=keep,
        kept_params=report.deterministic_kept_params,
        budget=budget,
        step=step,
        deterministic_sparsity=report.deterministic_sparsity,
        target_sparsity=target,
    )


def gate_order_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """Scores (for ``ranking="absolute"``) that order every unit of the model as its trained gates do.

    Units the eval mask keeps rank above the ones it drops; within each side, by the gates'
    ``keep_strength`` (hard-concrete ``log_alpha``, top-k scores). The score is the unit's position
    in that order (0 = the first to remove), so pruning to the eval mask's own size reproduces the
    eval mask, and a different size only moves the units at the edge: the least firmly kept close
    first, the least firmly dropped reopen first.
    """
    units = find_gated_units(model)
    with torch.no_grad():
        kept = torch.cat([(s.gate.deterministic_mask().detach() != 0).cpu() for s in units])
        strength = torch.cat([s.gate.keep_strength().detach().double().cpu() for s in units])
    order = torch.argsort(strength, stable=True)
    order = order[torch.argsort(kept[order].to(torch.int8), stable=True)]  # then kept above dropped
    position = torch.empty(len(order), dtype=torch.float64)
    position[order] = torch.arange(len(order), dtype=torch.float64)
    return {s.key: p for s, p in zip(units, position.split([s.n_units for s in units]))}


def fix_masks_at_target(model: nn.Module, target_sparsity: float | None = None) -> OneShotResult:
    """Set every eval mask so the model is exactly at ``target_sparsity`` (default: the config's), as trained.

    After training, the eval masks end near the target but rarely on it (undecided gates, whole units).
    This ranks every unit by its gate (``gate_order_scores``) and closes units in that order with
    ``prune_to_target``: within half a unit of the target, the trained masks changed only at the edge.
    No unit is protected (a gate the training closed entirely stays closed). The gates are left set
    with ``set_mask``: kept units fully open (their soft eval values become 1), the rest closed.
    Under ``FlopConfig(uniform_shapes=True)`` the units go in uniform slices (see ``prune_to_target``):
    every layer then keeps the same number of units of each level, its most firmly kept ones (at
    least one: a gate the training closed entirely gets its most firmly kept unit back).
    """
    return prune_to_target(model, gate_order_scores(model), target_sparsity, ranking="absolute", min_units_per_gate=0)


def _pruning_config(model: nn.Module, config: FlopConfig | None) -> tuple[FlopConfig, bool]:
    """The FlopConfig ``prune_oneshot`` prunes with, and whether FLOP must be injected first (checked, model untouched)."""
    try:
        flop_model = find_flop_model(model)
    except ValueError:
        flop_model = None
    if flop_model is not None:
        if config is not None and config is not flop_model.flop_config:
            raise ValueError(
                "this model already has FLOP layers; pass config=None (its own FlopConfig is used) and "
                "target_sparsity=... to change the target."
            )
        return flop_model.flop_config, False
    if config is None:
        raise ValueError(
            f"{type(model).__name__} has no FLOP layers yet; pass a FlopConfig to inject them, "
            "e.g. prune_oneshot(model, FlopConfig(levels=['rank'], target_sparsity=0.5), data)."
        )
    if not isinstance(config, FlopConfig):
        raise TypeError(f"config must be a FlopConfig or None, got {type(config).__name__}.")
    if isinstance(model, PeftModel):
        raise ValueError("this PeftModel holds another PEFT method; pass the plain transformers model.")
    return config, True


def _with_target(config: FlopConfig, target_sparsity: float) -> FlopConfig:
    checked = copy.copy(config)
    checked.target_sparsity = target_sparsity
    return checked


def prune_oneshot(
    model: nn.Module,
    config: FlopConfig | None = None,
    calibration_data: Iterable | None = None,
    score: str | None = None,
    *,
    target_sparsity: float | None = None,
    max_batches: int | None = None,
    ema_decay: float | None = None,
    ranking: str = "per_gate",
    min_units_per_gate: int = 1,
    protect_layers: Sequence[int] = (),
    reconstruct: bool = True,
    reconstruct_options: dict | None = None,
) -> nn.Module:
    """Prune with no training: score every gated unit, close the least important to hit the target, refit.

    ``model`` is a plain transformers model (FLOP is injected in place with ``config``; the result is
    a ``PeftModel``) or a model that already has FLOP layers (``config=None``). Any previous gate state
    is replaced: all gates are opened, the dense model is scored with ``score`` (``"magnitude"``,
    ``"activation"``, ``"obs"``, ``"sensitivity"``, ...; see ``hf_flop.scores``; default None: the
    recommended score, ``recommended_oneshot_score(config)``, ``"obs"`` or with uniform shapes
    ``"activation"``) over ``calibration_data`` (an iterable of dicts of tensors with ``input_ids``,
    plus ``labels`` for sensitivity and fisher; at most ``max_batches`` of them; only
    ``"magnitude"`` needs none), then ``prune_to_target`` closes units until
    ``sparsity_report(model).deterministic_sparsity`` is ``target_sparsity`` (default: the config's)
    to within half a unit's parameters (``ranking`` and ``protect_layers`` are explained there).
    With ``reconstruct`` (the default) the kept weights are then refit layer by layer on the same
    calibration data (``hf_flop.reconstruct``; ``reconstruct_options`` are its keyword arguments), after
    level ``"hidden"``'s norm compensation (``hf_flop.hidden_cuts.compensate_norms``);
    without calibration data there is nothing to refit on, and a warning says so. The model comes back in
    the mode it came in (``model.training``); ``hf_flop.compact(model)`` then writes the smaller model.
    """
    training = model.training  # scoring and the refit switch modes; the caller's is restored at the end
    flop_config, inject = _pruning_config(model, config)
    if score is None:
        score = recommended_oneshot_score(flop_config)
        if calibration_data is None and SCORE_TYPES[score].needs_data:
            raise ValueError(
                f"prune_oneshot scores with the recommended {score!r} by default (hf_flop.scores."
                "recommended_oneshot_score), which needs calibration_data: pass calibration batches (dicts of tensors "
                "with 'input_ids'), or score='magnitude', which needs none."
            )
    score_type(score, calibration_data)  # a known score, with the data it needs; checked before injecting
    if inject and target_sparsity is not None:  # the levels' checks of this target (MoE: top-k experts), before any work
        check_flop_config(model, _with_target(flop_config, target_sparsity))
    calibration_data = reusable_batches(calibration_data)  # read twice: by the scores and by the refit
    if inject:
        model = get_flop_model(model, flop_config)
    open_all_gates(model)
    scores = compute_scores(model, calibration_data, score, max_batches=max_batches, ema_decay=ema_decay)
    prune_to_target(
        model,
        scores,
        target_sparsity,
        ranking=ranking,
        min_units_per_gate=min_units_per_gate,
        protect_layers=protect_layers,
    )
    if reconstruct and calibration_data is None:
        warnings.warn(
            "prune_oneshot: no calibration_data, so the kept weights are not refit (reconstruct=True needs "
            "data); pass calibration batches for a better model, or reconstruct=False to silence this.",
            stacklevel=2,
        )
    elif reconstruct:
        if hidden_channels(find_flop_model(model)) is not None:  # level "hidden": the norms over fewer channels keep their scale
            compensate_norms(model, calibration_data, max_batches=max_batches)
        reconstruct_layers(model, calibration_data, max_batches=max_batches, **(reconstruct_options or {}))
    return model.train(training)


@torch.no_grad()
def warm_start_gates(
    model: nn.Module,
    scores: dict[str, torch.Tensor],
    *,
    low: float = 3.0,
    high: float | None = None,
    ranking: str = "per_gate",
    dense_start: bool = True,
) -> None:
    """Initialise the gates from scores before ``PruningTrainer``: more important units start more open.

    Every unit is ranked over the whole model, in ``ranking`` order (see ``prune_to_target``); its
    quantile ``q`` in [0, 1] sets a hard-concrete gate to
    ``log_alpha = low + (high - low) * q`` (``high`` defaults to ``FlopConfig.init_log_alpha`` or, when
    that is None, to the largest dense-start value ``gates.open_log_alpha`` among the gates), and
    a top-k gate's ``scores`` to ``q``. Under the trainer's sparsity pressure the gates with small
    ``log_alpha`` close first, because ``P(z != 0)`` moves fastest there.

    ``low=3.0`` puts every unit's stretched eval value at 1 (default temperature and stretch), but the
    eval mask also zeroes ``round(sum(1 - P(z != 0)))`` units per gate, which a gate with thousands of
    units reaches. With ``dense_start=True`` each such gate is lifted as a whole (its order kept) just
    enough that nothing is zeroed, so training starts from the dense model.
    """
    flop_model = find_flop_model(model)
    units = find_gated_units(flop_model)
    if high is None:  # the configured init, else the largest dense-start value of the gates (one for all)
        high = flop_model.flop_config.init_log_alpha
        ceilings = [s.gate.warm_start_ceiling() for s in units]
        high = max((c for c in ceilings if c is not None), default=low) if high is None else high
    if not low <= high:
        raise ValueError(f"warm_start_gates needs low <= high, got low={low}, high={high}.")
    order = removal_order(units, check_scores(units, scores), ranking)
    flat = torch.empty(len(order))
    flat[order] = torch.linspace(0.0, 1.0, len(order)) if len(order) > 1 else torch.ones(len(order))
    for s, q in zip(units, flat.split([s.n_units for s in units])):
        s.gate.warm_start(q, low=low, high=high, dense_start=dense_start)
