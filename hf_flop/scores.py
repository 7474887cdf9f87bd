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
pruning then work on it unchanged. A new score is one function decorated with ``register_score``
(``SCORE_TYPES``); ``compute_scores`` dispatches through the registry.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .calibration import eval_mode, iter_calibration, model_device, observe_inputs
from .calibration import reusable_batches as reusable_batches  # its old home: hf_flop.scores.reusable_batches
from .config import FlopConfig
from .depth import DEPTH_GATES, depth_gated_units
from .depth_scores import block_influence, skip_losses
from .experts import EXPERT_ROW_LEVEL
from .gated import GatedUnits
from .groups import GROUP_LEVELS, group_units
from .lookup import find_flop_model
from .obs import greedy_costs
from .refit import Moments

ScoreFunction = Callable[..., dict[str, torch.Tensor]]
# the gates whose units have a consumer to refit (score "obs"): heads, FFN rows, and each expert's rows
OBS_LEVELS = (*GROUP_LEVELS, EXPERT_ROW_LEVEL)


@dataclass(frozen=True)
class ScoreType:
    """A registered score: the function that computes it, and what it needs from the calibration data."""

    name: str
    function: ScoreFunction
    needs_data: bool
    needs_labels: bool

    @property
    def options(self) -> frozenset[str]:
        """The function's keyword-only parameters besides ``max_batches`` (e.g. ``ema_decay``)."""
        parameters = inspect.signature(self.function).parameters.values()
        return frozenset(p.name for p in parameters if p.kind is p.KEYWORD_ONLY and p.name != "max_batches")

    def __call__(self, model: nn.Module, calibration_data: Iterable | None, **options) -> dict[str, torch.Tensor]:
        if self.needs_data:
            return self.function(model, calibration_data, **options)
        return self.function(model, **{k: v for k, v in options.items() if k != "max_batches"})


# score name -> its ScoreType, in registration order
SCORE_TYPES: dict[str, ScoreType] = {}


def register_score(name: str, *, needs_data: bool, needs_labels: bool) -> Callable[[ScoreFunction], ScoreFunction]:
    """Register the decorated function as the score ``name`` of ``compute_scores`` and ``prune_oneshot``.

    The function returns ``{gate name: one score per unit}`` (higher = more important) and takes
    ``(model)`` when it needs no data (``needs_data=False``), else ``(model, calibration_data, *,
    max_batches=None, ...)``; its other keyword-only parameters are options ``compute_scores`` passes
    on. ``needs_labels``: every batch must hold ``labels`` (the score needs a loss).
    """
    if name in SCORE_TYPES:
        raise ValueError(f"score {name!r} is registered already; pick another name.")
    if needs_labels and not needs_data:
        raise ValueError(f"score {name!r}: needs_labels=True needs needs_data=True (labels come with the data).")

    def register(function: ScoreFunction) -> ScoreFunction:
        SCORE_TYPES[name] = ScoreType(name, function, needs_data, needs_labels)
        return function

    return register


def score_type(score: str, calibration_data: Iterable | None) -> ScoreType:
    """The registered ``score``, checked to have the calibration data it needs (``calibration_data``)."""
    if score not in SCORE_TYPES:
        raise ValueError(f"score={score!r} is not known; use one of {list(SCORE_TYPES)}.")
    spec = SCORE_TYPES[score]
    if spec.needs_data and calibration_data is None:
        labels = ", and 'labels' for its loss" if spec.needs_labels else ""
        without = ", ".join(repr(n) for n, t in SCORE_TYPES.items() if not t.needs_data)
        raise ValueError(
            f"score={score!r} needs calibration_data: an iterable of batches (dicts of tensors with 'input_ids'{labels}), "
            f"e.g. a torch DataLoader or [tokenizer(texts, return_tensors='pt')]; {without} need(s) none."
        )
    return spec


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
        groups += depth_gated_units(flop_model)
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


@register_score("magnitude", needs_data=False, needs_labels=False)
def magnitude_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """``||consumer columns|| * ||producer rows||`` per unit (singular values for fresh rank components)."""
    return {
        s.key: (s.column_sq_norms.reshape(s.n_units, s.unit).sum(1) * s.row_sq_norms).sqrt().cpu()
        for s in find_gated_units(model)
    }


@register_score("activation", needs_data=True, needs_labels=False)
def activation_scores(
    model: nn.Module, calibration_data: Iterable, *, max_batches: int | None = None
) -> dict[str, torch.Tensor]:
    """Wanda-like ``sqrt(sum_j ||C[:, j]||^2 E[x_j^2])`` per unit, from forward passes over calibration batches
    (the depth gate: its Block Influence)."""
    units, calibration_data = _observed_units(model, calibration_data)
    mean_sq, _ = _feature_moments(model, units, calibration_data, max_batches)
    scores = {s.key: (s.column_sq_norms * mean_sq[s.key]).reshape(s.n_units, s.unit).sum(1).sqrt().cpu() for s in units}
    return {**scores, **block_influence(model, calibration_data, max_batches)}


def _observed_units(model: nn.Module, calibration_data: Iterable) -> tuple[list[GatedUnits], Iterable]:
    """The gates whose units have consumer columns to weigh (all but the depth gate), and the data made
    reusable when the depth gate's Block Influence will read it once more."""
    units = find_gated_units(model)
    observed = [s for s in units if s.observed is not None]
    return observed, reusable_batches(calibration_data) if len(observed) < len(units) else calibration_data


@register_score("fluctuation", needs_data=True, needs_labels=False)
def fluctuation_scores(
    model: nn.Module, calibration_data: Iterable, *, max_batches: int | None = None
) -> dict[str, torch.Tensor]:
    """FLAP's ``sum_j ||C[:, j]||^2 Var(x_j)`` per unit: what the unit's output varies, not its mean (which a bias
    can stand in for, see ``hf_flop.reconstruct``); the depth gate gets its Block Influence."""
    units, calibration_data = _observed_units(model, calibration_data)
    mean_sq, mean = _feature_moments(model, units, calibration_data, max_batches)
    scores = {
        s.key: (s.column_sq_norms * (mean_sq[s.key] - mean[s.key] ** 2).clamp_min(0.0))
        .reshape(s.n_units, s.unit)
        .sum(1)
        .cpu()
        for s in units
    }
    return {**scores, **block_influence(model, calibration_data, max_batches)}


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
        if s.key not in sq_sums and s.routed:  # an expert no calibration token was routed to: it carries nothing
            sq_sums[s.key] = sums[s.key] = torch.zeros(s.n_units * s.unit, device=s.column_sq_norms.device)
        if s.key not in sq_sums:
            raise RuntimeError(f"the calibration forward never reached {s.key}'s module; is it used by the model?")
        n = max(tokens[s.key], 1)
        mean_sq[s.key], mean[s.key] = sq_sums[s.key] / n, sums[s.key] / n
        if s.feature_index is not None:
            mean_sq[s.key], mean[s.key] = mean_sq[s.key][s.feature_index], mean[s.key][s.feature_index]
    return mean_sq, mean


@register_score("obs", needs_data=True, needs_labels=False)
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
    grouped = [s for s in units if s.level in OBS_LEVELS]
    scores = {}
    if len(grouped) < len(units):  # rank, block, embedding gates: nothing to refit around them
        scores = activation_scores(model, calibration_data, max_batches=max_batches)
    if grouped:
        moments = _consumer_moments(model, grouped, calibration_data, max_batches)
        for s in grouped:
            if moments[s.key] is None:  # an expert no calibration token was routed to: removing it costs nothing
                scores[s.key] = torch.zeros(s.n_units)
                continue
            weight, bias, moment = s.observed.folded_weight(), s.observed.bias, moments[s.key]
            if s.feature_index is not None:  # a unit's features apart (query-head slots): put them unit-major
                index = s.feature_index.to(weight.device)
                weight, moment = weight[:, index], moment[index.to(moment.device)][:, index.to(moment.device)]
            costs = greedy_costs(weight, bias, moment, s.unit, rounds=rounds, ridge=ridge, name=s.key)
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
        if found[s.key].tokens == 0 and not s.routed:
            raise RuntimeError(f"the calibration forward never reached {s.key}'s consumer; is it used by the model?")
    return {key: m.matrix() if m.tokens else None for key, m in found.items()}


@register_score("sensitivity", needs_data=True, needs_labels=True)
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


@register_score("fisher", needs_data=True, needs_labels=True)
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
    needs_labels = f"score={score!r}" if SCORE_TYPES[score].needs_labels else None
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


@register_score("block_influence", needs_data=True, needs_labels=False)
def block_influence_scores(
    model: nn.Module, calibration_data: Iterable, *, max_batches: int | None = None
) -> dict[str, torch.Tensor]:
    """Block Influence ``1 - cos(h_in, h_out)`` of each transformer layer (or sublayer) of the depth gate (level
    ``"layer"``, ``hf_flop.depth_scores``); the other gates get their activation scores."""
    return activation_scores(model, calibration_data, max_batches=max_batches)


@register_score("skip_loss", needs_data=True, needs_labels=True)
def skip_loss_scores(
    model: nn.Module, calibration_data: Iterable, *, max_batches: int | None = None
) -> dict[str, torch.Tensor]:
    """The calibration loss increase when a layer (or sublayer) of the depth gate is skipped, measured
    (``hf_flop.depth_scores``); the other gates get its first-order estimate, their sensitivity scores."""
    calibration_data = reusable_batches(calibration_data)
    flop_model = find_flop_model(model)
    scores = {}
    if set(flop_model.gates()) - set(DEPTH_GATES):
        scores = sensitivity_scores(model, calibration_data, max_batches=max_batches)
    return {**scores, **skip_losses(model, calibration_data, max_batches)}


# the built-in scores' names, in registration order (the command line keeps a literal copy for --help)
SCORES = tuple(SCORE_TYPES)


def recommended_oneshot_score(config: FlopConfig) -> str:
    """The score one-shot pruning uses when none is asked for: ``"obs"``, but ``"activation"`` when
    ``config.uniform_shapes``.

    Measured with the refit and a recovery fine-tune at the same budget: ``obs`` led on MiniLM and tied
    on SmolLM2 with per-layer shapes, but with uniform shapes it lost on SmolLM2 (perplexity 74.8
    against activation's 63.3), where every layer must give up the same units whatever they cost.
    ``prune_oneshot``, ``PruningArguments`` and the command line all default to it.
    """
    return "activation" if config.uniform_shapes else "obs"


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
    the cost left after the refit, for head and row gates), ``"sensitivity"`` / ``"fisher"`` (batches
    with ``labels``), or any score registered with ``register_score``; ``ema_decay`` goes to the
    scores that take it (``sensitivity``). The scores reflect the gates as they are: open all gates
    first to score the dense model.
    """
    spec = score_type(score, calibration_data)
    options = {"max_batches": max_batches}
    if ema_decay is not None:
        if "ema_decay" not in spec.options:
            takers = [f"score={n!r}" for n, t in SCORE_TYPES.items() if "ema_decay" in t.options]
            raise ValueError(f"ema_decay applies to {' / '.join(takers)} only.")
        options["ema_decay"] = ema_decay
    return spec(model, calibration_data, **options)
