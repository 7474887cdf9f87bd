"""Level ``"layer"``: depth pruning, one gate unit per transformer layer (or per sublayer).

A *depth unit* (``DepthUnit``) is one transformer layer, or with ``FlopConfig(layer_granularity=
"sublayer")`` the attention or the FFN sublayer of one layer. All units of a model share one gate
(``FlopModel.flop_structure_gates["layer"]`` or ``["sublayer"]``), so one-shot pruning ranks the
layers against each other and keeps at least one.

* A layer unit acts on the layer's output: ``h_out = h_in + z * (layer(h_in) - h_in)`` (a forward hook
  on the layer module; the hidden states are its first output). ``z = 0`` is exactly the layer skipped,
  for pre-norm decoders and post-norm encoders (BERT) alike.
* A sublayer unit multiplies the sublayer's residual branch (``ArchSpec.branches``: the output
  projection, or a norm on the branch such as Gemma's ``post_attention_layernorm``) before the residual
  add. Only exact where the layer is ``h + branch(h)`` per sublayer (``ArchSpec.pre_norm_residual``);
  post-norm layers (``LayerNorm(h + f(h))``) are refused.

Accounting (``depth_factors``): a unit covers the gated modules of its layer (or sublayer); each such
module's kept count is multiplied by the unit's keep value (deterministic: 0 or 1; expected: its
``P(z != 0)``), so a head or FFN row inside a removed layer counts nothing and the expected size is the
product of the layer's keep probability and the inner expected count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .architectures import ArchSpec, arch_spec, find_layers
from .gated import GatedUnits
from .gates import Gate

DEPTH_GATES = ("layer", "sublayer")  # FlopModel.flop_structure_gates keys of level "layer", by granularity
PARTS = ("attention", "ffn")  # the sublayers, in forward order


@dataclass(frozen=True)
class DepthUnit:
    """One unit of the depth gate: a transformer layer, or its attention / FFN sublayer."""

    gate: str  # "layer" or "sublayer"
    index: int  # the unit's position in the gate
    layer: str  # the transformer layer's module name, e.g. "model.layers.3"
    position: int  # the layer's index in its ModuleList
    part: str  # "layer", "attention" or "ffn"
    hooked: str  # the module the gate acts on: the layer, or the sublayer's residual-branch output
    covers: tuple[str, ...]  # modules (with their submodules) whose parameters the unit removes
    replaced: str = ""  # sublayers: the module compaction replaces by a no-op (the attention / FFN module)

    def covers_module(self, name: str) -> bool:
        return any(name == c or name.startswith(c + ".") for c in self.covers)


def depth_units(model: nn.Module, spec: ArchSpec, granularity: str) -> list[DepthUnit]:
    """The depth units of ``model``, layer by layer (attention before FFN); none in ``ArchSpec.fixed_layers``."""
    units = []
    names = find_layers(model, spec)
    fixed = {i % len(names) for i in spec.fixed_layers}
    for position, layer in enumerate(names):
        if position in fixed:
            continue
        if granularity == "layer":
            units.append(DepthUnit("layer", len(units), layer, position, "layer", layer, (layer,)))
            continue
        attention = tuple(dict.fromkeys(f"{layer}.{m}" for m in (spec.q, spec.k, spec.v, spec.o)))
        ffn = tuple(dict.fromkeys(f"{layer}.{m}" for m in (*spec.up, spec.down)))
        replaced = (f"{layer}.{spec.attention}", f"{layer}.{spec.ffn}")
        for part, covers, branch, module in zip(PARTS, (attention, ffn), spec.branches, replaced):
            units.append(DepthUnit("sublayer", len(units), layer, position, part, f"{layer}.{branch}", covers, module))
    return units


class LayerSkip:
    """Forward hook on a transformer layer: ``h_in + z (layer(h_in) - h_in)``, ``z`` its depth gate's value.

    A callable object (not a closure) so that ``copy.deepcopy`` of the model carries a hook bound to the
    copied gate, as ``hf_flop.groups.InputMask`` does.
    """

    def __init__(self, gate: Gate, index: int) -> None:
        self.gate = gate
        self.index = index

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        out = output[0] if isinstance(output, tuple) else output
        z = self.gate()[self.index].to(out.dtype)
        mixed = hidden + z * (out - hidden)
        return (mixed, *output[1:]) if isinstance(output, tuple) else mixed


class BranchGate:
    """Forward hook on a sublayer's residual-branch output: the branch times its depth gate's value."""

    def __init__(self, gate: Gate, index: int) -> None:
        self.gate = gate
        self.index = index

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output * self.gate()[self.index].to(output.dtype)


def check_depth_level(model: nn.Module, config, targets: list[str]) -> None:
    """Refuse, before any work, a level ``"layer"`` this model cannot take (see the messages)."""
    model_type = model.config.model_type
    spec = arch_spec(model_type)
    flags = [flag for flag in spec.layer_index_flags if getattr(model.config, flag, False)]
    if flags:
        raise ValueError(
            f"level 'layer' cannot remove layers of this {model_type!r} model: its config sets {flags}, so each layer "
            "computes with its own index and removing one would change the layers after it. Set those flags to "
            "False, or drop the level."
        )
    if spec.experts is not None:
        raise ValueError(
            f"level 'layer' does not support mixture-of-experts models yet: {model_type!r} configs place their expert "
            "layers by index (mlp_only_layers, decoder_sparse_step), which removing layers would shift. Prune experts "
            "and rows with levels 'expert' and 'row', or drop level 'layer'."
        )
    if config.layer_granularity == "sublayer":
        if not spec.pre_norm_residual:
            raise ValueError(
                f"layer_granularity='sublayer' needs layers that add each sublayer to the residual stream unnormalised "
                f"(pre-norm residual, ArchSpec.pre_norm_residual), but {model_type!r} layers are post-norm "
                "(LayerNorm(h + sublayer(h))): removing the attention or the FFN alone would still leave its norm, "
                "so it cannot be dropped exactly. Use layer_granularity='layer' (a whole layer is skipped exactly)."
            )
        if not spec.ffn:
            raise ValueError(
                f"layer_granularity='sublayer' compacts a removed FFN by replacing its module, but the {model_type!r} "
                f"FFN projections {list(spec.up) + [spec.down]} share no parent module. Use layer_granularity='layer'."
            )
    units = depth_units(model, spec, config.layer_granularity)
    if not units:
        raise ValueError(
            f"level 'layer' can remove nothing from this {model_type!r} model: its only layers are built unlike the "
            f"others by position (ArchSpec.fixed_layers={list(spec.fixed_layers)}), so none can go. Drop the level."
        )
    if not any(u.covers_module(name) for u in units for name in targets):
        raise ValueError(
            "level 'layer' can remove nothing: no targeted module lies in a transformer layer, so removing one would "
            "not change the prunable parameters. Target the layers' projections (target_modules=None), or drop it."
        )


def inject_depth(flop_model, model: nn.Module, config, gate_factory) -> list:
    """Add the depth gate to ``flop_model`` and hook it into ``model``; returns the hook handles."""
    spec = arch_spec(model.config.model_type)
    units = depth_units(model, spec, config.layer_granularity)
    gate = gate_factory(len(units))
    flop_model.flop_structure_gates[units[0].gate] = gate
    flop_model.depth_units = units
    gated = list(flop_model.gated_layers())
    # which units cover each gated module (fixed after injection), for the accounting
    flop_model.depth_cover = {n: [u for u in units if u.covers_module(n)] for n in gated}
    modules = dict(model.named_modules())
    handles = []
    for u in units:
        if u.part == "layer":
            handles.append(modules[u.hooked].register_forward_hook(LayerSkip(gate, u.index), with_kwargs=True))
        else:
            handles.append(modules[u.hooked].register_forward_hook(BranchGate(gate, u.index)))
    return handles


def units_of(flop_model) -> list[DepthUnit]:
    """The depth units of a FLOP model (none without level ``"layer"``)."""
    return getattr(flop_model, "depth_units", [])


def depth_gate(flop_model) -> Gate | None:
    units = units_of(flop_model)
    return flop_model.flop_structure_gates[units[0].gate] if units else None


def depth_keep(flop_model, deterministic: bool) -> torch.Tensor | None:
    """Per depth unit: 1/0 (eval mask open or not) or, in expectation, ``P(z != 0)``; None without depth units."""
    gate = depth_gate(flop_model)
    if gate is None:
        return None
    if deterministic:
        return (gate.deterministic_mask().detach() != 0).float()
    return gate.keep_probability()


def depth_factors(flop_model, deterministic: bool) -> dict[str, torch.Tensor]:
    """Per gated module inside a depth unit: the factor its kept count is multiplied by (see the module docstring)."""
    keep = depth_keep(flop_model, deterministic)
    if keep is None:
        return {}
    factors = {}
    for name, units in flop_model.depth_cover.items():
        for u in units:
            factors[name] = factors[name] * keep[u.index] if name in factors else keep[u.index]
    return factors


def removed_units(flop_model) -> list[DepthUnit]:
    """The depth units the eval mask closes (what compaction removes)."""
    keep = depth_keep(flop_model, True)
    return [u for u in units_of(flop_model) if keep is not None and keep[u.index] == 0]


def removed_layer_names(flop_model) -> set[str]:
    """Modules whose output no longer matters: removed layers, and the covered modules of removed sublayers."""
    return {c for u in removed_units(flop_model) for c in u.covers}


def check_foldable(flop_model) -> None:
    """Refuse depth eval-mask values other than 0 and 1: a layer kept at ``0 < z < 1`` blends its input and
    output, which no stock layer computes."""
    gate = depth_gate(flop_model)
    if gate is None:
        return
    mask = gate.deterministic_mask().detach()
    soft = [
        u.layer + ("" if u.part == "layer" else f" ({u.part})") for u in units_of(flop_model) if 0 < mask[u.index] < 1
    ]
    if soft:
        raise ValueError(
            f"the depth gate keeps {soft[:3]}{' ...' if len(soft) > 3 else ''} at eval values between 0 and 1, which "
            "blend a layer's input and output: no compacted layer computes that. Fix the masks first with "
            "hf_flop.oneshot.fix_masks_at_target(model) (prune_oneshot and PruningTrainer.train() do it)."
        )


def depth_gated_units(flop_model) -> list[GatedUnits]:
    """The scoring record of the depth gate: per unit, the squared weights it owns (magnitude score); no observed
    module (the activation-style scores give it its Block Influence, ``hf_flop.depth_scores``)."""
    units = units_of(flop_model)
    if not units:
        return []
    layers = flop_model.gated_layers()
    sq = torch.zeros(len(units))
    params = torch.zeros(len(units))
    for name, covering in flop_model.depth_cover.items():
        weight = layers[name]
        if not hasattr(weight, "folded_weight"):
            continue
        w = weight.folded_weight().detach().float()
        for u in covering:
            sq[u.index] += w.pow(2).sum().cpu()
            params[u.index] += w.numel()
    return [
        GatedUnits(
            key=units[0].gate,
            level="layer",
            gate=depth_gate(flop_model),
            n_units=len(units),
            unit=1,
            unit_params=int(params.mean()),
            observed=None,
            column_sq_norms=sq,
            row_sq_norms=torch.ones(len(units)),
            module="",
            unit_layers=tuple(u.layer for u in units),
        )
    ]


def depth_structures(flop_model) -> dict[str, list[str]]:
    """What the eval mask removes: ``{"layers": [...], "sublayers": ["<layer>.attention", ...]}``."""
    removed = removed_units(flop_model)
    return {
        "layers": [u.layer for u in removed if u.part == "layer"],
        "sublayers": [f"{u.layer}.{u.part}" for u in removed if u.part != "layer"],
    }
