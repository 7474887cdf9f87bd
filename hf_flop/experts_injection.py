"""Finding a model's mixture-of-experts layers, injecting ``FlopExperts`` into them, and the checks before.

Which layers are MoE layers comes from the architecture table (``ArchSpec.experts``): a transformer
layer holding the experts module there is one; the others (``mlp_only_layers``, ``decoder_sparse_step``)
are dense and pruned as any FFN. The experts get gates when the levels ask for ``"expert"`` or
``"row"`` and ``exclude_modules`` does not name the experts module (``target_modules`` names linears,
which the 3-D experts are not).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .architectures import ArchSpec, ExpertsSpec, UnsupportedArchitectureError, arch_spec, base_model_type, find_layers
from .experts import EXPERT_LEVEL, FlopExperts
from .gates import Gate

EXPERT_LEVELS = (EXPERT_LEVEL, "row")  # the levels that gate a MoE layer's experts


@dataclass(frozen=True)
class MoeLayer:
    """One mixture-of-experts layer: absolute names of its experts module and router, and its numbers."""

    experts: str
    router: str
    n_experts: int
    width: int
    hidden: int


def _spec(model: nn.Module) -> ArchSpec | None:
    model_type = base_model_type(getattr(getattr(model, "config", None), "model_type", None))
    try:
        return arch_spec(model_type)
    except UnsupportedArchitectureError:
        return None


def _excluded(exclude, name: str) -> bool:
    if exclude is None:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, name) is not None
    return any(name == e or name.endswith(f".{e}") for e in exclude)


def moe_layers(model: nn.Module, exclude=None) -> list[MoeLayer]:
    """The MoE layers of ``model`` (none for an architecture without ``ArchSpec.experts``), minus the
    ones whose experts module ``exclude`` (``FlopConfig.exclude_modules``) names."""
    spec = _spec(model)
    if spec is None or spec.experts is None:
        return []
    layout, modules = spec.experts, dict(model.named_modules())
    found = []
    for prefix in find_layers(model, spec):
        name = f"{prefix}.{layout.experts}"
        experts = modules.get(name)
        if experts is None or _excluded(exclude, name):
            continue
        if isinstance(experts, FlopExperts):
            experts = experts.base_layer
        n, width_2, hidden = getattr(experts, layout.gate_up).shape
        found.append(MoeLayer(name, f"{prefix}.{layout.router}", n, width_2 // 2, hidden))
    return found


def _routing(config, layout: ExpertsSpec) -> tuple[int, bool]:
    """``(top_k, renormalise)`` of the model's routers."""
    top_k = getattr(config, layout.top_k_attr)
    renormalise = layout.renormalise
    if isinstance(renormalise, str):
        renormalise = bool(getattr(config, renormalise, False))
    return top_k, renormalise


def inject_experts(model: nn.Module, config, gate_factory: Callable[[int], Gate]) -> list[FlopExperts]:
    """Replace the experts module of every MoE layer of ``model`` by a ``FlopExperts`` (levels in ``config``)."""
    levels = set(config.levels)
    if not levels & set(EXPERT_LEVELS):
        return []
    spec = _spec(model)
    injected = []
    for layer in moe_layers(model, config.exclude_modules):
        top_k, renormalise = _routing(model.config, spec.experts)
        base = model.get_submodule(layer.experts)
        flop = FlopExperts(
            base,
            model.get_submodule(layer.router),
            layer.router,
            spec.experts,
            top_k=top_k,
            renormalise=renormalise,
            gate_factory=gate_factory,
            experts=EXPERT_LEVEL in levels,
            rows="row" in levels,
        )
        parent, _, child = layer.experts.rpartition(".")
        setattr(model.get_submodule(parent), child, flop.to(getattr(base, spec.experts.gate_up).device))
        injected.append(flop)
    return injected


def check_expert_level(model: nn.Module, config, targets: list[str]) -> None:
    """Refuse, before any work, level ``"expert"`` where it can remove nothing or its target cannot be met.

    A MoE layer must keep at least ``num_experts_per_tok`` experts (the router picks that many per
    token). When even pruning everything else as far as the levels allow and every MoE layer down to
    that many experts leaves more than ``1 - target_sparsity`` of the prunable parameters, the target
    would need fewer experts than that: refused.
    """
    layers = moe_layers(model, config.exclude_modules)
    model_type = getattr(model.config, "model_type", None)
    if not layers:
        raise ValueError(
            f"level 'expert' removes whole experts of mixture-of-experts layers, but this {model_type!r} model has "
            "none the architecture table knows (ArchSpec.experts), or exclude_modules names all its experts "
            "modules. Drop the level, or use a MoE model (qwen3_moe, mixtral)."
        )
    top_k, _ = _routing(model.config, _spec(model).experts)
    if all(layer.n_experts <= top_k for layer in layers):
        raise ValueError(
            f"level 'expert' can remove nothing: every MoE layer has {layers[0].n_experts} experts and the router picks "
            f"num_experts_per_tok={top_k} per token, which must all stay. Drop the level."
        )
    floor, prunable = _floor_and_prunable(model, config, targets, layers, top_k)
    reachable = 1.0 - floor / max(prunable, 1)
    if config.target_sparsity > reachable + 1e-9:
        raise ValueError(
            f"FlopConfig.target_sparsity={config.target_sparsity} would leave fewer than num_experts_per_tok={top_k} "
            f"experts in a MoE layer: with levels {config.levels}, keeping {top_k} experts per layer"
            f"{' at one row each' if 'row' in config.levels else ''} (and pruning everything else as far as "
            f"the levels allow) keeps {floor:,} of the {prunable:,} prunable parameters, a sparsity of at most "
            f"{reachable:.4f}. Lower the target, or add levels (e.g. 'row', 'head') that shrink other weights."
        )


def _floor_and_prunable(model: nn.Module, config, targets: list[str], layers: list[MoeLayer], top_k: int):
    """Prunable parameters, and how many of them stay at least (MoE layers at ``top_k`` experts; targeted
    linears at nothing when a level shrinks them, else whole)."""
    shrinking = {"rank", "block"} & set(config.levels)
    grouped = set()
    spec = _spec(model)
    if spec is not None:
        from .groups import structure_groups  # the head/row groups of the dense layers

        for group in structure_groups(model, spec, set(config.levels)):
            grouped |= {group.consumer, *(s.module for s in group.producers)}
    modules = dict(model.named_modules())
    prunable = floor = 0
    for name in targets:
        weight = getattr(modules[name], "weight", None)
        size = weight.numel() if weight is not None else 0
        prunable += size
        floor += 0 if shrinking or name in grouped else size
    for layer in layers:
        per_expert = 3 * layer.width + 1
        prunable += layer.n_experts * per_expert * layer.hidden
        floor += top_k * (3 * (1 if "row" in config.levels else layer.width) + 1) * layer.hidden
    return floor, prunable


def has_moe_rows(model: nn.Module, config) -> bool:
    """Whether level ``"row"`` reaches some MoE layer's experts (a model may have no dense FFN at all)."""
    return bool(moe_layers(model, config.exclude_modules))


def flop_experts(flop_model) -> dict[str, FlopExperts]:
    """The injected ``FlopExperts`` of a FLOP model, by module name."""
    return {name: m for name, m in flop_model.model.named_modules() if isinstance(m, FlopExperts)}


def uneven_experts(flop_model, round_to: int) -> dict[str, list[int]]:
    """Under uniform shapes: expert counts / widths that differ between MoE layers (a stock config has one of each)."""
    found = flop_experts(flop_model)
    counts = {len(m.kept_experts()) for m in found.values()}
    widths = {m.kept_width(round_to) for m in found.values()}
    uneven = {}
    if len(counts) > 1:
        uneven["experts"] = sorted(counts)
    if len(widths) > 1:
        uneven["expert width"] = sorted(widths)
    return uneven


def expert_refit_targets(flop_model) -> dict:
    """Every MoE layer's refit targets (``FlopExperts.refit_targets``): ``{tap name: (tap, row-mask values)}``."""
    found = {}
    for name, module in flop_experts(flop_model).items():
        found.update(module.refit_targets(name))
    return found
