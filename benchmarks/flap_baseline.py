"""A FLAP-style one-shot baseline (An et al., AAAI 2024), written on hf_flop's head/row gates.

FLAP prunes heads and FFN channels with no retraining in three steps, all reproduced here:

* **fluctuation score** per input channel ``j`` of the consumer (attention output / FFN down
  projection): ``||W[:, j]||^2 * Var(x_j)``, the variance of the channel over the calibration tokens
  times its weight column's energy (a channel that barely moves can be replaced by its mean); a head
  or KV group scores the sum over its channels;
* **global allocation**: scores standardised within each layer's group, then one global order
  (hf_flop's ``ranking="standardized"``), down to the same parameter budget as every other row;
* **bias compensation**: the removed channels' mean contribution ``W[:, removed] E[x_removed]`` is
  added to the consumer's bias (a bias is created where the layer had none, as FLAP does for LLaMA).

No least-squares refit of the kept weights: that is what separates it from ``hf_flop.reconstruct``.
"""

from __future__ import annotations

import torch
from torch import nn

from hf_flop import prune_to_target
from hf_flop.linear import dense_weight, set_bias
from hf_flop.model import find_flop_model
from hf_flop.refit import Moments


@torch.no_grad()
def _consumer_moments(model: nn.Module, calibration: list[dict]) -> dict[str, Moments]:
    flop = find_flop_model(model)
    layers = flop.flop_layers()
    moments = {g.consumer: Moments(layers[g.consumer].in_features) for g in flop.structure_groups}

    def recorder(name: str):
        def hook(module, args):
            moments[name].add(args[0].detach())

        return hook

    handles = [layers[n].register_forward_pre_hook(recorder(n), prepend=True) for n in moments]
    try:
        model.eval()
        for batch in calibration:
            model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for handle in handles:
            handle.remove()
    return moments


def fluctuation_scores(model: nn.Module, moments: dict[str, Moments]) -> dict[str, torch.Tensor]:
    """Per head/row gate: the summed fluctuation ``||W[:, j]||^2 Var(x_j)`` of each unit's channels."""
    flop = find_flop_model(model)
    layers = flop.flop_layers()
    scores = {}
    for group in flop.structure_groups:
        m = moments[group.consumer].matrix()
        dim = m.shape[0] - 1
        mean = m[:dim, dim]
        variance = (m.diagonal()[:dim] - mean**2).clamp_min(0.0)
        column_energy = dense_weight(layers[group.consumer].base_layer).detach().double().pow(2).sum(0)
        per_channel = (column_energy * variance).float()
        scores[group.key] = per_channel.reshape(group.n_units, group.consumer_unit).sum(1)
    return scores


@torch.no_grad()
def compensate_biases(model: nn.Module, moments: dict[str, Moments]) -> None:
    """Add each consumer's removed channels' mean contribution to its bias (the gates must be set)."""
    flop = find_flop_model(model)
    layers = flop.flop_layers()
    for group in flop.structure_groups:
        layer = layers[group.consumer]
        m = moments[group.consumer].matrix()
        mean = m[:-1, -1]
        keep = flop.flop_structure_gates[group.key].deterministic_mask().detach().cpu() != 0
        removed = ~keep.repeat_interleave(group.consumer_unit)
        weight = dense_weight(layer.base_layer).detach().double().cpu()
        shift = weight[:, removed] @ mean[removed]
        bias = layer.bias.detach().double().cpu() if layer.bias is not None else torch.zeros(layer.out_features)
        set_bias(layer.base_layer, (bias + shift).float())


def prune_flap(model: nn.Module, calibration: list[dict], target_sparsity: float) -> dict:
    """Prune a FLOP model (head/row gates, all open) FLAP's way, in place; returns what was done."""
    moments = _consumer_moments(model, calibration)
    result = prune_to_target(model, fluctuation_scores(model, moments), target_sparsity, ranking="standardized")
    compensate_biases(model, moments)
    return {"deterministic_sparsity": result.deterministic_sparsity, "target_sparsity": result.target_sparsity}
