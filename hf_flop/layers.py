"""The gated linear layer that injection puts in place of every targeted ``nn.Linear`` / ``Conv1D``.

``FlopLinear`` is one PEFT tuner layer with PEFT's fixed verbs (``update_layer``, ``forward``,
``merge``, ``unmerge``) plus hf_flop's (``gates``, ``count``, ``compact``, ``scored_units``; see
``hf_flop.gated``). What it computes depends on the level it serves, a *variant* chosen from
``LINEAR_VARIANTS`` (as PEFT's LoRA variants do):

* no variant (``LinearVariant``): the base weight as it is; head/row gates cut it from outside
  (``hf_flop.groups``);
* ``"rank"`` (``hf_flop.rank``): FLOP's ``W = P diag(z) Q`` with a gate per rank-1 component;
* ``"block"`` (``hf_flop.blocks``): MLPruning's gate per square block of the weight.

A new linear level is one variant class plus one entry in ``LINEAR_VARIANTS``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .blocks import BlockVariant
from .gated import Compacted, Cut, GatedLayer, GatedUnits, ModuleSparsity
from .gates import Gate
from .linear import cut_linear, dense_weight, is_linear, linear_shape, set_bias, set_dense_weight
from .rank import RankVariant
from .refit import Fit, fit_columns


class LinearVariant:
    """The plain variant: the layer computes with its base weight; only head/row gates cut it.

    Variants hold no state: the layer owns every tensor (so PEFT checkpoints find them), and each
    verb receives it.
    """

    supersedes_base_weight = False

    @staticmethod
    def update_layer(layer: FlopLinear, adapter_name: str, gate_factory: Callable[[int], Gate]) -> None:
        pass

    @staticmethod
    def gates(layer: FlopLinear) -> dict[str, Gate]:
        return {}

    @staticmethod
    def forward(layer: FlopLinear, x: torch.Tensor) -> torch.Tensor:
        return layer.base_layer(x)

    @staticmethod
    def folded_weight(layer: FlopLinear) -> torch.Tensor:
        return dense_weight(layer.base_layer).detach().clone()

    @staticmethod
    def reference(layer: FlopLinear) -> torch.Tensor:
        return dense_weight(layer.base_layer).detach()

    @staticmethod
    def count(layer: FlopLinear, kept_in, kept_out, deterministic: bool, round_to: int) -> ModuleSparsity:
        params = kept_in * kept_out
        return ModuleSparsity(layer.shape, (int(kept_out), int(kept_in)), None, None, params, False)

    @staticmethod
    def compact(layer: FlopLinear, cut: Cut) -> Compacted:
        weight = dense_weight(layer.base_layer).detach().float().cpu()[cut.rows][:, cut.cols] * cut.scale
        return Compacted(*cut_linear(layer.base_layer, weight, cut.rows))

    @staticmethod
    def scored_units(layer: FlopLinear, name: str) -> list[GatedUnits]:
        return []

    @staticmethod
    def refit(layer: FlopLinear, moments: torch.Tensor, scale: torch.Tensor, fit_bias: bool, ridge: float) -> Fit:
        return fit_columns(layer.reference()[0], layer.bias, moments, scale != 0, fit_bias=fit_bias, ridge=ridge)

    @staticmethod
    def apply_fit(layer: FlopLinear, fit: Fit, scale: torch.Tensor) -> None:
        # the layer reads x * scale: dividing the kept columns by their scale makes it compute fit.weight @ x
        divisor = torch.where(scale != 0, scale, torch.ones_like(scale)).to(fit.weight)
        set_dense_weight(layer.base_layer, (fit.weight / divisor).to(layer.base_layer.weight.dtype))
        set_bias(layer.base_layer, fit.bias)

    @staticmethod
    def describe(layer: FlopLinear) -> str:
        return "dense"


LINEAR_VARIANTS: dict[str | None, type] = {None: LinearVariant, "rank": RankVariant, "block": BlockVariant}


class FlopLinear(nn.Module, BaseTunerLayer, GatedLayer):
    """A targeted linear layer re-parametrised for pruning (see the module docstring).

    ``factorized=True`` selects level ``"rank"``, ``block_size`` level ``"block"``, neither the plain
    variant. The frozen ``base_layer`` is kept, as in PEFT, for its bias and so the layer can be unloaded.
    """

    adapter_layer_names = ("flop_P", "flop_Q", "flop_rank_gate", "flop_block_gate")
    other_param_names = ()

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        *,
        factorized: bool = False,
        gate_factory: Callable[[int], Gate],
        live_threshold: float = 0.8,
        block_size: int | None = None,
    ) -> None:
        super().__init__()
        if not is_linear(base_layer):
            raise TypeError(
                f"FLOP can only replace nn.Linear or transformers Conv1D layers, got {type(base_layer).__name__}; "
                "remove it from target_modules (or add it to exclude_modules)."
            )
        if factorized and block_size:
            raise ValueError(
                "a FlopLinear is either factorized (level 'rank') or block-gated (level 'block'), not both."
            )
        self.base_layer = base_layer
        self.out_features, self.in_features = linear_shape(base_layer)
        self.variant = LINEAR_VARIANTS["rank" if factorized else "block" if block_size else None]
        self.live_threshold = live_threshold
        self.block_size = block_size
        self.flop_P = nn.ParameterDict()
        self.flop_Q = nn.ParameterDict()
        self.flop_rank_gate = nn.ModuleDict()
        self.flop_block_gate = nn.ModuleDict()
        self._active_adapter = adapter_name
        self.merged_adapters = []
        self._disable_adapters = False
        self.update_layer(adapter_name, gate_factory)

    # --- PEFT's verbs ---------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, gate_factory: Callable[[int], Gate]) -> None:
        """Create this adapter's factors and gates (what the variant needs)."""
        self.variant.update_layer(self, adapter_name, gate_factory)
        if self.supersedes_base_weight:  # the trained factors replace it: never train it
            self.base_layer.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters or self.merged:
            return self.base_layer(x, *args, **kwargs)
        return self.variant.forward(self, x)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the eval masks into the base layer's weight (PEFT's ``merge``); same shapes, zeros kept."""
        if self.merged or not self.gates():
            return
        weight = self.folded_weight()
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError("merging produced non-finite weights; the factors hold NaN or inf.")
        set_dense_weight(self.base_layer, weight)
        self.merged_adapters.append(self.active_adapters[0])

    def unmerge(self) -> None:
        raise NotImplementedError("FLOP merges are one-way: the dense weight is not kept. Reload the adapter instead.")

    # --- hf_flop's verbs ------------------------------------------------------------------------------
    @property
    def supersedes_base_weight(self) -> bool:
        return self.variant.supersedes_base_weight

    def gates(self) -> dict[str, Gate]:
        return self.variant.gates(self)

    @torch.no_grad()
    def folded_weight(self) -> torch.Tensor:
        """The ``(out, in)`` weight the eval masks give (``P diag(z) Q``, the block-masked or the base weight)."""
        return self.variant.folded_weight(self)

    def count(self, kept_in, kept_out, *, deterministic: bool, round_to: int) -> dict[str, ModuleSparsity]:
        return {"": self.variant.count(self, kept_in, kept_out, deterministic, round_to)}

    @torch.no_grad()
    def compact(self, cut: Cut) -> Compacted:
        if self.merged:  # the base weight already holds the folded masks
            return LinearVariant.compact(self, cut)
        return self.variant.compact(self, cut)

    def scored_units(self, name: str) -> list[GatedUnits]:
        return self.variant.scored_units(self, name)

    def reference(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight, bias)`` of the unpruned layer: what it computes with every gate open."""
        return self.variant.reference(self), self.bias

    @torch.no_grad()
    def refit(self, moments: torch.Tensor, scale: torch.Tensor, *, fit_bias: bool, ridge: float) -> Fit | None:
        return self.variant.refit(self, moments, scale, fit_bias, ridge)

    @torch.no_grad()
    def apply_fit(self, fit: Fit, scale: torch.Tensor) -> None:
        self.variant.apply_fit(self, fit, scale)

    # --- what the variants and tests read -------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    @property
    def factorized(self) -> bool:
        return self.variant is RankVariant

    @property
    def rank(self) -> int:
        return min(self.in_features, self.out_features)

    @property
    def gate(self) -> Gate | None:
        """The rank gate (level ``"rank"``), or None."""
        return self.gates().get("rank")

    @property
    def block_gate(self) -> Gate | None:
        """The gate over the weight's square blocks (level ``"block"``), or None."""
        return self.gates().get("block")

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        name = self.active_adapters[0]
        return self.flop_P[name], self.flop_Q[name]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.variant.describe(self)}"

