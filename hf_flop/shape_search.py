"""``search_shape``: choose the mix of width, depth, heads and rows that reaches a size, by measurement.

A target size can be reached by many mixes: fewer residual channels (level ``"hidden"``), fewer
layers (level ``"layer"``), fewer heads and FFN rows. Each candidate (``ShapeMix``) fixes the coarse
part, ``hidden_fraction`` of the channels and ``layers`` depth units, each gate's lowest-scored
units; the finer levels then fill the rest of the one parameter budget of the searched
``FlopConfig`` (``prune_to_target`` along their own ranking), so every candidate ends at the same
size, within one unit. Each is pruned one-shot on a copy of the model (scores of the dense model,
norm compensation, the layer-by-layer refit), optionally distilled for a few steps, and scored by its
calibration loss on held-out batches. The lowest loss wins (ties: the first tried).

Everything runs on copies: the model passed in changes only with ``apply=True``, which prunes it in
place with the chosen mix (the same steps, the same scores, so the same masks and weights).
Deterministic: the held-out split comes from ``ShapeSearchConfig.seed``, and the scores and the refit
have no randomness.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from .accounting import sparsity_report
from .calibration import eval_mode, iter_calibration, model_device
from .config import FlopConfig
from .gated import GatedUnits
from .hidden import hidden_channels
from .hidden_cuts import compensate_norms
from .lookup import find_flop_model
from .model import get_flop_model
from .oneshot import OneShotResult, _pruning_config, open_all_gates, prune_to_target
from .ranking import check_scores, priorities, protected_layers
from .reconstruction import reconstruct
from .scores import compute_scores, find_gated_units, recommended_oneshot_score, score_type
from .shape_distill import distill
from .shape_options import MIX_LEVELS, ShapeCandidate, ShapeMix, ShapeSearchConfig, ShapeSearchResult

# the searched levels when only a target is given: every level a search can mix
DEFAULT_LEVELS = ("head", "row", "hidden", "layer")
# a priority beyond any ranking's: the mix's removed units go first, its kept ones after every finer unit
_FIRST = 1e30


def search_shape(
    model: nn.Module,
    config_or_target: FlopConfig | float | None,
    calibration_data: Iterable,
    candidates: Iterable[ShapeMix] | None = None,
    options: ShapeSearchConfig | None = None,
    *,
    apply: bool = False,
) -> ShapeSearchResult:
    """Try mixes of levels at one size, each one-shot pruned and refit on a copy; return them all and the best.

    ``model`` is a plain transformers model with ``config_or_target`` a ``FlopConfig`` (its levels are
    what the search mixes, its ``target_sparsity`` the size) or a number (the target, with levels
    head, row, hidden and layer), or a model with FLOP layers and ``config_or_target`` None (its
    config) or a number (another target). The size is counted as ``sparsity_report`` counts for that
    config: with level ``"hidden"`` the embeddings and norms are prunable too, so removing channels
    also shrinks them. ``calibration_data``: batches (dicts of tensors with ``input_ids`` and
    ``labels``, at least three): a seeded ``options.heldout`` share scores the candidates, the rest
    scores the units and refits. ``candidates``: the mixes to try (default: every pair of
    ``options.hidden_fractions`` and ``options.layer_fractions`` the levels allow, those that cannot
    reach the target left out, in ``result.skipped``). With ``apply=True`` the model itself is pruned
    with the best mix (``result.model``; a plain model is injected in place, as ``prune_oneshot`` does).
    Bad inputs (an impossible target, a mix whose level the config lacks, no candidate, batches without
    labels) are refused before the model runs on any batch.
    """
    options = ShapeSearchConfig() if options is None else options
    if not isinstance(options, ShapeSearchConfig):
        raise TypeError(f"options must be a ShapeSearchConfig or None, got {type(options).__name__}.")
    config, target = _config_and_target(model, config_or_target)
    score = options.score or recommended_oneshot_score(config)
    score_type(score, calibration_data)
    explicit = None if candidates is None else _checked_mixes(candidates)
    fit, heldout = _split(calibration_data, options)
    base, inject = _dense_copy(model, config)
    units = find_gated_units(base)
    mixes = explicit or _grid(base, units, options)
    feasible, skipped = _feasible(base, units, mixes, target, options, explicit is not None)
    training = model.training
    scores = compute_scores(base, fit, score)
    tried = []
    for mix in feasible:
        candidate = copy.deepcopy(base)
        outcome = _prune_to_mix(candidate, scores, mix, target, options)
        if isinstance(outcome, str):  # the real scores moved the boundary past the mix (rare): say so, go on
            skipped.append(_skip(mix, outcome))
            continue
        refit = _refit(candidate, fit, mix, options)
        if options.distill_steps:
            distill(candidate, base, fit, options.distill_steps, options.distill_learning_rate, options.seed)
        tried.append(_candidate(candidate, mix, outcome, heldout_loss(candidate, heldout), refit))
        del candidate
    if not tried:
        raise ValueError(f"no candidate reached target_sparsity={target}: {[s['reason'] for s in skipped]}")
    best = min(range(len(tried)), key=lambda i: (tried[i].loss, i))
    prunable = sparsity_report(base).prunable_params
    result = ShapeSearchResult(
        target_sparsity=target,
        prunable_params=prunable,
        budget=(1.0 - target) * prunable,
        score=score,
        candidates=tried,
        best_index=best,
        skipped=skipped,
    )
    del base
    if apply:
        pruned = get_flop_model(model, config) if inject else model
        open_all_gates(pruned)
        _prune_to_mix(pruned, scores, tried[best].mix, target, options)
        _refit(pruned, fit, tried[best].mix, options)
        result.model = pruned.train(training)
    return result


# --- inputs --------------------------------------------------------------------------------------------


def _config_and_target(model: nn.Module, config_or_target) -> tuple[FlopConfig, float]:
    """The FlopConfig searched (checked against the model's FLOP state) and the target sparsity."""
    if config_or_target is None or isinstance(config_or_target, FlopConfig):
        config, _ = _pruning_config(model, config_or_target)
        target = config.target_sparsity
    elif isinstance(config_or_target, (int, float)) and not isinstance(config_or_target, bool):
        target = float(config_or_target)
        try:
            config = find_flop_model(model).flop_config
        except ValueError:  # a plain model and a number: the levels a search mixes
            config = FlopConfig(levels=list(DEFAULT_LEVELS), target_sparsity=min(max(target, 0.0), 0.99))
    else:
        raise TypeError(
            f"config_or_target must be a FlopConfig, a target sparsity in (0, 1) or None, got "
            f"{type(config_or_target).__name__}."
        )
    if not 0.0 < target < 1.0:
        raise ValueError(f"target_sparsity={target!r} must be in (0, 1): the fraction of prunable parameters removed.")
    if not [level for level in config.levels if level not in MIX_LEVELS]:
        raise ValueError(
            f"search_shape fixes the share of levels {list(MIX_LEVELS)} per candidate and lets a finer level reach the "
            f"target, but FlopConfig.levels={config.levels} has none; add 'head' and/or 'row'."
        )
    return config, target


def _checked_mixes(candidates: Iterable[ShapeMix]) -> list[ShapeMix]:
    mixes = list(candidates)
    if not mixes:
        raise ValueError("candidates is empty; give at least one ShapeMix, or None for the default grid.")
    wrong = [m for m in mixes if not isinstance(m, ShapeMix)]
    if wrong:
        raise TypeError(f"candidates must be ShapeMix objects, got {type(wrong[0]).__name__}: e.g. ShapeMix(0.25, 2).")
    return list(dict.fromkeys(mixes))


def _split(calibration_data: Iterable, options: ShapeSearchConfig) -> tuple[list[dict], list[dict]]:
    """The batches (checked: held-out ones need labels), in a seeded order, split into fit and held-out."""
    batches = list(iter_calibration(calibration_data, max_batches=options.max_batches))
    n_heldout = max(1, round(options.heldout * len(batches)))
    if len(batches) - n_heldout < 2:
        raise ValueError(
            f"search_shape needs at least 2 calibration batches to score and refit on and {n_heldout} held out "
            f"(ShapeSearchConfig.heldout={options.heldout}), got {len(batches)}; split the data into more, smaller "
            "batches."
        )
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(options.seed)).tolist()
    fit, heldout = [batches[i] for i in order[:-n_heldout]], [batches[i] for i in order[-n_heldout:]]
    list(iter_calibration(heldout, needs_labels="search_shape's held-out loss (for a causal LM, labels=input_ids)"))
    return fit, heldout


def _dense_copy(model: nn.Module, config: FlopConfig) -> tuple[nn.Module, bool]:
    """A copy of the model with FLOP layers (injected into the copy if need be), every gate open, in eval mode."""
    try:
        find_flop_model(model)
        inject = False
    except ValueError:
        inject = True
    base = copy.deepcopy(model)
    if inject:
        base = get_flop_model(base, config)
    open_all_gates(base)
    return base.eval(), inject


# --- candidates ----------------------------------------------------------------------------------------


def _mix_gate(units: list[GatedUnits], level: str) -> GatedUnits | None:
    return next((s for s in units if s.level == level), None)


def _free_depth_units(flop_model, depth: GatedUnits, options: ShapeSearchConfig) -> torch.Tensor:
    """Bool per depth unit: not in a protected layer."""
    protected = protected_layers(flop_model, options.protect_layers)
    return torch.tensor([layer not in protected for layer in depth.unit_layers or ()], dtype=torch.bool)


def _grid(base: nn.Module, units: list[GatedUnits], options: ShapeSearchConfig) -> list[ShapeMix]:
    """Every pair of the options' hidden and layer fractions the model's levels allow, once per distinct mix."""
    hidden, depth = _mix_gate(units, "hidden"), _mix_gate(units, "layer")
    fractions = options.hidden_fractions if hidden is not None else (0.0,)
    counts = [0]
    if depth is not None:
        free = int(_free_depth_units(find_flop_model(base), depth, options).sum())
        counts = [round(f * free) for f in options.layer_fractions]
    return list(dict.fromkeys(ShapeMix(float(h), int(n)) for n in counts for h in fractions))


def _forced(flop_model, units: list[GatedUnits], scores: dict, mix: ShapeMix, options: ShapeSearchConfig) -> dict:
    """Per gate of a mix level, the bool mask of the units the mix removes: the lowest-scored ones."""
    forced = {}
    hidden, depth = _mix_gate(units, "hidden"), _mix_gate(units, "layer")
    if hidden is not None:
        n = round(mix.hidden_fraction * hidden.n_units / hidden.step) * hidden.step
        forced[hidden.key] = _lowest(scores[hidden.key], n, torch.ones(hidden.n_units, dtype=torch.bool))
    if depth is not None:
        forced[depth.key] = _lowest(scores[depth.key], mix.layers, _free_depth_units(flop_model, depth, options))
    return forced


def _lowest(score: torch.Tensor, n: int, free: torch.Tensor) -> torch.Tensor:
    order = [int(i) for i in torch.argsort(score, stable=True) if free[i]][:n]
    removed = torch.zeros(len(score), dtype=torch.bool)
    removed[order] = True
    return removed


def _check_mix(units: list[GatedUnits], mix: ShapeMix, free_depth: int | None) -> str | None:
    """Why the model's levels cannot take ``mix`` (None: they can)."""
    if mix.hidden_fraction and _mix_gate(units, "hidden") is None:
        return f"{mix} removes residual channels, but the searched FlopConfig.levels lack 'hidden'"
    if mix.layers and free_depth is None:
        return f"{mix} removes layers, but the searched FlopConfig.levels lack 'layer'"
    if mix.layers and (mix.layers > free_depth or mix.layers >= _depth_units(units)):
        return f"{mix} removes {mix.layers} depth units; {free_depth} can go and at least one must stay"
    return None


def _skip(mix: ShapeMix, reason: str) -> dict:
    """A mix left out, and why, as a JSON-ready entry of ``ShapeSearchResult.skipped``."""
    return {
        "mix": {"hidden_fraction": mix.hidden_fraction, "layers": mix.layers, "name": mix.describe()},
        "reason": reason,
    }


def _depth_units(units: list[GatedUnits]) -> int:
    depth = _mix_gate(units, "layer")
    return 0 if depth is None else depth.n_units


def _prune_to_mix(
    model: nn.Module, scores: dict, mix: ShapeMix, target: float, options: ShapeSearchConfig
) -> OneShotResult | str:
    """Set the masks of ``mix`` at ``target``: its coarse units removed, the finer levels filling the budget.

    Returns ``prune_to_target``'s result, or why the mix cannot reach the target (then the masks are
    left as they fell).
    """
    flop_model = find_flop_model(model)
    units = find_gated_units(flop_model)
    checked = check_scores(units, scores)
    forced = _forced(flop_model, units, checked, mix, options)
    fine = [s for s in units if s.level not in MIX_LEVELS]
    # one scale for the finer levels (their own ranking), and the mix's units before / after all of them
    ranked = priorities(fine, checked, options.ranking).split([s.n_units for s in fine])
    order = {s.key: p for s, p in zip(fine, ranked)}
    order.update({key: torch.where(removed, -_FIRST, _FIRST) for key, removed in forced.items()})
    try:
        result = prune_to_target(
            model,
            order,
            target,
            ranking="absolute",
            min_units_per_gate=options.min_units_per_gate,
            protect_layers=options.protect_layers,
        )
    except ValueError as err:
        return f"the finer levels cannot take the rest of the target: {err}"
    for key, removed in forced.items():
        closed = int((~result.keep[key]).sum())
        if closed < int(removed.sum()):  # the size closest to the budget gave back units of the mix
            return (
                f"{mix.describe()} alone removes more than the target allows ({key}: {closed} units closed where the "
                f"mix asks {int(removed.sum())}); lower its fractions or raise the target"
            )
        if closed > int(removed.sum()) or not torch.equal(result.keep[key], ~removed):
            return (
                f"the finer levels cannot reach the target beside {mix.describe()} ({key}: {closed} units closed where "
                f"the mix asks {int(removed.sum())}); raise its fractions or lower the target"
            )
    return result


def _feasible(
    base: nn.Module, units: list[GatedUnits], mixes: list[ShapeMix], target: float, options, explicit: bool
) -> tuple[list[ShapeMix], list[dict]]:
    """The mixes that can reach the target, by a dry run of the masks (counts only: no data read yet)."""
    flop_model = find_flop_model(base)
    depth = _mix_gate(units, "layer")
    free_depth = None if depth is None else int(_free_depth_units(flop_model, depth, options).sum())
    neutral = {s.key: torch.ones(s.n_units) for s in units}  # any order: the counts do not depend on it
    feasible, skipped = [], []
    for mix in mixes:
        reason = _check_mix(units, mix, free_depth)
        if reason is None:
            outcome = _prune_to_mix(base, neutral, mix, target, options)
            reason = outcome if isinstance(outcome, str) else None
        if reason is None:
            feasible.append(mix)
        elif explicit:
            raise ValueError(f"candidate {mix} cannot be searched: {reason}.")
        else:
            skipped.append(_skip(mix, reason))
    open_all_gates(base)
    if not feasible:
        raise ValueError(
            f"target_sparsity={target} cannot be reached by any candidate mix: {[s['reason'] for s in skipped]}. "
            "Lower the target or give other hidden_fractions / layer_fractions."
        )
    return feasible, skipped


# --- one candidate -------------------------------------------------------------------------------------


def _refit(model: nn.Module, fit: list[dict], mix: ShapeMix, options: ShapeSearchConfig) -> int:
    """prune_oneshot's refit: the norms compensated for the removed channels, then the layers refit; returns
    how many modules took their refit."""
    if mix.hidden_fraction and hidden_channels(find_flop_model(model)) is not None:
        compensate_norms(model, fit)
    report = reconstruct(model, fit, **{"progress": False, **(options.reconstruct_options or {})})
    return sum(r.applied for r in report.layers)


@torch.no_grad()
def heldout_loss(model: nn.Module, batches: list[dict]) -> float:
    """The mean loss of ``model`` (eval mode) over ``batches`` (with ``labels``)."""
    with eval_mode(model):
        losses = [float(model(**b).loss) for b in iter_calibration(batches, device=model_device(model))]
    return sum(losses) / len(losses)


def _candidate(model: nn.Module, mix: ShapeMix, outcome: OneShotResult, loss: float, refit: int) -> ShapeCandidate:
    report = sparsity_report(model)
    kept: dict[str, list[int]] = {}
    for levels in report.structures.values():
        for level, (k, n) in levels.items():
            total = kept.setdefault(level, [0, 0])
            total[0], total[1] = total[0] + k, total[1] + n
    channels = hidden_channels(find_flop_model(model))
    if channels is not None:
        kept["hidden"] = [int(channels.kept_channels().sum()), channels.n]
    return ShapeCandidate(
        mix=mix,
        kept_params=report.deterministic_kept_params,
        sparsity=report.deterministic_sparsity,
        step=outcome.step,
        loss=loss,
        kept_units={level: (k, n) for level, (k, n) in kept.items()},
        layers_removed=list(report.layers_removed),
        refit_modules=refit,
    )
