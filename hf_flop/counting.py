"""The counting rules: what a gate keeps, and in which form compaction stores it.

The contract "the parameters ``sparsity_report`` counts are exactly what compaction writes" rests
on three rules, coded here once and called by the accounting, the compaction and the layers:

* **kept units**: a gate keeps the units its eval mask leaves open, at least one (an all-closed
  gate keeps one unit whose folded value is 0, so shapes never reach zero and the stock code
  still runs), rounded up to a multiple of ``round_to`` where the level rounds (ranks, FFN rows),
  never above the gate's size; the padding units are closed ones (folded value 0), so the
  result is still exact. In expectation the same floor applies (no rounding: it has no gradient);
* **factorized or dense**: ``r`` kept rank-1 components of an ``(out', in')`` matrix are stored as
  two thin matrices, ``r (in' + out')`` parameters, only when that is smaller than the dense
  ``in' out'``;
* **SVD start**: a weight ``W = U S V^T`` becomes ``P = U sqrt(S)``, ``Q = sqrt(S) V^T``, so
  ``P Q = W`` at full rank and both factors carry the singular values alike.
"""

from __future__ import annotations

import math

import torch


def round_up(n: int, multiple: int, cap: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``, never above ``cap``."""
    return min(cap, int(math.ceil(n / multiple)) * multiple) if n > 0 else 0


def compacted_count(open_units: int, n_units: int, round_to: int = 1) -> int:
    """Units compaction keeps of a gate with ``open_units`` open out of ``n_units``."""
    return round_up(max(int(open_units), 1), round_to, n_units)


def expected_kept_count(expected_units: torch.Tensor) -> torch.Tensor:
    """The kept-unit floor of ``compacted_count`` applied to a (differentiable) expected count."""
    return expected_units.clamp(min=1.0)


def kept_unit_indices(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Sorted indices of ``count`` units: every open unit (``mask != 0``), then closed ones as padding."""
    order = torch.argsort((mask == 0).to(torch.int8), stable=True)
    return order[:count].sort().values


def unit_features(units: torch.Tensor, width: int) -> torch.Tensor:
    """Feature indices of ``units`` when unit ``u`` owns features ``[u * width, (u + 1) * width)``."""
    return (units[:, None] * width + torch.arange(width)).flatten()


def stays_factorized(rank: int, n_in: int, n_out: int) -> bool:
    """Whether ``rank`` components of an ``(n_out, n_in)`` matrix are stored as factors (smaller than dense)."""
    return rank * (n_in + n_out) < n_in * n_out


def factorized_params(rank, n_in, n_out, *, deterministic: bool):
    """Parameters a gated factorization keeps: ``(params, stays factorized)``; tensors in, tensors out.

    Deterministic: ``min(r (in' + out'), in' out')``, what compaction writes. Expected: the same
    value, but while the dense form is the smaller one its gradient is the factorized term's, so
    the constraint pushes rank gates even above the break-even rank (where ``min`` alone would give
    no gradient).
    """
    factored = rank * (n_in + n_out)
    dense = n_in * n_out
    if deterministic or factored < dense:
        smaller = bool(factored < dense)
        return (factored if smaller else dense), smaller
    return dense.detach() + factored - factored.detach(), False


def svd_factors(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, Q)`` with ``P Q = weight`` at full rank ``min(out, in)``, from the SVD (in float32, returned in weight's dtype)."""
    u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    root = s.sqrt()
    p = (u * root).to(weight.dtype).contiguous()
    q = (root[:, None] * vh).to(weight.dtype).contiguous()
    return p, q
