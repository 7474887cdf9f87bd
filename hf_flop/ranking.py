"""The order in which one-shot pruning removes units: scores ranked across gates, then a removal path.

``priorities`` puts every unit's score on one scale across the gates (``RANKINGS``), ``removal_order``
sorts the units by it (least important first, some protected), and ``removal_path`` cuts that order
into the steps ``hf_flop.oneshot.prune_to_target`` removes whole: single units, or, under
``FlopConfig(uniform_shapes=True)``, uniform slices (``hf_flop.uniform``). Units are flat ids: gates
in ``find_gated_units`` order, units within.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .architectures import UnsupportedArchitectureError, find_layers
from .gated import GatedUnits
from .hidden_heads import allowed_kept_counts
from .recognition import spec_for
from .uniform import uniform_slices


def check_scores(units: list[GatedUnits], scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``scores`` (``compute_scores``'s) as float CPU tensors, checked to give every unit of ``units`` a finite score."""
    if not isinstance(scores, dict):
        raise TypeError(
            f"scores must be a dict gate name -> tensor (from compute_scores), got {type(scores).__name__}."
        )
    missing = [s.key for s in units if s.key not in scores]
    if missing:
        raise ValueError(f"scores lack the gates {missing[:5]}; compute them with hf_flop.compute_scores(model, ...).")
    checked = {}
    for s in units:
        value = torch.as_tensor(scores[s.key]).detach().float().cpu()
        if value.shape != (s.n_units,):
            raise ValueError(f"scores['{s.key}'] has shape {tuple(value.shape)}, expected ({s.n_units},).")
        if not torch.isfinite(value).all():
            raise ValueError(f"scores['{s.key}'] holds NaN or inf.")
        checked[s.key] = value
    return checked


RANKINGS = ("per_gate", "per_parameter", "standardized", "absolute")


def priorities(units: list[GatedUnits], scores: dict[str, torch.Tensor], ranking: str) -> torch.Tensor:
    """Every unit's removal priority (lower: removed earlier), flat: gates in order, units within.

    ``per_gate`` ranks by score / the mean score of the unit's gate: scale-free, so layers whose
    weights or activations are larger are not spared for that alone. ``standardized`` ranks by the
    score standardised within its gate, ``(score - mean) / std`` (FLAP's global allocation): shift-
    and scale-free. ``per_parameter`` ranks by score / the unit's parameters, the knapsack rule for
    scores comparable across layers; it favours removing big units (heads), which a first-order
    Taylor score underrates (SmolLM2-135M on PTB, heads and rows at 30%: perplexity 685 per gate
    against 1,793 per parameter with sensitivity, 396 against 43,468 with activation; dense 158).
    ``absolute`` ranks by the score itself, for scores already on one scale across gates (the trained
    gates' own order, ``hf_flop.oneshot.fix_masks_at_target``). Within a gate every ranking orders units by score.
    """
    if ranking not in RANKINGS:
        raise ValueError(f"ranking={ranking!r} is not known; use one of {list(RANKINGS)}.")
    priority = []
    for s in units:
        value = scores[s.key]
        if ranking == "standardized":
            spread = value.std() if len(value) > 1 else torch.tensor(1.0)
            priority.append((value - value.mean()) / spread.clamp_min(1e-30))
        elif ranking == "absolute":
            priority.append(value)
        else:
            scale = s.unit_params if ranking == "per_parameter" else value.mean().clamp_min(1e-30)
            priority.append(value / scale)
    return torch.cat(priority)


def removal_order(
    units: list[GatedUnits],
    scores: dict[str, torch.Tensor],
    ranking: str,
    protect: int = 0,
    frozen: frozenset[str] = frozenset(),
    frozen_layers: frozenset[str] = frozenset(),
) -> torch.Tensor:
    """Flat unit ids (gates in order, units within), least important first, by ``priorities``.

    The ``protect`` highest-scored units of each gate, every unit of the gates in ``frozen``, and the
    units of a gate spanning layers (level "layer") that lie in ``frozen_layers``, are left out (never
    removed). Ties keep the flat order, so the result is deterministic.
    """
    priority = priorities(units, scores, ranking)
    candidate = []
    for s in units:
        free = torch.ones(s.n_units, dtype=torch.bool)
        free[torch.argsort(scores[s.key], descending=True, stable=True)[: max(protect, s.min_kept)]] = False
        if s.key in frozen:
            free[:] = False
        for u, layer in enumerate(s.unit_layers or ()):
            free[u] &= layer not in frozen_layers
        candidate.append(free)
    ids = torch.cat(candidate).nonzero().squeeze(1)
    return ids[torch.argsort(priority[ids], stable=True)]


def frozen_gates(flop_model, units: list[GatedUnits], protect_layers: Sequence[int]) -> frozenset[str]:
    """Gates whose units lie in the transformer layers ``protect_layers`` (indices; negative from the end)."""
    prefixes = protected_layers(flop_model, protect_layers)
    return frozenset(s.key for s in units if any(s.module == p or s.module.startswith(p + ".") for p in prefixes))


def protected_layers(flop_model, protect_layers: Sequence[int]) -> frozenset[str]:
    """The names of the transformer layers ``protect_layers`` (indices; negative from the end)."""
    if not protect_layers:
        return frozenset()
    try:
        names = find_layers(flop_model.model, spec_for(flop_model.model, None))
    except UnsupportedArchitectureError as err:
        raise ValueError(f"protect_layers needs a known architecture to find the transformer layers: {err}") from None
    bad = [i for i in protect_layers if not isinstance(i, int) or not -len(names) <= i < len(names)]
    if bad:
        raise ValueError(f"protect_layers={list(protect_layers)} holds {bad}: the model has {len(names)} layers.")
    return frozenset(names[i] for i in protect_layers)


def keep_masks(units: list[GatedUnits], removed: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per gate, the bool mask of the units kept once the flat unit ids ``removed`` are gone."""
    flat = torch.ones(sum(s.n_units for s in units), dtype=torch.bool)
    flat[removed] = False
    return {s.key: mask for s, mask in zip(units, flat.split([s.n_units for s in units]))}


# --- the removal path ------------------------------------------------------------------------------


@dataclass
class RemovalPath:
    """Units to remove, in order, in steps that are removed whole: single units, or uniform slices."""

    order: torch.Tensor  # flat unit ids
    sizes: torch.Tensor  # units per step
    kinds: torch.Tensor  # dropping a step drops the later steps of its kind (a uniform slice's successors)

    @classmethod
    def of_units(cls, order: torch.Tensor) -> RemovalPath:
        return cls(order, torch.ones(len(order), dtype=torch.long), torch.arange(len(order)))

    @classmethod
    def of_slices(cls, slices: list[tuple[str, torch.Tensor]]) -> RemovalPath:
        levels = list(dict.fromkeys(level for level, _ in slices))
        order = torch.cat([ids for _, ids in slices]) if slices else torch.zeros(0, dtype=torch.long)
        sizes = torch.tensor([len(ids) for _, ids in slices], dtype=torch.long)
        return cls(order, sizes, torch.tensor([levels.index(level) for level, _ in slices], dtype=torch.long))

    def __len__(self) -> int:
        return len(self.sizes)

    def removed(self, k: int) -> torch.Tensor:
        return self.order[: int(self.sizes[:k].sum())]

    def without(self, j: int) -> RemovalPath:
        """Step ``j`` kept, with every later step of its kind (a slice cannot follow one that stays)."""
        dropped = (torch.arange(len(self)) >= j) & (self.kinds == self.kinds[j])
        units_dropped = dropped.repeat_interleave(self.sizes)
        return RemovalPath(self.order[~units_dropped], self.sizes[~dropped], self.kinds[~dropped])


def removal_path(
    flop_model, units: list[GatedUnits], scores: dict, ranking: str, min_units: int, protect_layers: Sequence[int]
) -> RemovalPath:
    """Unit by unit in ``ranking`` order; under ``FlopConfig.uniform_shapes``, uniform slice by slice."""
    config = flop_model.flop_config
    if not config.uniform_shapes:
        frozen = frozen_gates(flop_model, units, protect_layers)
        layers = protected_layers(flop_model, protect_layers)
        order = removal_order(units, scores, ranking, protect=min_units, frozen=frozen, frozen_layers=layers)
        return RemovalPath.of_units(order)
    if protect_layers:
        raise ValueError(
            f"protect_layers={list(protect_layers)} keeps every unit of those layers, so their shapes would differ "
            "from the others': FlopConfig(uniform_shapes=True) cannot protect layers. Leave protect_layers out, or "
            "set uniform_shapes=False."
        )
    allowed = allowed_kept_counts(flop_model)  # heads a stock config can take beside the kept channels
    slices = uniform_slices(units, priorities(units, scores, ranking), config.round_to, min_units, allowed)
    return RemovalPath.of_slices(slices)
