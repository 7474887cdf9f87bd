"""`FlopModel`: the PEFT tuner that injects FLOP's gated modules into a transformers model.

Injection, in PEFT's order: ``_pre_injection_hook`` checks everything a level needs (so nothing is
replaced when something is wrong), ``_create_and_replace`` swaps each targeted linear for a
``FlopLinear`` of the config's linear level, and ``_post_injection_hook`` adds the model-level
gates (head/row groups, the embedding). ``LEVEL_CHECKS`` holds each level's checks.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import peft
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from torch import nn

from .architectures import ARCHITECTURES, ArchSpec, UnsupportedArchitectureError, arch_spec, base_model_type
from .blocks import check_block_shapes
from .config import FlopConfig
from .depth import DEPTH_GATES, check_depth_level, depth_gate, inject_depth
from .embedding import check_embedding_level, inject_embedding
from .experts_injection import EXPERT_LEVELS, check_expert_level, has_moe_rows, inject_experts
from .gated import GatedLayer
from .gates import Gate, build_gate
from .groups import GROUP_LEVELS, InputMask, StructureGroup, check_heads_removable, structure_groups
from .hidden import check_hidden_level, inject_hidden
from .hidden_cuts import removes_channels
from .layers import FlopLinear
from .linear import is_linear, scale_inputs_
from .lookup import FlopModelBase
from .lookup import find_flop_model as find_flop_model  # its old home: hf_flop.model.find_flop_model
from .projection_norms import KeptHeadsStatistic, removes_projection_norm_heads
from .recognition import spec_for
from .uniform import check_uniform_shapes


def _model_type(model: nn.Module) -> str | None:
    return base_model_type(getattr(getattr(model, "config", None), "model_type", None))


def _gated_groups(model: nn.Module, spec: ArchSpec, levels: set[str], targeted: set[str]) -> list[StructureGroup]:
    """The head/row groups that get a gate: every module a group cuts must be targeted (a FlopLinear)."""
    groups = structure_groups(model, spec, levels)
    return [g for g in groups if g.consumer in targeted and all(s.module in targeted for s in g.producers)]


def _check_group_level(level: str, model: nn.Module, config: FlopConfig, targets: list[str]) -> None:
    """A head/row level must be able to remove something: a gate in some layer, with more than one unit."""
    spec = arch_spec(_model_type(model))
    groups = _gated_groups(model, spec, {level}, set(targets))
    modules = {"head": [spec.q, spec.k, spec.v, spec.o], "query_head": [spec.q, spec.o]}.get(level, [*spec.up, spec.down])
    if not groups:
        raise ValueError(
            f"level {level!r} can remove nothing: its gate in a layer needs all of {modules} targeted, and "
            "target_modules / exclude_modules leave no layer so. Target them, or drop the level."
        )
    if all(g.n_units <= 1 for g in groups):
        raise ValueError(f"level {level!r} can remove nothing: every layer has a single unit of it. Drop the level.")


def _check_rows(model: nn.Module, config: FlopConfig, targets: list[str]) -> None:
    """Level ``"row"`` removes something when it reaches a MoE layer's experts, else as any head/row level."""
    if not has_moe_rows(model, config):
        _check_group_level("row", model, config, targets)


def _check_heads(level: str, model: nn.Module, config: FlopConfig, targets: list[str]) -> None:
    check_heads_removable(model, config.levels)  # MQA with 'head', no grouping with 'query_head'
    _check_group_level(level, model, config, targets)


def _check_blocks(model: nn.Module, config: FlopConfig, targets: list[str]) -> None:
    check_block_shapes(model, targets, config.block_size)


# level -> check run before anything is replaced: (model, config, targeted module names) -> None or raise
LEVEL_CHECKS: dict[str, Callable[[nn.Module, FlopConfig, list[str]], None]] = {
    "head": functools.partial(_check_heads, "head"),
    "query_head": functools.partial(_check_heads, "query_head"),
    "row": _check_rows,
    "block": _check_blocks,
    "embedding": check_embedding_level,
    "expert": check_expert_level,
    "layer": check_depth_level,
    "hidden": check_hidden_level,
}

# the levels that need the architecture's layout (the transformer layers and their parts) even with target_modules
LAYOUT_LEVELS = (*GROUP_LEVELS, "layer")


def _linear_suffixes(model: nn.Module) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_linear(m)})


def unknown_layout_message(
    model: nn.Module, model_type: str | None, levels: list[str], *, option: str = "target_modules"
) -> str:
    """Why a model whose architecture is missing from ``ARCHITECTURES`` cannot be pruned as configured, with
    every condition to meet at once (``option`` names the target-modules setting in the caller's interface)."""
    grouped = [lvl for lvl in levels if lvl in LAYOUT_LEVELS]
    linears = ", ".join(_linear_suffixes(model)) or "none found"
    known = f"hf_flop does not know the layout of model_type={model_type!r} (supported: {sorted(ARCHITECTURES)})"
    if grouped:
        # naming the target modules alone does not help head/row: say both conditions in one message
        return (
            f"{known}. Level(s) {', '.join(grouped)} need that layout: add an ArchSpec for {model_type!r} to "
            f"ARCHITECTURES in hf_flop/architectures.py (naming target modules with {option} alone does not make "
            f"{'/'.join(grouped)} pruning work). Without an ArchSpec, use levels rank and/or block with {option} "
            f"naming its linear layers (by suffix: {linears})."
        )
    return (
        f"model_type={model_type!r} is not one of {sorted(ARCHITECTURES)} (the layouts hf_flop knows), so {option} "
        f"has no default (the attention and MLP projections). Name the linear layers to prune with {option} (by "
        f"suffix: {linears}), or add an ArchSpec for {model_type!r} to ARCHITECTURES in hf_flop/architectures.py."
    )


def _layout(
    model: nn.Module, config: FlopConfig, *, verify: bool = False, option: str = "target_modules"
) -> ArchSpec | None:
    """The layout the default targets or the head/row levels need (None when neither does), from the table or
    recognised (``hf_flop.recognition``; with ``verify``, verified for those levels), or the error saying why not."""
    grouped = set(config.levels) & set(GROUP_LEVELS)
    if config.target_modules is not None and not set(config.levels) & set(LAYOUT_LEVELS):
        return None
    try:
        return spec_for(model, grouped if verify else None, uniform_shapes=config.uniform_shapes)
    except UnsupportedArchitectureError as err:
        model_type = _model_type(model)
        if model_type in ARCHITECTURES:  # an entry the user added, which failed its verification: it says so
            raise
        message = unknown_layout_message(model, model_type, config.levels, option=option)
        raise UnsupportedArchitectureError(f"{message} {err}") from None


def _default_targets(model: nn.Module, spec: ArchSpec) -> list[str]:
    """The architecture's default targets that name some module (a model whose layers are all MoE layers has
    no dense FFN projections: its experts get their gates apart, ``hf_flop.experts``)."""
    names = [name for name, _ in model.named_modules() if name]
    return [t for t in spec.default_targets(model) if any(n == t or n.endswith(f".{t}") for n in names)]


def _unmatched_targets(model: nn.Module, config: FlopConfig) -> list[str]:
    """Entries of a ``target_modules`` list that name no module (PEFT's rule: the name or its last parts)."""
    if not isinstance(config.target_modules, (list, tuple, set)):
        return []  # one regex: matching nothing at all is the error
    names = [name for name, _ in model.named_modules() if name]
    return [t for t in config.target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]


def check_flop_config(model: nn.Module, config: FlopConfig, *, option: str = "target_modules") -> list[str]:
    """Every check injection makes before it replaces anything, on ``model`` left untouched.

    Returns the names of the modules FLOP would replace. Raises what ``get_flop_model`` would raise:
    ``UnsupportedArchitectureError`` (no layout while ``target_modules`` is None or the levels include
    head/row: the architecture is missing from the table and could not be recognised, or a layout
    hf_flop does not ship failed its verification on a small copy, ``hf_flop.recognition``; the
    message lists every condition at once, ``option`` naming the target-modules setting in the
    caller's interface), ``ValueError`` (a ``target_modules`` entry matches no module, a level's
    own check, e.g. a level that can remove nothing, or what ``uniform_shapes`` needs:
    ``hf_flop.uniform``), ``TypeError`` (a matched module is not a linear).
    """
    spec = _layout(model, config, option=option)
    if config.target_modules is None:  # a copy: the caller's config is not filled in
        config = copy.copy(config)
        config.target_modules = _default_targets(model, spec)
    matched = [name for name, _ in model.named_modules() if name and check_target_module_exists(config, name)]
    if not matched:
        raise ValueError(
            f"FlopConfig.target_modules={config.target_modules!r} matches no module of {type(model).__name__}. "
            f"Linear layers it has (by suffix): {_linear_suffixes(model)}."
        )
    unmatched = _unmatched_targets(model, config)
    if unmatched:
        raise ValueError(
            f"FlopConfig.{option} entries {unmatched} match no module of {type(model).__name__} (the others do). "
            f"Correct or remove them; linear layers it has (by suffix): {_linear_suffixes(model)[:12]}."
        )
    bad = {n: type(m).__name__ for n, m in model.named_modules() if n in matched and not is_linear(m)}
    if bad:
        raise TypeError(
            f"FLOP replaces only nn.Linear / Conv1D layers, but target_modules also matches {bad}; "
            "narrow target_modules or list those in exclude_modules."
        )
    for level in config.levels:
        if level in LEVEL_CHECKS:
            LEVEL_CHECKS[level](model, config, matched)
    check_uniform_shapes(model, config, matched)
    _layout(model, config, verify=True, option=option)  # last: the other checks are cheaper and say more
    return matched


class FlopModel(FlopModelBase, BaseTuner):
    """PEFT tuner for FLOP. Create it with ``get_flop_model`` or ``peft.get_peft_model``."""

    prefix: str = "flop_"
    tuner_layer_cls = FlopLinear
    target_module_mapping = {name: spec.default_targets() for name, spec in ARCHITECTURES.items()}

    # --- injection ---------------------------------------------------------------------------------
    def __init__(self, model: nn.Module, peft_config, adapter_name: str = "default", **kwargs) -> None:
        # checked before BaseTuner.__init__, which would otherwise merge configs into the model first
        if hasattr(model, "peft_config") or any(isinstance(m, FlopLinear) for m in model.modules()):
            raise ValueError(
                "this model already has adapters/FLOP layers; FLOP cannot be injected twice. Inject into the "
                "original model, or continue with the existing FlopModel."
            )
        super().__init__(model, peft_config, adapter_name, **kwargs)

    def _prepare_adapter_config(self, peft_config: FlopConfig, model_config: dict) -> FlopConfig:
        if peft_config.target_modules is None:
            peft_config.target_modules = _default_targets(self.model, _layout(self.model, peft_config))
        return peft_config

    def _pre_injection_hook(self, model: nn.Module, config: FlopConfig, adapter_name: str) -> None:
        check_flop_config(model, config)  # everything, before anything is replaced
        self._prepare_adapter_config(config, self.get_model_config(model))

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        new = FlopLinear(
            target,
            adapter_name,
            factorized="rank" in peft_config.levels,
            gate_factory=functools.partial(build_gate, peft_config),
            live_threshold=peft_config.live_threshold,
            block_size=peft_config.block_size if "block" in peft_config.levels else None,
        )
        self._replace_module(parent, target_name, new, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        setattr(parent, child_name, new_module)
        device = child.weight.device
        for name, module in new_module.named_modules():
            if self.prefix in name:
                module.to(device)

    def _post_injection_hook(self, model: nn.Module, config: FlopConfig, adapter_name: str) -> None:
        self.flop_structure_gates = nn.ModuleDict()
        self.structure_groups: list[StructureGroup] = []
        self._hook_handles = []
        levels = set(config.levels) & set(GROUP_LEVELS)
        if levels:
            for group in _gated_groups(model, arch_spec(_model_type(model)), levels, set(self.flop_layers())):
                self.flop_structure_gates[group.key] = build_gate(config, group.n_units)
                self.structure_groups.append(group)
            modules = dict(model.named_modules())
            for group in self.structure_groups:
                gate = self.flop_structure_gates[group.key]
                hook = InputMask(gate, group)
                self._hook_handles.append(modules[group.consumer].register_forward_pre_hook(hook))
                for norm in group.norms:  # the statistic of a norm over the whole projection: kept heads only
                    hook = KeptHeadsStatistic(gate, group, norm.unit, config.round_to)
                    self._hook_handles.append(modules[norm.module].register_forward_hook(hook))
        if set(config.levels) & set(EXPERT_LEVELS):  # a MoE layer's experts and router (hf_flop.experts)
            inject_experts(model, config, functools.partial(build_gate, config))
        if "embedding" in config.levels:
            inject_embedding(model, config, functools.partial(build_gate, config))
        self.depth_units = []
        if "layer" in config.levels:  # last: it records which gated modules each layer holds
            self._hook_handles += inject_depth(self, model, config, functools.partial(build_gate, config))
        if "hidden" in config.levels:
            n = getattr(model.config, arch_spec(_model_type(model)).hidden_attr)
            self._hook_handles += inject_hidden(model, config, build_gate(config, n), set(self.flop_layers()))
        self._mark_only_adapters_as_trainable(model)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        config = next(iter(self.peft_config.values()))
        if not config.train_base:
            super()._mark_only_adapters_as_trainable(model)
            for gate in getattr(self, "flop_structure_gates", {}).values():
                gate.requires_grad_(True)
            return
        for param in model.parameters():
            param.requires_grad_(True)
        for module in model.modules():
            if getattr(module, "supersedes_base_weight", False):
                module.base_layer.weight.requires_grad_(False)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """FLOP trains the whole model by default: then the adapter checkpoint holds every trained tensor."""
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        if getattr(config, "train_base", False):
            superseded = {
                f"{name}.base_layer.weight"
                for name, module in model.named_modules()
                if getattr(module, "supersedes_base_weight", False)
            }
            superseded |= {k.removeprefix("_fsdp_wrapped_module.") for k in superseded}
            selected.update({k: v for k, v in state_dict.items() if k not in superseded})
        return selected

    # --- queries -----------------------------------------------------------------------------------
    @property
    def flop_config(self) -> FlopConfig:
        return next(iter(self.peft_config.values()))

    def flop_layers(self) -> dict[str, FlopLinear]:
        """The targeted linears, by module name."""
        return {name: m for name, m in self.model.named_modules() if isinstance(m, FlopLinear)}

    def gated_layers(self) -> dict[str, GatedLayer]:
        """Every gated module by module name: the targeted linears first, then the others (embedding,
        tied head), each in model order."""
        others = {name: m for name, m in self.model.named_modules() if isinstance(m, GatedLayer)}
        return {**self.flop_layers(), **others}

    def gates(self) -> dict[str, Gate]:
        """Every gate of the model by a readable name: ``<module>.rank`` / ``.block`` for the linears' own
        gates, then ``head_<i>`` / ``row_<i>`` for the head/row groups, ``layer`` / ``sublayer`` for the
        depth gate, then ``<embedding>.embedding_<c>``."""
        linears = self.flop_layers()
        own = {f"{n}.{suffix}": g for n, m in self.gated_layers().items() for suffix, g in m.gates().items()}
        linear = {k: g for k, g in own.items() if k.rsplit(".", 1)[0] in linears}
        groups = {g.key: self.flop_structure_gates[g.key] for g in self.structure_groups}
        depth = {k: self.flop_structure_gates[k] for k in DEPTH_GATES if k in self.flop_structure_gates}
        return {**linear, **groups, **depth, **own}

    def gate_parameters(self) -> list[nn.Parameter]:
        return [p for gate in self.gates().values() for p in gate.parameters()]

    # --- unloading ---------------------------------------------------------------------------------
    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        """Fold the eval masks into dense weights and return the plain model (same shapes, zeros kept).

        ``hf_flop.compact`` is what makes the model smaller; this is PEFT's merge verb.
        """
        if removes_projection_norm_heads(self.structure_groups, self.flop_structure_gates, self.flop_config.round_to):
            raise ValueError(
                "merge_and_unload keeps the closed heads' Q/K rows, but this architecture's norms over the whole "
                "Q/K projection (ArchSpec.projection_norms) would average over them again, so the merged model "
                "would compute something else. Use hf_flop.compact(model), which removes those heads exactly."
            )
        refusals = [r for r in (m.merge_refusal() for m in self.gated_layers().values()) if r]
        if refusals:  # before anything is unloaded
            raise ValueError(refusals[0])
        depth = depth_gate(self)
        if depth is not None and not bool((depth.deterministic_mask() == 1).all()):
            raise ValueError(
                "merge_and_unload keeps every transformer layer, but the depth gate (level 'layer') closes or scales "
                "some, which no dense weight folding expresses. Use hf_flop.compact(model), which removes them."
            )
        if removes_channels(self):
            raise ValueError(
                "merge_and_unload keeps the model's width, but level 'hidden' removes (or scales) residual channels, "
                "whose norms then take their statistic over the kept channels only: the merged model would compute "
                "something else. Use hf_flop.compact(model), which removes those channels exactly."
            )
        masks = {
            g.consumer: g.feature_mask(self.flop_structure_gates[g.key].deterministic_mask().detach(), g.consumer_unit)
            for g in self.structure_groups
        }
        for handle in self._hook_handles:
            handle.remove()
        for module in list(self.gated_layers().values()):
            if not isinstance(module, BaseTunerLayer):  # PEFT unloads its own layers below
                module.unload(self.model, merge=True)
        model = super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)
        modules = dict(model.named_modules())
        for name, mask in masks.items():
            scale_inputs_(modules[name], mask)
        return model


def get_flop_model(model: nn.Module, config: FlopConfig, adapter_name: str = "default") -> peft.PeftModel:
    """Inject FLOP into ``model`` and return a ``peft.PeftModel`` around it (same as ``peft.get_peft_model``).

    In eval mode the returned model computes what ``model`` computed (within float rounding)
    until its gates are trained. It comes back in the mode ``model`` was in (``model.training``).
    """
    if not isinstance(config, FlopConfig):
        raise TypeError(f"get_flop_model needs a FlopConfig, got {type(config).__name__}.")
    if isinstance(model, peft.PeftModel):
        raise ValueError(
            "this model is already a PeftModel; FLOP cannot be injected twice. Pass the original transformers model."
        )
    training = model.training  # PEFT leaves the new gated modules in training mode
    return peft.get_peft_model(model, config, adapter_name=adapter_name).train(training)
