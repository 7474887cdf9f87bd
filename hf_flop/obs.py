"""Score ``"obs"``: what removing a head or FFN row costs once the layer is refit (Optimal Brain Surgeon).

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

Only head and row gates have a consumer to refit; rank, block and embedding gates get their
``activation`` score (the same scale: a root of output energy), so ``"obs"`` works with any levels.
The cost is about that of one reconstruction: per gate a ``d x d`` inverse and ``d^2`` work per removed
feature (``d`` = the consumer's input width), done in ``rounds`` batches of the cheapest units.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .gated import GatedUnits
from .groups import GROUP_LEVELS
from .refit import Moments
from .scores import _device, _EvalMode, activation_scores, find_gated_units, iter_calibration, reusable_batches


def obs_scores(
    model: nn.Module,
    calibration_data: Iterable,
    *,
    max_batches: int | None = None,
    rounds: int = 64,
    ridge: float = 1e-3,
) -> dict[str, torch.Tensor]:
    """OBS removal costs (see the module docstring) of every head/row unit, by gate name (other gates:
    their activation scores).

    Args:
        calibration_data: batches (dicts of tensors with ``input_ids``), as for ``compute_scores``.
        rounds: the greedy removal of a gate's units runs in at most this many steps, each removing
            the cheapest ``n / rounds`` units together (1 per step for gates of at most ``rounds`` units).
        ridge: relative ridge term of the inverse, as in ``hf_flop.reconstruct``.
    """
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds={rounds!r} must be a positive integer.")
    if ridge < 0:
        raise ValueError(f"ridge={ridge!r} must be >= 0.")
    calibration_data = reusable_batches(calibration_data)  # read twice with rank, block or embedding gates
    units = find_gated_units(model)
    grouped = [s for s in units if s.level in GROUP_LEVELS]
    scores = {}
    if len(grouped) < len(units):  # rank, block, embedding gates: nothing to refit around them
        scores = activation_scores(model, calibration_data, max_batches=max_batches)
    if grouped:
        moments = _consumer_moments(model, grouped, calibration_data, max_batches)
        scores.update({s.key: _greedy_costs(s, moments[s.key], rounds, ridge).sqrt().float().cpu() for s in grouped})
    return scores


def _consumer_moments(model: nn.Module, units: list[GatedUnits], calibration_data: Iterable, max_batches: int | None):
    """Per gate: the second moments of its consumer's input over the calibration tokens (padding dropped)."""
    found = {s.key: Moments(s.n_units * s.unit) for s in units}
    token_mask: list[torch.Tensor | None] = [None]

    def recorder(s: GatedUnits):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            mask = token_mask[0]
            found[s.key].add(x, mask if mask is not None and mask.shape == x.shape[:-1] else None)

        return hook

    # after FlopModel's input masks: units already closed read zeros and cost nothing
    handles = [s.observed.register_forward_pre_hook(recorder(s)) for s in units]
    try:
        with _EvalMode(model), torch.no_grad():
            for batch in iter_calibration(calibration_data, max_batches=max_batches, device=_device(model)):
                token_mask[0] = batch.get("attention_mask")
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    for s in units:
        if found[s.key].tokens == 0:
            raise RuntimeError(f"the calibration forward never reached {s.key}'s consumer; is it used by the model?")
    return {key: m.matrix() for key, m in found.items()}


@torch.no_grad()
def _greedy_costs(s: GatedUnits, moments: torch.Tensor, rounds: int, ridge: float) -> torch.Tensor:
    """The running-max OBS cost at which each unit of ``s`` is removed, greedily, cheapest first (float64)."""
    n, u = s.n_units, s.unit
    d = n * u
    weight = s.observed.folded_weight().detach().to(torch.float64)  # on the model's device (a GPU does this fast)
    bias = getattr(s.observed, "bias", None)
    hessian = moments.to(weight.device, copy=True)
    if bias is None:  # no bias to move: the constant feature is not part of the refit
        hessian = hessian[:d, :d]
    else:  # the bias is the weight of the constant feature, never removed
        weight = torch.cat([weight, bias.detach().to(torch.float64)[:, None]], dim=1)
    damp = ridge * hessian.diagonal()[:d].mean().clamp_min(1e-12)
    hessian[:d, :d] += damp * torch.eye(d, dtype=hessian.dtype, device=hessian.device)
    inverse, info = torch.linalg.inv_ex(hessian)
    if int(info) != 0:
        raise ValueError(
            f"the input second moment of {s.key}'s consumer is singular (some features never vary, e.g. closed "
            "units); give obs_scores a ridge above 0 (the default is 1e-3) or more varied calibration data."
        )
    alive = torch.ones(n, dtype=torch.bool, device=weight.device)
    costs = torch.zeros(n, dtype=torch.float64)
    level = 0.0
    per_round = -(-n // rounds)
    slots = torch.arange(d, device=weight.device).reshape(n, u)
    while alive.any():
        ids = alive.nonzero().squeeze(1)
        cols = slots[ids]  # (k, u)
        blocks = inverse[cols[:, :, None], cols[:, None, :]]  # (k, u, u): (H^-1)_gg per unit
        w = weight[:, cols].permute(1, 2, 0)  # (k, u, out)
        cost = (torch.linalg.solve(blocks, w) * w).sum((1, 2))  # trace(W_g [(H^-1)_gg]^-1 W_g^T)
        order = torch.argsort(cost, stable=True)[:per_round]
        for unit, value in zip(ids[order].tolist(), cost[order].tolist()):
            level = max(level, value)
            costs[unit] = level
        gone = slots[ids[order]].reshape(-1)
        # the OBS update: the other columns absorb what the removed ones carried; H^-1 loses them
        step = torch.linalg.solve(inverse[gone][:, gone], inverse[gone])  # (|gone|, D)
        weight -= weight[:, gone] @ step
        inverse -= inverse[:, gone] @ step
        weight[:, gone] = 0.0
        inverse[gone] = 0.0
        inverse[:, gone] = 0.0
        alive[ids[order]] = False
    return costs
