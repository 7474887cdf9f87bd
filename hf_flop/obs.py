"""The math of score ``"obs"``: what removing a unit costs once the layer is refit (Optimal Brain Surgeon).

The activation score rates a unit by the output energy it carries, ``sum_j ||C[:, j]||^2 E[x_j^2]``.
But one-shot pruning refits the consumer afterwards (``hf_flop.reconstruct``): the kept columns
absorb what the removed ones carried, as far as the kept features predict it. A unit whose
features the others nearly repeat then costs almost nothing, however loud it is. OBS measures
exactly that: with ``H = E[x^ x^T]`` (the consumer's input second moment, plus a constant 1
feature when the consumer has a bias, which the refit moves too) and the consumer weight ``W``,
removing the feature group ``g`` of a unit and refitting every other column optimally raises the
output error ``E ||W x - W' x||^2`` by

    cost_g = trace(W_g [(H^-1)_gg]^-1 W_g^T),

and the optimal refit is ``W <- W - W_g [(H^-1)_gg]^-1 (H^-1)_g,:``. Removing units one after
another (greedily, cheapest first) and updating ``W`` and ``H^-1`` after each removal orders the
units of a gate by what they cost *given what is already gone*. A unit's score is the square root
of the largest cost met up to its removal, so scores rise along the greedy order (which the
global ranking across gates then keeps) and are on the activation score's scale (a root of output
energy): without correlations between features (``H`` diagonal) the first costs are the activation
scores squared.

``hf_flop.scores.obs_scores`` records the moments and calls ``greedy_costs`` per head/row gate (only
they have a consumer to refit; other gates get their ``activation`` score, on the same scale). The
cost is about that of one reconstruction: per gate a ``d x d`` inverse and ``d^2`` work per removed
feature (``d`` = the consumer's input width), done in ``rounds`` batches of the cheapest units.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def greedy_costs(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    moments: torch.Tensor,
    unit: int,
    *,
    rounds: int = 64,
    ridge: float = 1e-3,
    name: str = "a gate",
) -> torch.Tensor:
    """The running-max OBS cost at which each unit is removed, greedily, cheapest first.

    Computed in float64 on ``weight``'s device; returned as a float64 CPU tensor of ``n_units``.

    Args:
        weight: the consumer's weight (``out x d``), ``d = n_units * unit`` input features, unit-major.
        bias: its bias (the weight of the constant feature, never removed), or None (no bias to refit).
        moments: ``E[x^ x^T]`` of its input augmented by a constant 1 (``(d + 1) x (d + 1)``,
            ``hf_flop.refit.Moments``).
        unit: input features per unit (1 for an FFN row, the head width times the query heads of a KV group).
        rounds: at most this many greedy steps, each removing the cheapest ``n_units / rounds`` units
            together (one per step for at most ``rounds`` units).
        ridge: relative ridge term of the inverse, as in ``hf_flop.reconstruct``.
        name: what to call the units in errors (a gate name).
    """
    weight = weight.detach().to(torch.float64)  # on the model's device (a GPU does this fast)
    d = weight.shape[1]
    n = d // unit
    hessian = moments.to(weight.device, copy=True)
    if bias is None:  # no bias to move: the constant feature is not part of the refit
        hessian = hessian[:d, :d]
    else:  # the bias is the weight of the constant feature, never removed
        weight = torch.cat([weight, bias.detach().to(torch.float64)[:, None]], dim=1)
    diagonal = hessian.diagonal()[:d]  # the refit's own damping (``_ridge``), in place: no second d x d copy
    diagonal += ridge * diagonal.mean().clamp_min(1e-12)
    inverse, info = torch.linalg.inv_ex(hessian)
    if int(info) != 0:
        raise ValueError(
            f"the input second moment of {name}'s consumer is singular (some features never vary, e.g. closed units); use a "
            "ridge above 0 (the default is 1e-3) or more varied calibration data."
        )
    del hessian  # only its inverse is needed from here on
    # The matrices shrink as units go: ``inverse`` and ``weight`` keep only the columns still alive (the
    # units in their original order, then the constant feature), so a round costs (alive width)^2 times
    # the units it removes, and all rounds together about a third of updating the full width each time.
    units = torch.arange(n, device=weight.device)  # the alive units' indices, in order
    costs = torch.zeros(n, dtype=torch.float64)
    level = 0.0
    per_round = -(-n // rounds)
    while len(units):
        k = len(units)
        cols = torch.arange(k * unit, device=weight.device).reshape(k, unit)
        blocks = inverse[cols[:, :, None], cols[:, None, :]]  # (k, unit, unit): (H^-1)_gg per unit
        w = weight[:, : k * unit].reshape(-1, k, unit).permute(1, 2, 0)  # (k, unit, out)
        cost = (torch.linalg.solve(blocks, w) * w).sum((1, 2))  # trace(W_g [(H^-1)_gg]^-1 W_g^T)
        order = torch.argsort(cost, stable=True)[:per_round]
        for index, value in zip(units[order].tolist(), cost[order].tolist()):
            level = max(level, value)
            costs[index] = level
        going = torch.zeros(k, dtype=torch.bool, device=weight.device)
        going[order] = True
        gone = cols[going].reshape(-1)
        rest = torch.arange(k * unit, inverse.shape[0], device=weight.device)  # the constant feature, if any
        keep = torch.cat([cols[~going].reshape(-1), rest])
        # the OBS update: the kept columns absorb what the removed ones carried; H^-1 loses them
        step = torch.linalg.solve(inverse[gone[:, None], gone], inverse[gone[:, None], keep])  # (|gone|, |keep|)
        weight = weight[:, keep].addmm_(weight[:, gone], step, alpha=-1.0)
        inverse = inverse[keep[:, None], keep].addmm_(inverse[keep[:, None], gone], step, alpha=-1.0)  # one copy
        units = units[~going]
    return costs
