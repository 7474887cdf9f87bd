"""The peer baseline: Torch-Pruning (dependency-graph structured pruning) on a BERT-family encoder.

It removes attention heads and FFN channels of every block, by weight magnitude or first-order
Taylor importance, with the same ratio for both, so the encoder linears keep ``1 - target`` of
their parameters, the same budget FLOP gets. The residual (hidden) width is left alone: its
linears are ignored, as in Torch-Pruning's own BERT example.
"""

from __future__ import annotations

import torch_pruning as tp
from torch import nn
from transformers import Trainer

from hf_flop.architectures import layer_layouts
from hf_flop.recognition import spec_for
from hf_flop.training import Distillation


def encoder_linear_params(model: nn.Module) -> int:
    """Weights of the attention and MLP projections: what FLOP counts as prunable."""
    spec = spec_for(model)
    modules = dict(model.named_modules())
    total = 0
    for layout in layer_layouts(model, spec):
        for name in spec.default_targets():
            total += modules[f"{layout.prefix}.{name}"].weight.numel()
    return total


def prune_with_torch_pruning(
    model: nn.Module,
    example_inputs: dict,
    target: float,
    importance: str = "magnitude",
    calibration_batches: list[dict] | None = None,
) -> nn.Module:
    """Prune heads and FFN channels in place so the encoder linears lose ``target`` of their weights."""
    spec = spec_for(model)
    modules = dict(model.named_modules())
    layouts = layer_layouts(model, spec)
    num_heads, ignored = {}, []
    for layout in layouts:
        for name in (spec.q, spec.k, spec.v):
            num_heads[modules[f"{layout.prefix}.{name}"]] = layout.heads
        ignored += [modules[f"{layout.prefix}.{spec.o}"], modules[f"{layout.prefix}.{spec.down}"]]
    ignored += [
        m
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not n.startswith(tuple(lay.prefix for lay in layouts))
    ]
    scorer = _importance(importance)
    pruner = tp.pruner.MetaPruner(
        model,
        example_inputs,
        importance=scorer,
        pruning_ratio=target,  # FFN channels
        num_heads=num_heads,
        prune_num_heads=True,
        prune_head_dims=False,  # whole heads only, like FLOP's head level
        head_pruning_ratio=target,
        ignored_layers=ignored,
        global_pruning=False,
    )
    if importance == "taylor":
        _accumulate_gradients(model, calibration_batches)
    pruner.step()
    # heads are gone from Q/K/V and O: tell the attention modules (the one architecture fact we need)
    head_dim = layouts[0].head_dim
    for layout in layouts:
        attention = modules[f"{layout.prefix}.{spec.attention}"]
        width = modules[f"{layout.prefix}.{spec.q}"].out_features
        for attr, kind in spec.attention_head_attrs.items():
            setattr(attention, attr, width // head_dim if kind == "heads" else width)
    model.zero_grad()
    return model


class DistillationTrainer(Trainer):
    """Plain fine-tuning with the same logit distillation PruningTrainer applies (its own loss function).

    The baseline must get what FLOP gets: the same teacher, mixing weight and temperature, and the same
    hidden-state distillation when ``hidden_distillation_weight`` > 0. Use it with ``PruningArguments``
    (for ``distillation_alpha`` / ``distillation_temperature`` / ``hidden_distillation_weight``).
    """

    def __init__(self, *args, teacher_model: nn.Module, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.distillation = Distillation.from_args(teacher_model.eval().requires_grad_(False), self.args)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        distillation = self.distillation
        teacher_inputs = {k: v for k, v in inputs.items() if k not in self.label_names}
        inputs = distillation.student_inputs(inputs)
        task, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        teacher = distillation.teacher_outputs(teacher_inputs)
        loss, _ = distillation.loss(task, outputs, teacher, teacher_inputs.get("attention_mask"))
        return (loss, outputs) if return_outputs else loss


def prune_ffn_with_torch_pruning(
    model: nn.Module,
    example_inputs: dict,
    ffn_ratio: float,
    importance: str = "magnitude",
    calibration_batches: list[dict] | None = None,
) -> nn.Module:
    """Prune FFN channels only (up/gate rows, down columns), ``ffn_ratio`` of them in every block, in place.

    For decoders with grouped-query attention: removing whole query heads independently of their
    KV group would break the query/KV ratio, so this baseline leaves attention alone and takes
    the whole budget from the FFN (``ffn_ratio = target * linear params / FFN params``).
    """
    spec = spec_for(model)
    modules = dict(model.named_modules())
    roots = {modules[f"{lay.prefix}.{name}"] for lay in layer_layouts(model, spec) for name in spec.up}
    ignored = [m for m in model.modules() if isinstance(m, nn.Linear) and m not in roots]
    scorer = _importance(importance)
    pruner = tp.pruner.MetaPruner(
        model,
        {**example_inputs, "use_cache": False},
        importance=scorer,
        pruning_ratio=ffn_ratio,
        ignored_layers=ignored,
        global_pruning=False,
        output_transform=lambda outputs: outputs.logits,  # tracing needs one tensor, not a ModelOutput
    )
    if importance == "taylor":
        _accumulate_gradients(model, calibration_batches)
    pruner.step()
    model.zero_grad()
    return model


def _importance(name: str):
    if name == "magnitude":
        return tp.importance.MagnitudeImportance(p=2)
    if name == "taylor":
        return tp.importance.TaylorImportance()
    raise ValueError(f"importance={name!r}: use 'magnitude' or 'taylor'.")


def _accumulate_gradients(model: nn.Module, batches: list[dict] | None) -> None:
    """Taylor importance reads ``weight * grad``: sum the loss gradients of the calibration batches."""
    model.zero_grad()
    for batch in batches or []:
        model(**batch).loss.backward()
