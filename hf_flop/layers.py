"""The gated factorized linear layer: ``W = P diag(z) Q`` with one gate per rank-1 component."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from .gates import Gate

LINEAR_TYPES = (nn.Linear, Conv1D)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of an ``nn.Linear``, GPT-2 ``Conv1D`` or ``FlopLinear``."""
    if isinstance(module, FlopLinear):
        return module.out_features, module.in_features
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, Conv1D):
        return module.nf, module.weight.shape[0]
    raise TypeError(f"{type(module).__name__} is not a linear layer (nn.Linear or transformers Conv1D).")


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight of a linear layer (Conv1D stores its transpose)."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


class FlopLinear(nn.Module, BaseTunerLayer):
    """A linear layer re-parametrised for pruning.

    Factorized mode (level ``"rank"``): ``y = P diag(z) Q x + b`` with ``P`` (out x r), ``Q``
    (r x in) and a gate ``z`` over the r rank-1 components. ``P`` and ``Q`` come from the SVD of
    the pretrained weight, ``W = U S V^T``, ``P = U sqrt(S)``, ``Q = sqrt(S) V^T``, at full rank
    ``r = min(in, out)``, so with all gates at 1 the layer computes ``W x + b`` exactly (up to
    float rounding). The price is paid during training only: ``r (in + out)`` parameters instead
    of ``in * out`` (2x for a square matrix) and the same factor in FLOPs, until pruning brings the
    live rank below the break-even ``in * out / (in + out)``. The SVD itself costs
    ``O(in * out * r)`` once, at injection.

    Dense mode (no ``"rank"`` level): the base weight is used as is; head and row gates act on it
    from outside (see ``FlopModel``). With ``block_size`` (level ``"block"``), a gate over the
    weight's square blocks, ``flop_block_gate[adapter]``, masks it (see ``hf_flop.blocks``).

    The frozen ``base_layer`` is kept, as in PEFT, for its bias and so the layer can be unloaded.
    """

    adapter_layer_names = ("flop_P", "flop_Q", "flop_rank_gate", "flop_block_gate")
    other_param_names = ()

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        *,
        factorized: bool,
        gate_factory,
        live_threshold: float,
        block_size: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, LINEAR_TYPES):
            raise TypeError(
                f"FLOP can only replace nn.Linear or transformers Conv1D layers, got {type(base_layer).__name__}; "
                "remove it from target_modules (or add it to exclude_modules)."
            )
        self.base_layer = base_layer
        self.out_features, self.in_features = linear_shape(base_layer)
        self.factorized = factorized
        self.live_threshold = live_threshold
        self.flop_P = nn.ParameterDict()
        self.flop_Q = nn.ParameterDict()
        self.flop_rank_gate = nn.ModuleDict()
        self.flop_block_gate = nn.ModuleDict()
        self.block_size = block_size
        self._active_adapter = adapter_name
        self.merged_adapters = []
        self._disable_adapters = False
        if factorized and block_size:
            raise ValueError(
                "a FlopLinear is either factorized (level 'rank') or block-gated (level 'block'), not both."
            )
        if factorized:
            self.update_layer(adapter_name, gate_factory)
        if block_size:
            from .blocks import add_block_gate

            add_block_gate(self, adapter_name, gate_factory, block_size)

    @property
    def rank(self) -> int:
        return min(self.in_features, self.out_features)

    def update_layer(self, adapter_name: str, gate_factory) -> None:
        weight = dense_weight(self.base_layer).detach()
        u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
        root = s.sqrt()
        p = (u * root).to(weight.dtype)
        q = (root[:, None] * vh).to(weight.dtype)
        self.flop_P[adapter_name] = nn.Parameter(p.contiguous())
        self.flop_Q[adapter_name] = nn.Parameter(q.contiguous())
        gate: Gate = gate_factory(self.rank)
        self.flop_rank_gate[adapter_name] = gate.to(device=weight.device)
        # the base weight is superseded by the factors: never train it
        self.base_layer.weight.requires_grad_(False)

    # --- the layer's verbs -------------------------------------------------------------------------
    @property
    def gate(self) -> Gate | None:
        return self.flop_rank_gate[self.active_adapters[0]] if self.factorized else None

    @property
    def block_gate(self) -> Gate | None:
        """The gate over the weight's square blocks (level ``"block"``), or None."""
        return self.flop_block_gate[self.active_adapters[0]] if self.block_size else None

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        name = self.active_adapters[0]
        return self.flop_P[name], self.flop_Q[name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.block_size and not (self.disable_adapters or self.merged):
            from .blocks import block_forward

            return block_forward(self, x)
        if self.disable_adapters or not self.factorized or self.merged:
            return self.base_layer(x, *args, **kwargs)
        p, q = self.factors()
        z = self.gate()
        alive = z != 0
        n_alive = int(alive.sum())
        if n_alive < self.live_threshold * z.numel():
            # FLOP's speed-up: skip the rank-1 components whose gate is exactly zero in this pass;
            # the result is the same, only cheaper.
            idx = alive.nonzero().squeeze(1)
            p, q, z = p.index_select(1, idx), q.index_select(0, idx), z.index_select(0, idx)
        h = F.linear(x.to(q.dtype), q) * z
        return F.linear(h, p, self.bias)

    @torch.no_grad()
    def folded_weight(self) -> torch.Tensor:
        """``P diag(z) Q`` (or the block-masked weight) with the deterministic (eval) mask, as ``(out, in)``."""
        if self.block_size:
            from .blocks import folded_block_weight

            return folded_block_weight(self)
        if not self.factorized:
            return dense_weight(self.base_layer).detach().clone()
        p, q = self.factors()
        z = self.gate.deterministic_mask()
        return (p * z) @ q

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold ``P diag(z) Q`` or the block mask (eval masks) into the base layer's weight, PEFT's ``merge``."""
        if self.merged or not (self.factorized or self.block_size):
            return
        weight = self.folded_weight()
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError("merging produced non-finite weights; the factors hold NaN or inf.")
        base = self.base_layer
        base.weight.data.copy_(weight.t() if isinstance(base, Conv1D) else weight)
        self.merged_adapters.append(self.active_adapters[0])

    def unmerge(self) -> None:
        raise NotImplementedError("FLOP merges are one-way: the dense weight is not kept. Reload the adapter instead.")

    def extra_repr(self) -> str:
        mode = (
            f"rank={self.rank}" if self.factorized else f"blocks of {self.block_size}" if self.block_size else "dense"
        )
        return f"in_features={self.in_features}, out_features={self.out_features}, {mode}"


def round_up(n: int, multiple: int, cap: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``, never above ``cap``."""
    return min(cap, int(math.ceil(n / multiple)) * multiple) if n > 0 else 0
