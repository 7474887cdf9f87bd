"""`FlopModel`: injects FLOP layers and head/row gates into a transformers model (a PEFT tuner)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists
from torch import nn

from .blocks import check_block_shapes
from .config import FlopConfig
from .embedding import FlopEmbedding, check_embedding_level, inject_embedding, unload_embedding
from .gates import GATE_TYPES, Gate, HardConcreteGate
from .layers import LINEAR_TYPES, FlopLinear
from .structures import (
    ARCHITECTURES,
    ArchSpec,
    Segment,
    UnsupportedArchitectureError,
    arch_spec,
    base_model_type,
    block_layouts,
)


@dataclass
class StructureGroup:
    """One gate over the heads (or FFN rows) of one block and the modules it shrinks.

    The gate masks ``consumer``'s input (``consumer_unit`` features per unit): a head whose
    attention output never reaches the output projection can have its Q/K/V rows removed exactly,
    and likewise an FFN neuron that never reaches the down projection.
    """

    key: str
    level: str
    block: str
    n_units: int
    consumer: str
    consumer_unit: int
    producers: list[Segment]


class _InputMask:
    """Forward pre-hook multiplying a consumer's input by its structure gate, unit by unit.

    A callable object rather than a closure so that ``copy.deepcopy`` of the model (e.g. to make a
    teacher) carries a hook bound to the copied gate.
    """

    def __init__(self, gate: Gate, unit: int) -> None:
        self.gate = gate
        self.unit = unit

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        mask = self.gate().repeat_interleave(self.unit)
        return (args[0] * mask.to(args[0].dtype), *args[1:])


def make_gate_factory(config: FlopConfig):
    """A callable ``n -> Gate`` honouring the config's gate type and hard-concrete settings."""

    def factory(n: int) -> Gate:
        if config.gate == "hard_concrete":
            return HardConcreteGate(
                n,
                init_log_alpha=config.init_log_alpha,
                beta=config.temperature,
                limit_l=config.limit_l,
                limit_r=config.limit_r,
            )
        return GATE_TYPES[config.gate](n)

    return factory


def _model_type(model: nn.Module) -> str | None:
    return base_model_type(getattr(getattr(model, "config", None), "model_type", None))


class FlopModel(BaseTuner):
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
            model_type = base_model_type(model_config.get("model_type"))
            if model_type not in ARCHITECTURES:
                raise UnsupportedArchitectureError(
                    f"FlopConfig.target_modules=None needs a known architecture, but model_type={model_type!r} "
                    f"is not one of {sorted(ARCHITECTURES)}. Pass target_modules=[...] (names of its linear "
                    "layers) or add an ArchSpec to hf_flop/structures.py."
                )
            peft_config.target_modules = ARCHITECTURES[model_type].default_targets()
        return peft_config

    def _pre_injection_hook(self, model: nn.Module, config: FlopConfig, adapter_name: str) -> None:
        config = self._prepare_adapter_config(config, self.get_model_config(model))
        matched = [name for name, _ in model.named_modules() if name and check_target_module_exists(config, name)]
        if not matched:
            candidates = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES)})
            raise ValueError(
                f"FlopConfig.target_modules={config.target_modules!r} matches no module of {type(model).__name__}. "
                f"Linear layers it has (by suffix): {candidates}."
            )
        bad = {
            n: type(m).__name__ for n, m in model.named_modules() if n in matched and not isinstance(m, LINEAR_TYPES)
        }
        if bad:
            raise TypeError(
                f"FLOP replaces only nn.Linear / Conv1D layers, but target_modules also matches {bad}; "
                "narrow target_modules or list those in exclude_modules."
            )
        if {"head", "row"} & set(config.levels):
            arch_spec(_model_type(model))  # raises a clear error for unknown layouts
        if "block" in config.levels:
            check_block_shapes(model, matched, config.block_size)
        if "embedding" in config.levels:
            check_embedding_level(model, config, matched)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        new = FlopLinear(
            target,
            adapter_name,
            factorized="rank" in peft_config.levels,
            gate_factory=make_gate_factory(peft_config),
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
        levels = set(config.levels) & {"head", "row"}
        if levels:
            spec = arch_spec(_model_type(model))
            targeted = {n for n, m in model.named_modules() if isinstance(m, FlopLinear)}
            factory = make_gate_factory(config)
            for group in _structure_groups(model, spec, levels):
                if group.consumer in targeted and all(s.module in targeted for s in group.producers):
                    self.flop_structure_gates[group.key] = factory(group.n_units)
                    self.structure_groups.append(group)
            modules = dict(model.named_modules())
            for group in self.structure_groups:
                hook = _InputMask(self.flop_structure_gates[group.key], group.consumer_unit)
                self._hook_handles.append(modules[group.consumer].register_forward_pre_hook(hook))
        if "embedding" in config.levels:
            inject_embedding(model, config, make_gate_factory(config))
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
            if (isinstance(module, FlopLinear) and module.factorized) or isinstance(module, FlopEmbedding):
                module.base_layer.weight.requires_grad_(False)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """FLOP trains the whole model by default: then the adapter checkpoint holds every trained tensor."""
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        if getattr(config, "train_base", False):
            superseded = {
                f"{name}.base_layer.weight"
                for name, module in model.named_modules()
                if (isinstance(module, FlopLinear) and module.factorized) or isinstance(module, FlopEmbedding)
            }
            superseded |= {k.removeprefix("_fsdp_wrapped_module.") for k in superseded}
            selected.update({k: v for k, v in state_dict.items() if k not in superseded})
        return selected

    # --- queries -----------------------------------------------------------------------------------
    @property
    def flop_config(self) -> FlopConfig:
        return next(iter(self.peft_config.values()))

    def flop_layers(self) -> dict[str, FlopLinear]:
        return {name: m for name, m in self.model.named_modules() if isinstance(m, FlopLinear)}

    def gates(self) -> dict[str, Gate]:
        """Every gate of the model by a readable name (rank gates under their module's name)."""
        found: dict[str, Gate] = {f"{n}.rank": m.gate for n, m in self.flop_layers().items() if m.factorized}
        found.update({f"{n}.block": m.block_gate for n, m in self.flop_layers().items() if m.block_size})
        found.update({g.key: self.flop_structure_gates[g.key] for g in self.structure_groups})
        embeddings = ((n, m) for n, m in self.model.named_modules() if isinstance(m, FlopEmbedding))
        found.update({f"{n}.embedding_{c}": g for n, m in embeddings for c, g in enumerate(m.flop_gates)})
        return found

    def gate_parameters(self) -> list[nn.Parameter]:
        return [p for gate in self.gates().values() for p in gate.parameters()]

    # --- unloading ---------------------------------------------------------------------------------
    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        """Fold the eval masks into dense weights and return the plain model (same shapes, zeros kept).

        ``hf_flop.compact`` is what makes the model smaller; this is PEFT's merge verb.
        """
        masks = {
            g.consumer: (self.flop_structure_gates[g.key].deterministic_mask().detach(), g.consumer_unit)
            for g in self.structure_groups
        }
        for handle in self._hook_handles:
            handle.remove()
        unload_embedding(self.model, merge=True)
        model = super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name, (mask, unit) in masks.items():
                layer = modules[name]
                scale = mask.repeat_interleave(unit)
                if isinstance(layer, nn.Linear):
                    layer.weight.mul_(scale[None, :])
                else:  # Conv1D: (in, out)
                    layer.weight.mul_(scale[:, None])
        return model


def _structure_groups(model: nn.Module, spec: ArchSpec, levels: set[str]) -> list[StructureGroup]:
    groups = []
    for i, layout in enumerate(block_layouts(model, spec)):
        p = layout.prefix
        if "head" in levels:
            hd, gs, kv = layout.head_dim, layout.group_size, layout.kv_heads
            q_width = layout.heads * hd
            if spec.fused_qkv:
                producers = [
                    Segment(f"{p}.{spec.q}", gs * hd, 0),
                    Segment(f"{p}.{spec.k}", hd, q_width),
                    Segment(f"{p}.{spec.v}", hd, q_width + kv * hd),
                ]
            else:
                producers = [
                    Segment(f"{p}.{spec.q}", gs * hd),
                    Segment(f"{p}.{spec.k}", hd),
                    Segment(f"{p}.{spec.v}", hd),
                ]
            groups.append(StructureGroup(f"head_{i}", "head", p, kv, f"{p}.{spec.o}", gs * hd, producers))
        if "row" in levels:
            producers = [Segment(f"{p}.{up}", 1) for up in spec.up]
            groups.append(StructureGroup(f"row_{i}", "row", p, layout.intermediate, f"{p}.{spec.down}", 1, producers))
    return groups
