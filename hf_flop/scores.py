"""One-shot importance scores for every structure FLOP gates: magnitude, activation-aware, sensitivity.

A *structure* is one gate and the weights its units own. Each unit ``u`` writes some features
through *producer rows* and those features are read by *consumer columns*:

* rank component ``k`` of a ``FlopLinear``: producer row ``Q[k, :]``, feature ``h_k = Q[k, :] x``,
  consumer column ``P[:, k]``;
* an attention head (KV group) or FFN row of a ``StructureGroup``: the producers' output rows of the
  unit (Q/K/V, or up/gate), the consumer's input features and input columns (o / down projection).

Scores, one tensor per gate (higher = more important):

* ``magnitude``:   ``||C_u||_F * ||R_u||_F`` (consumer columns times producer rows). For a rank
  component at injection this is the singular value ``s_k`` (``P = U sqrt(S)``, ``Q = sqrt(S) V^T``).
* ``activation``:  ``sqrt(sum_{j in u} ||C[:, j]||^2 * E[x_j^2])``, weight times input norm as in Wanda,
  with ``E`` the mean over calibration tokens; for a rank component ``||P[:, k]|| * RMS(Q[k, :] x)``.
* ``sensitivity``: ``|dL/dz_u * z_u|``, the first-order Taylor estimate of the loss change when the
  unit's gate value ``z_u`` goes to 0, per calibration batch, then averaged (or an exponential moving
  average with ``ema_decay``). Only the gate matters here, so every structure gets it for free.

Blocks (level "block", a ``bs x bs`` piece of a dense weight: magnitude is its Frobenius norm) and
the rank components of embedding clusters (level "embedding") are structures too. A new kind of gate
plugs in by appending a finder ``FlopModel -> list[Structure]`` to ``STRUCTURE_FINDERS``; the three
scores and one-shot pruning then work on it unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .accounting import find_flop_model
from .gates import Gate

SCORES = ("magnitude", "activation", "sensitivity")


@dataclass
class Structure:
    """One gate over ``n_units`` units, with what the scores need to know about the units.

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
    layer: str | None = None  # report module whose min(factorized, dense) count the gate sets (rank, clusters)


def _rank_structures(flop_model) -> list[Structure]:
    found = []
    for name, layer in flop_model.flop_layers().items():
        if not layer.factorized:
            continue
        p, q = (t.detach() for t in layer.factors())
        found.append(
            Structure(
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
                layer=name,
            )
        )
    return found


def _project(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x.to(q.dtype), q)


def _group_structures(flop_model) -> list[Structure]:
    layers = flop_model.flop_layers()
    found = []
    for group in flop_model.structure_groups:
        consumer = layers[group.consumer]
        # the current effective weights, so head/row scores see what rank pruning left
        columns = consumer.folded_weight().float()
        rows = torch.zeros(group.n_units, device=columns.device)
        unit_params = group.consumer_unit * consumer.out_features
        for seg in group.producers:
            producer = layers[seg.module]
            weight = producer.folded_weight().float()
            block = weight[seg.offset : seg.offset + group.n_units * seg.unit]
            rows += block.reshape(group.n_units, -1).pow(2).sum(1)
            unit_params += seg.unit * producer.in_features
        found.append(
            Structure(
                key=group.key,
                level=group.level,
                gate=flop_model.flop_structure_gates[group.key],
                n_units=group.n_units,
                unit=group.consumer_unit,
                unit_params=unit_params,
                observed=consumer,
                column_sq_norms=columns.pow(2).sum(0),
                row_sq_norms=rows,
            )
        )
    return found


def _block_structures(flop_model) -> list[Structure]:
    """Level "block": a unit is a ``bs x bs`` block (i, j) of a dense weight, reading inputs ``j*bs..``."""
    found = []
    for name, layer in flop_model.flop_layers().items():
        if not layer.block_size:
            continue
        bs = layer.block_size
        rows, cols = layer.out_features // bs, layer.in_features // bs
        weight = layer.folded_weight().float()
        column_sq = weight.reshape(rows, bs, cols, bs).pow(2).sum(1)  # (rows, cols, bs): unit i*cols + j
        index = (torch.arange(cols)[:, None] * bs + torch.arange(bs)).repeat(rows, 1).flatten()
        found.append(
            Structure(
                key=f"{name}.block",
                level="block",
                gate=layer.block_gate,
                n_units=rows * cols,
                unit=bs,
                unit_params=bs * bs,
                observed=layer,
                column_sq_norms=column_sq.flatten(),
                row_sq_norms=torch.ones(rows * cols, device=weight.device),
                feature_index=index.to(weight.device),
            )
        )
    return found


def _embedding_structures(flop_model) -> list[Structure]:
    """Level "embedding": rank components of each vocabulary cluster ``E_c = P_c diag(z) Q_c``.

    A token of cluster c reads row ``P_c[t]``, so its features are ``P_c[t, k]`` (0 for other tokens)
    and ``Q_c[k]`` is the consumer: the activation score weighs clusters by how often their tokens
    occur in the calibration data. A tied head's use of the same clusters is left out of it.
    """
    from .embedding import FlopEmbedding

    found = []
    for name, embedding in flop_model.model.named_modules():
        if not isinstance(embedding, FlopEmbedding):
            continue
        start = 0
        for c, (p, q, gate) in enumerate(zip(embedding.flop_P, embedding.flop_Q, embedding.flop_gates)):
            p, q = p.detach(), q.detach()
            found.append(
                Structure(
                    key=f"{name}.embedding_{c}",
                    level="embedding",
                    gate=gate,
                    n_units=q.shape[0],
                    unit=1,
                    unit_params=p.shape[0] + embedding.hidden,
                    observed=embedding,
                    column_sq_norms=q.float().pow(2).sum(1),
                    row_sq_norms=p.float().pow(2).sum(0),
                    features=functools.partial(_cluster_rows, embedding.position, p, start),
                    layer=f"{name}.cluster_{c}",
                )
            )
            start += p.shape[0]
    return found


def _cluster_rows(position: torch.Tensor, p: torch.Tensor, start: int, input_ids: torch.Tensor) -> torch.Tensor:
    pos = position[input_ids]
    inside = (pos >= start) & (pos < start + p.shape[0])
    out = p.new_zeros(*input_ids.shape, p.shape[1])
    out[inside] = p[pos[inside] - start]
    return out


STRUCTURE_FINDERS: list[Callable[..., list[Structure]]] = [
    _rank_structures,
    _group_structures,
    _block_structures,
    _embedding_structures,
]
"""Each finder maps a ``FlopModel`` to the structures it knows; append one for a new kind of gate."""


def find_structures(model: nn.Module) -> list[Structure]:
    """Every scoreable structure of a FLOP model (``PeftModel`` or ``FlopModel``), in a fixed order.

    Raises ``NotImplementedError`` if the model has gates no finder covers, rather than silently
    leaving them out of the scores.
    """
    flop_model = find_flop_model(model)
    with torch.no_grad():
        structures = [s for finder in STRUCTURE_FINDERS for s in finder(flop_model)]
    missing = sorted(set(flop_model.gates()) - {s.key for s in structures})
    if missing:
        raise NotImplementedError(
            f"one-shot scores do not cover the gates {missing[:5]}{' ...' if len(missing) > 5 else ''} yet; "
            "add a finder for that structure to hf_flop.scores.STRUCTURE_FINDERS."
        )
    return structures


# --- calibration data --------------------------------------------------------------------------------


def _check_batch(index: int, batch: object, need_labels: bool) -> Mapping:
    if isinstance(batch, (str, bytes)):
        raise TypeError(
            f"calibration batch {index} is text ({batch[:40]!r}...); tokenize first, e.g. "
            "[tokenizer(texts, return_tensors='pt', padding=True)], and pass the batches of tensors."
        )
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"calibration batch {index} is a {type(batch).__name__}; each batch must be a dict of tensors "
            "with at least 'input_ids' (what a tokenizer with return_tensors='pt' or a DataLoader yields)."
        )
    if "input_ids" not in batch:
        raise ValueError(f"calibration batch {index} has no 'input_ids' (its keys: {sorted(batch)}).")
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"calibration batch {index}['{key}'] is a {type(value).__name__}, not a tensor; tokenize with "
                "return_tensors='pt' and drop text columns (e.g. dataset.remove_columns) before batching."
            )
    ids = batch["input_ids"]
    if ids.dim() != 2 or ids.dtype.is_floating_point:
        raise ValueError(
            f"calibration batch {index}['input_ids'] must be a 2-D integer tensor (batch, length), "
            f"got shape {tuple(ids.shape)} dtype {ids.dtype}."
        )
    if need_labels and "labels" not in batch:
        raise ValueError(
            f"sensitivity scores need a loss, but calibration batch {index} has no 'labels'. Add them: for "
            "causal LMs labels=input_ids (the model shifts them), for classifiers the class ids."
        )
    return batch


def iter_calibration(
    calibration_data: Iterable[Mapping[str, torch.Tensor]] | None,
    *,
    need_labels: bool = False,
    max_batches: int | None = None,
    device: torch.device | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Validated batches of ``calibration_data`` (an iterable of dicts of tensors, e.g. a DataLoader).

    Every malformed input raises a ``TypeError`` / ``ValueError`` saying what to pass instead.
    """
    if calibration_data is None:
        raise ValueError(
            "this score needs calibration_data: an iterable of batches (dicts with 'input_ids', and "
            "'labels' for sensitivity), e.g. a torch DataLoader or [tokenizer(texts, return_tensors='pt')]."
        )
    if isinstance(calibration_data, (str, bytes, Mapping, torch.Tensor)):
        raise TypeError(
            f"calibration_data is a single {type(calibration_data).__name__}; pass an iterable of batches "
            "(each a dict of tensors with 'input_ids'), e.g. [batch] or a DataLoader."
        )
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches={max_batches!r} must be a positive integer or None (all batches).")
    try:
        iterator = iter(calibration_data)
    except TypeError:
        raise TypeError(
            f"calibration_data of type {type(calibration_data).__name__} is not iterable; pass a list of "
            "batches or a DataLoader."
        ) from None
    count = 0
    for index, batch in enumerate(iterator):
        if max_batches is not None and index >= max_batches:
            break
        batch = _check_batch(index, batch, need_labels)
        count += 1
        yield {key: value.to(device) if device is not None else value for key, value in batch.items()}
    if count == 0:
        raise ValueError("calibration_data yielded no batches; give at least one.")


class _EvalMode:
    """Run the model in eval mode (no dropout, deterministic masks), restoring its mode afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc) -> None:
        self.model.train(self.was_training)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# --- the three scores ----------------------------------------------------------------------------------


def magnitude_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """``||consumer columns|| * ||producer rows||`` per unit (singular values for fresh rank components)."""
    return {
        s.key: (s.column_sq_norms.reshape(s.n_units, s.unit).sum(1) * s.row_sq_norms).sqrt().cpu()
        for s in find_structures(model)
    }


def activation_scores(
    model: nn.Module, calibration_data: Iterable, *, max_batches: int | None = None
) -> dict[str, torch.Tensor]:
    """Wanda-like ``sqrt(sum_j ||C[:, j]||^2 E[x_j^2])`` per unit, from forward passes over calibration batches."""
    structures = find_structures(model)
    sq_sums: dict[str, torch.Tensor] = {}
    tokens = {s.key: 0 for s in structures}

    def recorder(s: Structure):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            features = (x if s.features is None else s.features(x)).float()
            total = features.pow(2).reshape(-1, features.shape[-1]).sum(0)
            sq_sums[s.key] = sq_sums[s.key] + total if s.key in sq_sums else total
            tokens[s.key] += features.numel() // features.shape[-1]

        return hook

    # registered after FlopModel's input masks, so the statistics see the masked inputs
    handles = [s.observed.register_forward_pre_hook(recorder(s)) for s in structures]
    try:
        with _EvalMode(model), torch.no_grad():
            for batch in iter_calibration(calibration_data, max_batches=max_batches, device=_device(model)):
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    scores = {}
    for s in structures:
        if s.key not in sq_sums:
            raise RuntimeError(f"the calibration forward never reached {s.key}'s module; is it used by the model?")
        mean_sq = sq_sums[s.key] / max(tokens[s.key], 1)
        if s.feature_index is not None:
            mean_sq = mean_sq[s.feature_index]
        scores[s.key] = (s.column_sq_norms * mean_sq).reshape(s.n_units, s.unit).sum(1).sqrt().cpu()
    return scores


def sensitivity_scores(
    model: nn.Module,
    calibration_data: Iterable,
    *,
    max_batches: int | None = None,
    ema_decay: float | None = None,
) -> dict[str, torch.Tensor]:
    """First-order Taylor ``|dL/dz * z|`` per unit, averaged over batches (or an EMA with ``ema_decay``).

    Each gate's output is multiplied by a probe of ones; the gradient of the loss w.r.t. the probe is
    exactly ``dL/dz * z``. Only the probes get gradients: model ``.grad`` fields are left untouched.
    """
    if ema_decay is not None and not 0.0 < ema_decay < 1.0:
        raise ValueError(f"ema_decay={ema_decay!r} must be in (0, 1) (e.g. 0.9), or None for a plain mean.")
    structures = find_structures(model)
    probes = {s.key: torch.ones(s.n_units, device=_device(model), requires_grad=True) for s in structures}

    def prober(probe: torch.Tensor):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            return output * probe.to(output.dtype)

        return hook

    handles = [s.gate.register_forward_hook(prober(probes[s.key])) for s in structures]
    scores: dict[str, torch.Tensor] = {}
    steps = 0
    try:
        with _EvalMode(model), torch.enable_grad():
            for batch in iter_calibration(
                calibration_data, need_labels=True, max_batches=max_batches, device=_device(model)
            ):
                loss = model(**batch).loss
                if loss is None:
                    raise ValueError("the model returned no loss for a calibration batch; check its 'labels'.")
                grads = torch.autograd.grad(loss, list(probes.values()), allow_unused=True)
                steps += 1
                for s, grad in zip(structures, grads):
                    taylor = grad.detach().abs().cpu() if grad is not None else torch.zeros(s.n_units)
                    if s.key not in scores:
                        scores[s.key] = taylor
                    elif ema_decay is None:
                        scores[s.key] = scores[s.key] + (taylor - scores[s.key]) / steps  # running mean
                    else:
                        scores[s.key] = ema_decay * scores[s.key] + (1.0 - ema_decay) * taylor
    finally:
        for handle in handles:
            handle.remove()
    return scores


def compute_scores(
    model: nn.Module,
    calibration_data: Iterable | None = None,
    score: str = "magnitude",
    *,
    max_batches: int | None = None,
    ema_decay: float | None = None,
) -> dict[str, torch.Tensor]:
    """Scores of every gated unit, by gate name (``FlopModel.gates()`` keys): one tensor of ``n`` per gate.

    ``score`` is ``"magnitude"`` (no data needed), ``"activation"`` or ``"sensitivity"`` (batches with
    ``labels``). The scores reflect the gates as they are: open all gates first to score the dense model.
    """
    if score not in SCORES:
        raise ValueError(f"score={score!r} is not known; use one of {list(SCORES)}.")
    if score != "sensitivity" and ema_decay is not None:
        raise ValueError("ema_decay applies to score='sensitivity' only.")
    if score == "magnitude":
        return magnitude_scores(model)
    if score == "activation":
        return activation_scores(model, calibration_data, max_batches=max_batches)
    return sensitivity_scores(model, calibration_data, max_batches=max_batches, ema_decay=ema_decay)
