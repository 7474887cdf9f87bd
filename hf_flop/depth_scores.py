"""One-shot scores of the depth gate (level ``"layer"``): Block Influence and the loss of skipping a unit.

* ``block_influence``: ``1 - cos(h_in, h_out)`` of a unit's input and output hidden states, the mean
  over calibration tokens (padding left out) -- how much the layer turns the residual stream (Men et
  al. 2024, "ShortGPT"). For a sublayer, ``h_in`` is the residual stream before it and ``h_out``
  that stream plus its branch (``h`` + attention, then + FFN): exact where the branch is added as is.
* ``skip_losses``: the calibration loss with the unit skipped (its gate value forced to 0, everything
  else as it is) minus the loss with nothing skipped: what removing the unit costs, measured.

``hf_flop.scores`` registers them (``"block_influence"``, ``"skip_loss"``) and gives the other gates
of a model their activation / sensitivity scores; the activation-style scores give the depth gate its
Block Influence (a layer has no consumer columns to weigh).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F

from .calibration import eval_mode, iter_calibration, model_device
from .depth import depth_gate, units_of
from .lookup import find_flop_model


def _token_mask(batch: dict, like: torch.Tensor) -> torch.Tensor:
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2 or mask.shape != like.shape:
        return torch.ones_like(like)
    return mask.to(like.dtype)


@torch.no_grad()
def block_influence(model: nn.Module, calibration_data: Iterable, max_batches: int | None = None) -> dict:
    """``{depth gate name: 1 - mean cos(h_in, h_out) per unit}``; ``{}`` for a model without level ``"layer"``."""
    flop_model = find_flop_model(model)
    units = units_of(flop_model)
    if not units:
        return {}
    modules = dict(flop_model.model.named_modules())
    sums = torch.zeros(len(units), dtype=torch.float64)
    tokens = torch.zeros(len(units), dtype=torch.float64)
    current: dict[str, dict] = {"batch": {}}
    branches: dict[int, torch.Tensor] = {}
    by_layer: dict[str, list] = {}
    for u in units:
        by_layer.setdefault(u.layer, []).append(u)

    def add(index: int, before: torch.Tensor, after: torch.Tensor) -> None:
        cos = F.cosine_similarity(before.float(), after.float(), dim=-1)
        mask = _token_mask(current["batch"], cos)
        sums[index] += float(((1.0 - cos) * mask).sum())
        tokens[index] += float(mask.sum())

    def branch_hook(index: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            branches[index] = output

        return hook

    def layer_hook(layer_units: list):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            if layer_units[0].part == "layer":
                add(layer_units[0].index, hidden, out)
                return
            stream = hidden  # the residual stream before each sublayer, then with its branch added
            for u in layer_units:
                after = stream + branches.pop(u.index)
                add(u.index, stream, after)
                stream = after

        return hook

    handles = []
    try:
        for u in units:
            if u.part != "layer":
                handles.append(modules[u.hooked].register_forward_hook(branch_hook(u.index)))
        for layer, layer_units in by_layer.items():
            handles.append(modules[layer].register_forward_hook(layer_hook(layer_units), with_kwargs=True))
        with eval_mode(model):
            for batch in iter_calibration(calibration_data, max_batches=max_batches, device=model_device(model)):
                current["batch"] = batch
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    if not bool((tokens > 0).all()):
        raise RuntimeError("the calibration forward never reached some transformer layers; are they used by the model?")
    return {units[0].gate: (sums / tokens).float()}


@torch.no_grad()
def skip_losses(model: nn.Module, calibration_data: Iterable, max_batches: int | None = None) -> dict:
    """``{depth gate name: loss with the unit skipped - loss with none skipped, per unit}`` (mean over batches);
    ``{}`` for a model without level ``"layer"``. One pass over the calibration data per unit, plus one."""
    flop_model = find_flop_model(model)
    units = units_of(flop_model)
    if not units:
        return {}
    gate = depth_gate(flop_model)
    device = model_device(model)
    batches = list(
        iter_calibration(calibration_data, needs_labels="score='skip_loss'", max_batches=max_batches, device=device)
    )
    probe = torch.ones(len(units), device=device)

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output * probe.to(output.dtype)

    def loss() -> float:
        total = 0.0
        for batch in batches:
            value = model(**batch).loss
            if value is None:
                raise ValueError("the model returned no loss for a calibration batch; check its 'labels'.")
            total += float(value)
        return total / max(len(batches), 1)

    handle = gate.register_forward_hook(hook)
    try:
        with eval_mode(model):
            base = loss()
            costs = torch.zeros(len(units))
            for u in units:
                probe[u.index] = 0.0
                costs[u.index] = loss() - base
                probe[u.index] = 1.0
    finally:
        handle.remove()
    return {units[0].gate: costs}
