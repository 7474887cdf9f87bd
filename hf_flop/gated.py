"""The verbs every gated module answers, and the records they return.

A *gated module* is what injection puts into the model: a ``FlopLinear`` (levels ``"rank"`` and
``"block"``, or plain for head/row pruning), a ``FlopEmbedding`` and its tied head (level
``"embedding"``). Accounting, compaction, scores, one-shot pruning and the PEFT tuner only talk to
them through these verbs, so a new level is one class plus one table entry:

* ``gates()``          -- its own gates by suffix (``{"rank": gate}``); head/row gates live in the model;
* ``count(...)``       -- what it keeps, as ``ModuleSparsity`` entries (one per report row);
* ``compact(cut)``     -- its compacted form: a ``flop_plan`` entry and the tensors to load into it;
* ``scored_units(name)`` -- its gates with the weights their units own, for one-shot scores;
* ``refit(...)`` / ``apply_fit(...)`` -- a least-squares refit of what it keeps (``hf_flop.reconstruction``);
* ``supersedes_base_weight`` -- whether trained factors replace the frozen base weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .gates import Gate


@dataclass
class ModuleSparsity:
    """What the gates keep of one prunable matrix (a targeted linear, or one embedding cluster).

    ``count(..., deterministic=False)`` fills ``kept_params`` with the differentiable expected count
    (a tensor); the other kept fields are then only indicative.
    """

    shape: tuple[int, int]  # (out, in) of the original
    kept_shape: tuple[int, int]  # (out', in') after head/row pruning
    rank: int | None  # full rank, None for dense (non-factorized) layers
    kept_rank: int | None
    kept_params: int
    factorized_after_compaction: bool
    blocks: int | None = None  # weight-block grid size, None without level "block"
    kept_blocks: int | None = None


@dataclass
class GatedUnits:
    """One gate over ``n_units`` units, with what the one-shot scores need to know about the units.

    Unit ``u`` reads ``unit`` features; ``column_sq_norms`` holds, feature by feature (unit-major),
    the squared norm of the consumer weights reading it. The activation score records the mean
    square of ``features(observed input)`` and gathers it per unit feature with ``feature_index``.
    """

    key: str  # the gate's name in ``FlopModel.gates()``
    level: str
    gate: Gate
    n_units: int
    unit: int  # consumer input features per unit
    unit_params: int  # parameters one unit owns in the uncompressed layers (for score per parameter)
    observed: nn.Module  # the module whose input carries the units' features (activation score)
    column_sq_norms: torch.Tensor  # (n_units * unit,) squared norms of the consumer columns
    row_sq_norms: torch.Tensor  # (n_units,) squared norms of the producer rows (ones if none)
    features: Callable[[torch.Tensor], torch.Tensor] | None = None  # observed input -> features; None: itself
    feature_index: torch.Tensor | None = None  # (n_units * unit,) feature of each unit slot; None: identity
    entry: str | None = None  # report entry whose factorized-or-dense form the gate decides (rank, clusters)
    module: str = ""  # the module the units belong to (a linear, a transformer layer, the embedding)
    min_kept: int = 0  # units that must stay open whatever the scores (a MoE layer's top-k experts)
    routed: bool = False  # read only by the tokens routed to them (an expert's rows): a pass may not reach them
    unit_layers: tuple[str, ...] | None = None  # a gate spanning layers (level "layer"): each unit's transformer layer
    step: int = 1  # the kept count moves by this many units (uniform slices take as many; hidden channels)


@dataclass
class Cut:
    """What compaction tells a gated module about its surroundings.

    ``rows``/``cols`` are the output/input features the head/row gates keep (all of them when none
    cut the module), ``scale`` the folded head/row gate value of each kept column, ``path_of`` maps
    a module of the model to its path in the saved plan.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    scale: torch.Tensor
    round_to: int
    path_of: Callable[[nn.Module], str]


@dataclass
class Compacted:
    """A gated module's compacted form: its ``flop_plan`` entry, the tensors named as in the rebuilt
    module's state dict, and config entries the compacted model needs changed."""

    spec: dict
    tensors: dict[str, torch.Tensor]
    config: dict = field(default_factory=dict)
    # what it changes outside itself (a MoE router): plan modules by path, state tensors by name, attributes by path
    modules: dict[str, dict] = field(default_factory=dict)
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    attributes: dict[str, dict] = field(default_factory=dict)


class GatedLayer:
    """Mixin declaring the verbs of a gated module (see the module docstring); defaults: nothing gated."""

    supersedes_base_weight: bool = False
    shape: tuple[int, int] = (0, 0)  # (out, in) features head/row gates may cut; (0, 0): they never reach it

    def gates(self) -> dict[str, Gate]:
        return {}

    def count(self, kept_in, kept_out, *, deterministic: bool, round_to: int) -> dict[str, ModuleSparsity]:
        """Report entries by name suffix ("" for the module itself), given the kept input/output features."""
        raise NotImplementedError  # pragma: no cover - interface

    def compact(self, cut: Cut) -> Compacted:
        """This module cut to what its gates (and ``cut``) keep, eval-mask values folded in."""
        raise NotImplementedError  # pragma: no cover - interface

    def scored_units(self, name: str) -> list[GatedUnits]:
        return []

    def unit_slices(self, round_to: int) -> dict[str, tuple[float, float]]:
        """Per level of the units its gates hold that ``shape`` does not cover: the parameters of one unit and of
        this module's part of a uniform slice; ``{}``: none (see ``accounting.largest_unit_params``)."""
        return {}

    def refit(self, moments: torch.Tensor, scale: torch.Tensor, *, fit_bias: bool, ridge: float):
        """A ``hf_flop.refit.Fit`` of what the gates keep to what the unpruned module computes, or None
        when this module cannot be refit. ``moments``: the second moments of its (unmasked) input;
        ``scale``: the head/row mask value of each input feature (0 = removed)."""
        return None

    def apply_fit(self, fit, scale: torch.Tensor) -> None:
        """Write a ``refit`` result into the module (the eval masks keep exactly the same units)."""
        raise NotImplementedError  # pragma: no cover - interface

    def merge_refusal(self) -> str | None:
        """Why the eval masks cannot be folded into weights of the same shapes (``merge_and_unload``), or None."""
        return None

    def unload(self, model: nn.Module, merge: bool) -> None:
        """Put the original module back into ``model`` (folding the eval masks in when ``merge``).

        PEFT's ``merge_and_unload`` already does this for ``BaseTunerLayer``s; other gated modules
        (the embedding) do it here."""
