"""One-shot importance scores for every unit FLOP gates: magnitude, activation-aware, OBS, sensitivity.

Each gated module describes its gates with the weights their units own (``GatedUnits``, from its
``scored_units`` verb; head/row groups from ``hf_flop.groups.group_units``). A unit ``u`` writes some
features through *producer rows* and those features are read by *consumer columns*:

* rank component ``k`` of a ``FlopLinear``: producer row ``Q[k, :]``, feature ``h_k = Q[k, :] x``,
  consumer column ``P[:, k]``;
* an attention head (KV group) or FFN row of a ``StructureGroup``: the producers' output rows of the
  unit (Q/K/V, or up/gate), the consumer's input features and input columns (o / down projection);
* a weight block (level "block", a ``bs x bs`` piece of a dense weight) and the rank components of
  embedding clusters (level "embedding") likewise (see ``hf_flop.blocks``, ``hf_flop.embedding``).

Scores, one tensor per gate (higher = more important):

* ``magnitude``:   ``||C_u||_F * ||R_u||_F`` (consumer columns times producer rows). For a rank
  component at injection this is the singular value ``s_k`` (``P = U sqrt(S)``, ``Q = sqrt(S) V^T``).
* ``activation``:  ``sqrt(sum_{j in u} ||C[:, j]||^2 * E[x_j^2])``, weight times input norm as in Wanda,
  with ``E`` the mean over calibration tokens; for a rank component ``||P[:, k]|| * RMS(Q[k, :] x)``.
* ``fluctuation``: ``sum_{j in u} ||C[:, j]||^2 * Var(x_j)`` (FLAP's metric): like ``activation`` but with the
  variance instead of the mean square, since a constant input can be folded into a bias.
* ``obs``:         the output error removing the unit leaves once the consumer's other columns are refit
  (Optimal Brain Surgeon, greedily, ``hf_flop.obs``); head and row gates, other gates get ``activation``.
* ``sensitivity``: ``|dL/dz_u * z_u|``, the first-order Taylor estimate of the loss change when the
  unit's gate value ``z_u`` goes to 0, per calibration batch, then averaged (or an exponential moving
  average with ``ema_decay``). Only the gate matters here, so every gate gets it for free.
* ``fisher``: ``sum_batches (dL/dm_u)^2`` for a multiplicative mask ``m_u = 1`` on the unit's gate
  value (the diagonal of the empirical Fisher information of the mask, as in Kwon et al. 2022): the
  curvature of the loss along the unit's removal, to second order where ``sensitivity`` is first order.

A new kind of gate is scored once its module answers ``scored_units``; the scores and one-shot
pruning then work on it unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from hf_flop_cli.choices import SCORES

from .calibration import eval_mode, iter_calibration, model_device, observe_inputs
from .calibration import reusable_batches as reusable_batches  # its old home: hf_flop.scores.reusable_batches
from .gated import GatedUnits
from .groups import GROUP_LEVELS, group_units
from .model import find_flop_model
from .obs import greedy_costs
from .refit import Moments


def find_gated_units(model: nn.Module) -> list[GatedUnits]:
    """Every scoreable gate of a FLOP model (``PeftModel`` or ``FlopModel``) with its units' weights.

    Order: the targeted linears' own gates, the head/row groups, then the embedding clusters. Each
    gated module describes its own units (its ``scored_units`` verb); raises ``NotImplementedError``
    if the model has gates none describes, rather than silently leaving them out of the scores.
    """
    flop_model = find_flop_model(model)
    layers = flop_model.flop_layers()  # one walk over the modules, not one per gated module
    with torch.no_grad():
        linears = [u for name, layer in layers.items() for u in layer.scored_units(name)]
        groups = group_units(flop_model.structure_groups, flop_model.flop_structure_gates, layers)
        others = [
            u
            for name, layer in flop_model.gated_layers().items()
            if name not in layers
            for u in layer.scored_units(name)
        ]
    found = linears + groups + others
    missing = sorted(set(flop_model.gates()) - {u.key for u in found})
    if missing:
        raise NotImplementedError(
            f"one-shot scores do not cover the gates {missing[:5]}{' ...' if len(missing) > 5 else ''} yet; "
            "give the module that holds them a scored_units verb (hf_flop.gated)."
        )
    return found


# --- the scores ---------------------------------------------------------------------------------------


def magnitude_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """``||consumer columns|| * ||producer rows||`` per unit (singular values for fresh rank components)."""
    return {
        s.key: (s.column_sq_norms.reshape(s.n_units, s.unit).sum(1) * s.row_sq_norms).sqrt().cpu()
        for s in find_gated_units(model)
    }


def activation_scores(
    model: nn.Module, calibration_data: Iterable, *, max_batches: int | None = None
) -> dict[str, torch.Tensor]:
    """Wanda-like ``sqrt(sum_j ||C[:, j]||^2 E[x_j^2])`` per unit, from forward passes over calibration batches."""
    units = find_gated_units(model)
    mean_sq, _ = _feature_moments(model, units, calibration_data, max_batches)
    return {s.key: (s.column_sq_norms * mean_sq[s.key]).reshape(s.n_units, s.unit).sum(1).sqrt().cpu() for s in units}


def fluctuation_scores(
    model: nn.Module, calibration_data: Iterable, *, max_batches: int | None = None
) -> dict[str, torch.Tensor]:
    """FLAP's ``sum_j ||C[:, j]||^2 Var(x_j)`` per unit: what the unit's output varies, not its mean (which a bias
    can stand in for, see ``hf_flop.reconstruct``)."""
    units = find_gated_units(model)
    mean_sq, mean = _feature_moments(model, units, calibration_data, max_batches)
    return {
        s.key: (s.column_sq_norms * (mean_sq[s.key] - mean[s.key] ** 2).clamp_min(0.0))
        .reshape(s.n_units, s.unit)
        .sum(1)
        .cpu()
        for s in units
    }


def _feature_moments(model: nn.Module, units: list[GatedUnits], calibration_data: Iterable, max_batches: int | None):
    """Per gate: ``E[x_j^2]`` and ``E[x_j]`` of each unit slot's feature over the calibration tokens."""
    sq_sums: dict[str, torch.Tensor] = {}
    sums: dict[str, torch.Tensor] = {}
    tokens = {s.key: 0 for s in units}
    by_key = {s.key: s for s in units}

    def record(key: str, x: torch.Tensor, token_mask: torch.Tensor | None) -> None:
        s = by_key[key]
        features = (x if s.features is None else s.features(x)).float()
        features = features.reshape(-1, features.shape[-1])
        for store, value in ((sq_sums, features.pow(2).sum(0)), (sums, features.sum(0))):
            store[s.key] = store[s.key] + value if s.key in store else value
        tokens[s.key] += features.shape[0]

    # after FlopModel's input masks (not prepended): the masked inputs, as the gates see them
    observe_inputs(model, {s.key: s.observed for s in units}, calibration_data, record, max_batches=max_batches)
    mean_sq, mean = {}, {}
    for s in units:
        if s.key not in sq_sums:
            raise RuntimeError(f"the calibration forward never reached {s.key}'s module; is it used by the model?")
        n = max(tokens[s.key], 1)
        mean_sq[s.key], mean[s.key] = sq_sums[s.key] / n, sums[s.key] / n
        if s.feature_index is not None:
            mean_sq[s.key], mean[s.key] = mean_sq[s.key][s.feature_index], mean[s.key][s.feature_index]
    return mean_sq, mean


def obs_scores(
    model: nn.Module,
    calibration_data: Iterable,
    *,
    max_batches: int | None = None,
    rounds: int = 64,
    ridge: float = 1e-3,
) -> dict[str, torch.Tensor]:
    """OBS costs (``hf_flop.obs``) of every head/row unit: what removing it leaves once its consumer's other
    columns are refit, greedily; other gates (rank, block, embedding) get their activation scores.

    ``rounds`` and ``ridge`` are ``hf_flop.obs.greedy_costs``'s.
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
        for s in grouped:
            weight, bias = s.observed.folded_weight(), s.observed.bias
            costs = greedy_costs(weight, bias, moments[s.key], s.unit, rounds=rounds, ridge=ridge, name=s.key)
            scores[s.key] = costs.sqrt().float().cpu()
    return scores


def _consumer_moments(model: nn.Module, units: list[GatedUnits], calibration_data: Iterable, max_batches: int | None):
    """Per head/row gate: ``E[x^ x^T]`` of its consumer's input over the calibration tokens (padding dropped)."""
    found = {s.key: Moments(s.n_units * s.unit) for s in units}

    def record(key: str, x: torch.Tensor, token_mask: torch.Tensor | None) -> None:
        found[key].add(x, token_mask)

    # units already closed read zeros (the input masks act first) and cost nothing
    observe_inputs(model, {s.key: s.observed for s in units}, calibration_data, record, max_batches=max_batches)
    for s in units:
        if found[s.key].tokens == 0:
            raise RuntimeError(f"the calibration forward never reached {s.key}'s consumer; is it used by the model?")
    return {key: m.matrix() for key, m in found.items()}


def sensitivity_scores(
    model: nn.Module,
    calibration_data: Iterable,
    *,
    max_batches: int | None = None,
    ema_decay: float | None = None,
) -> dict[str, torch.Tensor]:
    """First-order Taylor ``|dL/dz * z|`` per unit, averaged over batches (or an EMA with ``ema_decay``)."""
    if ema_decay is not None and not 0.0 < ema_decay < 1.0:
        raise ValueError(f"ema_decay={ema_decay!r} must be in (0, 1) (e.g. 0.9), or None for a plain mean.")
    scores: dict[str, torch.Tensor] = {}
    for step, grads in enumerate(_mask_gradients(model, calibration_data, max_batches, "sensitivity"), start=1):
        for key, grad in grads.items():
            taylor = grad.abs()
            if key not in scores:
                scores[key] = taylor
            elif ema_decay is None:
                scores[key] = scores[key] + (taylor - scores[key]) / step  # running mean
            else:
                scores[key] = ema_decay * scores[key] + (1.0 - ema_decay) * taylor
    return scores


def fisher_scores(
    model: nn.Module, calibration_data: Iterable, *, max_batches: int | None = None
) -> dict[str, torch.Tensor]:
    """Empirical Fisher ``sum_batches (dL/dm)^2`` of a multiplicative mask on each unit's gate value."""
    scores: dict[str, torch.Tensor] = {}
    for grads in _mask_gradients(model, calibration_data, max_batches, "fisher"):
        for key, grad in grads.items():
            scores[key] = scores[key] + grad.pow(2) if key in scores else grad.pow(2)
    return scores


def _mask_gradients(model: nn.Module, calibration_data: Iterable, max_batches: int | None, score: str):
    """Per calibration batch: ``{gate name: dL/dm}`` for a mask ``m`` of ones multiplying each gate's output.

    ``dL/dm = dL/dz * z``: the derivative along the unit's removal. Only the masks get gradients:
    model ``.grad`` fields are left untouched. ``score`` is the score asking, for the errors.
    """
    needs_labels = f"score={score!r}"
    units = find_gated_units(model)
    probes = {s.key: torch.ones(s.n_units, device=model_device(model), requires_grad=True) for s in units}

    def prober(probe: torch.Tensor):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            return output * probe.to(output.dtype)

        return hook

    handles = [s.gate.register_forward_hook(prober(probes[s.key])) for s in units]
    try:
        with eval_mode(model), torch.enable_grad():
            for batch in iter_calibration(
                calibration_data, needs_labels=needs_labels, max_batches=max_batches, device=model_device(model)
            ):
                loss = model(**batch).loss
                if loss is None:
                    raise ValueError("the model returned no loss for a calibration batch; check its 'labels'.")
                grads = torch.autograd.grad(loss, list(probes.values()), allow_unused=True)
                yield {
                    s.key: grad.detach().cpu() if grad is not None else torch.zeros(s.n_units)
                    for s, grad in zip(units, grads)
                }
    finally:
        for handle in handles:
            handle.remove()


def compute_scores(
    model: nn.Module,
    calibration_data: Iterable | None = None,
    score: str = "magnitude",
    *,
    max_batches: int | None = None,
    ema_decay: float | None = None,
) -> dict[str, torch.Tensor]:
    """Scores of every gated unit, by gate name (``FlopModel.gates()`` keys): one tensor of ``n`` per gate.

    ``score`` is ``"magnitude"`` (no data needed), ``"activation"`` / ``"fluctuation"`` / ``"obs"`` (``hf_flop.obs``:
    the cost left after the refit, for head and row gates), or ``"sensitivity"`` / ``"fisher"``
    (batches with ``labels``). The scores reflect the gates as they are: open all gates first to score
    the dense model.
    """
    if score not in SCORES:
        raise ValueError(f"score={score!r} is not known; use one of {list(SCORES)}.")
    if score != "sensitivity" and ema_decay is not None:
        raise ValueError("ema_decay applies to score='sensitivity' only.")
    if score == "magnitude":
        return magnitude_scores(model)
    if score == "activation":
        return activation_scores(model, calibration_data, max_batches=max_batches)
    if score == "fisher":
        return fisher_scores(model, calibration_data, max_batches=max_batches)
    if score == "fluctuation":
        return fluctuation_scores(model, calibration_data, max_batches=max_batches)
    if score == "obs":
        return obs_scores(model, calibration_data, max_batches=max_batches)
    return sensitivity_scores(model, calibration_data, max_batches=max_batches, ema_decay=ema_decay)
