"""Level ``"rank"``: FLOP's gated factorization ``W = P diag(z) Q`` of a targeted linear.

``P`` (out x r) and ``Q`` (r x in) start from the SVD of the pretrained weight (``hf_flop.counting.
svd_factors``) at full rank ``r = min(in, out)``, so with all gates at 1 the layer computes ``W x + b``
exactly (up to float rounding). The price is paid during training only: ``r (in + out)``
parameters instead of ``in * out`` (2x for a square matrix) and the same factor in FLOPs, until
pruning brings the live rank below the break-even ``in * out / (in + out)``. The SVD itself costs
``O(in * out * r)`` once, at injection.

Compaction keeps the components with a non-zero gate (rounded up to ``round_to`` with closed ones,
whose folded gate is 0, so the result is exact) as two thin layers ``in -> r' -> out`` with ``z``
folded into ``P``, or one dense layer ``P' Q'`` when that is smaller (``hf_flop.counting``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .counting import (
    compacted_count,
    expected_kept_count,
    factorized_params,
    kept_unit_indices,
    stays_factorized,
    svd_factors,
)
from .gated import Compacted, Cut, GatedUnits, ModuleSparsity
from .gates import Gate
from .linear import cut_linear, dense_weight, set_bias
from .refit import Fit, fit_rank


class RankVariant:
    """The ``FlopLinear`` variant of level ``"rank"`` (tensors ``flop_P``, ``flop_Q``, ``flop_rank_gate``).

    Every verb takes the ``FlopLinear`` it serves as ``layer`` (see ``hf_flop.layers.LinearVariant``).
    """

    supersedes_base_weight = True

    @staticmethod
    def update_layer(layer: nn.Module, adapter_name: str, gate_factory: Callable[[int], Gate]) -> None:
        weight = dense_weight(layer.base_layer)
        p, q = svd_factors(weight)
        layer.flop_P[adapter_name] = nn.Parameter(p)
        layer.flop_Q[adapter_name] = nn.Parameter(q)
        layer.flop_rank_gate[adapter_name] = gate_factory(layer.rank).to(device=weight.device)

    @staticmethod
    def gates(layer: nn.Module) -> dict[str, Gate]:
        return {"rank": layer.flop_rank_gate[layer.active_adapters[0]]}

    @staticmethod
    def forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        p, q = layer.factors()
        z = layer.gate()
        alive = z != 0
        if int(alive.sum()) < layer.live_threshold * z.numel():
            # FLOP's speed-up: skip the rank-1 components whose gate is exactly zero in this pass;
            # the result is the same, only cheaper.
            idx = alive.nonzero().squeeze(1)
            p, q, z = p.index_select(1, idx), q.index_select(0, idx), z.index_select(0, idx)
        # PEFT keeps adapter tensors of a bf16/fp16 model in float32 (autocast_adapter_dtype): compute in the
        # factors' dtype, and hand the next layer the dtype it was given
        bias = layer.bias.to(p.dtype) if layer.bias is not None else None
        h = F.linear(x.to(q.dtype), q) * z.to(q.dtype)
        return F.linear(h, p, bias).to(x.dtype)

    @staticmethod
    def folded_weight(layer: nn.Module) -> torch.Tensor:
        p, q = layer.factors()
        return (p * layer.gate.deterministic_mask()) @ q

    @staticmethod
    def count(layer: nn.Module, kept_in, kept_out, deterministic: bool, round_to: int) -> ModuleSparsity:
        rank = layer.gate.l0(deterministic)
        if deterministic:
            rank = torch.tensor(compacted_count(int(rank), layer.rank, round_to))
        else:
            rank = expected_kept_count(rank)
        params, factorized = factorized_params(rank, kept_in, kept_out, deterministic=deterministic)
        kept_rank = int(rank) if deterministic else rank
        return ModuleSparsity(layer.shape, (int(kept_out), int(kept_in)), layer.rank, kept_rank, params, factorized)

    @staticmethod
    def compact(layer: nn.Module, cut: Cut) -> Compacted:
        p, q = (t.detach().float().cpu() for t in layer.factors())
        z = layer.gate.deterministic_mask().detach().float().cpu()
        rank = compacted_count(int((z != 0).sum()), layer.rank, cut.round_to)
        comps = kept_unit_indices(z, rank)
        p = p[cut.rows][:, comps] * z[comps]
        q = q[comps][:, cut.cols] * cut.scale
        if not stays_factorized(rank, len(cut.cols), len(cut.rows)):
            return Compacted(*cut_linear(layer.base_layer, p @ q, cut.rows))
        bias = layer.bias.detach()[cut.rows] if layer.bias is not None else None
        spec = {"kind": "low_rank", "in": len(cut.cols), "out": len(cut.rows), "rank": rank, "bias": bias is not None}
        tensors = {"in_proj.weight": q, "out_proj.weight": p}
        if bias is not None:
            tensors["out_proj.bias"] = bias
        dtype = dense_weight(layer.base_layer).dtype
        return Compacted(spec, {k: v.to(dtype).contiguous() for k, v in tensors.items()})

    @staticmethod
    def scored_units(layer: nn.Module, name: str) -> list[GatedUnits]:
        # unit k writes feature h_k = Q[k] x through producer row Q[k], read by consumer column P[:, k]
        p, q = (t.detach() for t in layer.factors())
        return [
            GatedUnits(
                key=f"{name}.rank",
                level="rank",
                gate=layer.gate,
                n_units=layer.rank,
                unit=1,
                unit_params=layer.in_features + layer.out_features,
                observed=layer,
                column_sq_norms=p.float().pow(2).sum(0),
                row_sq_norms=q.float().pow(2).sum(1),
                features=functools.partial(_project, q),
                entry=name,
                module=name,
            )
        ]

    @staticmethod
    def reference(layer: nn.Module) -> torch.Tensor:
        p, q = layer.factors()
        return (p @ q).detach()  # every component open

    @staticmethod
    def refit(layer: nn.Module, moments: torch.Tensor, scale: torch.Tensor, fit_bias: bool, ridge: float) -> Fit | None:
        rank = int(layer.gate.l0(True))
        if rank == 0:  # compaction keeps one zeroed component: nothing to fit
            return None
        reference, bias = layer.reference()
        return fit_rank(reference, bias, moments, scale != 0, rank, fit_bias=fit_bias, ridge=ridge)

    @staticmethod
    def apply_fit(layer: nn.Module, fit: Fit, scale: torch.Tensor) -> None:
        """The fit's ``r`` components become the first ``r`` of ``P``, ``Q`` (the rest zero) and the gate keeps
        exactly those: the same count as before, so accounting and compaction see the same size."""
        p, q = layer.factors()
        divisor = torch.where(scale != 0, scale, torch.ones_like(scale)).to(fit.q)
        r = fit.rank
        p.data.zero_()
        q.data.zero_()
        p.data[:, :r] = fit.p.to(p.dtype)
        q.data[:r] = (fit.q / divisor).to(q.dtype)
        keep = torch.zeros(layer.rank, dtype=torch.bool)
        keep[:r] = True
        layer.gate.set_mask(keep)
        set_bias(layer.base_layer, fit.bias)

    @staticmethod
    def describe(layer: nn.Module) -> str:
        return f"rank={layer.rank}"


def _project(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x.to(q.dtype), q)
