"""The width and depth rows of bench_smollm2.py: pruning to a total parameter count.

Today's head+row rows remove half of the linears' weights, which leaves SmolLM2-135M at 81.4 M
parameters: the embedding and the norms never shrink. The rows here reach a total parameter count
instead, by any mix of levels: ``hidden`` (residual channels, so the embedding and the norms shrink
too), ``layer`` (whole transformer layers), heads and FFN rows, or a mix chosen by
``hf_flop.search_shape``. The peer is Torch-Pruning's width pruning: residual channels and FFN
channels in one dependency graph, the same ratio for both, the attention heads kept.

Every function returns the pruned model (a plain transformers model, compacted) and a dict of what
the row should store.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the bench script imports this module before it loads torch
    from torch import nn


def kept_total(row, pretrained_stats: dict) -> int:
    """The total parameter count a row's pruned model keeps.

    ``row.total_kept`` > 0: that fraction of the pretrained model's parameters; 0: what removing
    ``row.target`` of the linears' weights leaves (81.4 M for SmolLM2-135M at 0.5).
    """
    if row.total_kept:
        return round(row.total_kept * pretrained_stats["total_params"])
    return round(pretrained_stats["total_params"] - row.target * pretrained_stats["linear_params"])


def _target_sparsity(gated, pretrained_stats: dict, total: int) -> float:
    """The ``target_sparsity`` of the injected config that leaves ``total`` parameters in all.

    ``sparsity_report`` counts against the prunable parameters of the config's levels (with level
    ``hidden`` these include the embedding and the norms); everything else stays whole.
    """
    from hf_flop import sparsity_report

    prunable = sparsity_report(gated).prunable_params
    removed = pretrained_stats["total_params"] - total
    if not 0 < removed < prunable:
        raise ValueError(f"cannot remove {removed} parameters: the levels can prune {prunable}.")
    return removed / prunable


def prune_hf_flop(row, model: nn.Module, calibration: list[dict], pretrained_stats: dict) -> tuple[nn.Module, dict]:
    """hf_flop one-shot to the row's total: plain ``prune_oneshot`` over ``row.levels``, or ``search_shape``."""
    from hf_flop import (
        FlopConfig,
        ShapeSearchConfig,
        compact,
        get_flop_model,
        prune_oneshot,
        search_shape,
        sparsity_report,
    )

    total = kept_total(row, pretrained_stats)
    config = FlopConfig(levels=list(row.levels), target_sparsity=0.5, uniform_shapes=row.uniform_shapes)
    gated = get_flop_model(model, config)
    target = _target_sparsity(gated, pretrained_stats, total)
    details = {"levels": list(row.levels), "total_target": total, "target_sparsity": target, "score": row.score}
    if row.search:
        options = ShapeSearchConfig(score=row.score or None, reconstruct_options={"progress": False})
        result = search_shape(gated, target, calibration, options=options, apply=True)
        details["search"] = result.table()
        details["chosen_mix"] = result.best.mix.describe()
        gated = result.model
    else:
        prune_oneshot(
            gated, None, calibration, row.score or None, target_sparsity=target, reconstruct_options={"progress": False}
        )
    details["deterministic_sparsity"] = sparsity_report(gated).deterministic_sparsity
    small = compact(gated)
    details |= shape(small)
    return small, details


def shape(model: nn.Module) -> dict:
    """The compacted model's shape, as its config states it, and its class (stock or hf_flop's)."""
    config = model.config
    fields = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads")
    return {"compacted_class": type(model).__name__, "shape": {f: getattr(config, f, None) for f in fields}}


def _ignored(model: nn.Module, spec, layouts) -> list[nn.Module]:
    """What Torch-Pruning must not root a group at: q/k/v (the heads stay) and the LM head (the vocabulary).

    The residual group is rooted at the embedding, the FFN groups at gate/up. o/down stay roots: a
    group whose output channels include an ignored module is skipped whole, and theirs are the residual's.
    """
    modules = dict(model.named_modules())
    ignored = [modules[f"{lay.prefix}.{name}"] for lay in layouts for name in (spec.q, spec.k, spec.v)]
    return [*ignored, model.get_output_embeddings()]


def _prune_width(model: nn.Module, example: dict, ratio: float, importance: str, calibration, round_to: int):
    """Torch-Pruning's width pruning in place: ``ratio`` of the residual channels and of every FFN's channels."""
    import torch
    import torch_pruning as tp
    from torch import nn
    from torch_pruning_baseline import _accumulate_gradients, _importance

    from hf_flop.architectures import layer_layouts
    from hf_flop.recognition import spec_for

    spec = spec_for(model)
    layouts = layer_layouts(model, spec)
    ignored = _ignored(model, spec, layouts)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    pruner = tp.pruner.MetaPruner(
        model,
        {**example, "use_cache": False},
        importance=_importance(importance),
        pruning_ratio=ratio,
        ignored_layers=ignored,
        global_pruning=False,
        round_to=round_to,  # the residual width stays a multiple of the head count: a stock config
        root_module_types=[nn.Linear, nn.Embedding],  # the embedding roots the residual channels
        output_transform=lambda outputs: outputs.logits,
    )
    if importance == "taylor":
        _accumulate_gradients(model, calibration)
    pruner.step()
    model.zero_grad()
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if tied:  # Torch-Pruning cut the shared tensor twice, the same columns each time: tie it again
        if not torch.equal(head.weight, embedding.weight):
            raise RuntimeError("Torch-Pruning cut the tied embedding and the LM head differently.")
        head.weight = embedding.weight
    modules = dict(model.named_modules())
    model.config.hidden_size = embedding.weight.shape[1]
    model.config.intermediate_size = max(modules[f"{lay.prefix}.{spec.up[0]}"].out_features for lay in layouts)
    return model


def prune_torch_pruning_width(
    row, model: nn.Module, calibration: list[dict], pretrained_stats: dict
) -> tuple[nn.Module, dict]:
    """Torch-Pruning's width pruning to the row's total: the ratio found by bisection on copies (magnitude,
    whose counts equal Taylor's), then the real pruning with ``row.score`` on the model."""
    total = kept_total(row, pretrained_stats)
    heads = model.config.num_attention_heads
    example = {"input_ids": calibration[0]["input_ids"][:1]}

    def kept(ratio: float) -> int:
        return _prune_width(copy.deepcopy(model), example, ratio, "magnitude", None, heads).num_parameters()

    low, high = 0.0, 0.9
    for _ in range(12):  # params fall as the ratio grows; 12 halvings: well under one residual channel
        middle = (low + high) / 2
        low, high = (middle, high) if kept(middle) > total else (low, middle)
    ratio = high
    small = _prune_width(model, example, ratio, row.score, calibration, heads)
    return small, {"ratio": ratio, "total_target": total, **shape(small)}
