"""Parameter accounting: how many prunable parameters the gates keep, expected and deterministic.

The prunable parameters are those of every gated module (the targeted linears; the embedding's
clusters with level ``"embedding"``). Head/row groups cut the kept input and output features of the
linears (``hf_flop.groups.kept_features``); each gated module then counts what it keeps with its
``count`` verb, which applies the rules of ``hf_flop.counting``. The deterministic count is exactly
what compaction writes; the expected count is its differentiable counterpart under the gates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .depth import depth_factors, depth_structures
from .fsdp import check_gates_unsharded
from .gated import ModuleSparsity
from .groups import ROUNDED_LEVELS, kept_features, output_features
from .hidden_cuts import narrowing, stream_linears
from .lookup import find_flop_model

__all__ = [
    "ModuleSparsity",
    "SparsityReport",
    "TargetCheck",
    "check_target",
    "expected_sparsity",
    "find_flop_model",
    "sparsity_report",
]

# the target counts as met within this many points of the prunable parameters (see check_target)
TARGET_TOLERANCE = 0.01


@dataclass
class SparsityReport:
    """Model-level and per-module pruning state. ``print(report)`` renders a table."""

    prunable_params: int
    expected_kept_params: float | torch.Tensor
    deterministic_kept_params: int
    expected_sparsity: float | torch.Tensor
    deterministic_sparsity: float
    target_sparsity: float
    modules: dict[str, ModuleSparsity] = field(default_factory=dict)
    # head/row groups: transformer layer -> level -> (kept units, units)
    structures: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    # level "layer": the transformer layers the eval mask removes, and removed sublayers ("<layer>.attention"/".ffn")
    layers_removed: list[str] = field(default_factory=list)
    sublayers_removed: list[str] = field(default_factory=list)

    def __getitem__(self, key: str):
        return getattr(self, key)

    def keys(self) -> list[str]:
        return list(self.__dataclass_fields__)

    def __str__(self) -> str:
        exp = float(self.expected_sparsity)
        lines = [
            f"prunable params {self.prunable_params:,} | kept (eval mask) {self.deterministic_kept_params:,} | "
            f"sparsity: eval {self.deterministic_sparsity:.4f}, expected {exp:.4f}, target {self.target_sparsity:.4f}",
            f"{'module':<48} {'shape':>12} {'kept shape':>12} {'rank':>11} {'params':>10}",
        ]
        for name, m in self.modules.items():
            rank = f"{m.kept_rank}/{m.rank}" if m.rank is not None else "dense"
            rank = f"blk {m.kept_blocks}/{m.blocks}" if m.blocks is not None else rank
            lines.append(
                f"{name[-48:]:<48} {m.shape[0]:>5}x{m.shape[1]:<6} {m.kept_shape[0]:>5}x{m.kept_shape[1]:<6} "
                f"{rank:>11} {m.kept_params:>10,}"
            )
        for layer, levels in self.structures.items():
            kept = ", ".join(f"{lvl} {k}/{t}" for lvl, (k, t) in levels.items())
            lines.append(f"{layer[-48:]:<48} {kept}")
        for what, removed in (("layers", self.layers_removed), ("sublayers", self.sublayers_removed)):
            if removed:
                lines.append(f"{what} removed ({len(removed)}): {', '.join(removed)}")
        return "\n".join(lines)


def _count_all(flop_model, deterministic: bool) -> dict[str, ModuleSparsity]:
    """Every gated module's report entries, by entry name."""
    gates, round_to = flop_model.flop_structure_gates, flop_model.flop_config.round_to
    kept_in, kept_out = kept_features(flop_model.structure_groups, gates, deterministic, round_to)
    # a module inside a removed layer keeps nothing: its count times the layer's keep value (0/1, or P(z != 0))
    factors = depth_factors(flop_model, deterministic)
    narrow = narrowing(flop_model, deterministic)  # level "hidden": the kept residual channels
    entries = {}
    for name, layer in flop_model.gated_layers().items():
        out_f, in_f = layer.shape
        k_in = kept_in.get(name, torch.tensor(float(in_f)))
        k_out = output_features(kept_out.get(name), out_f)
        k_in, k_out = narrow(name, k_in, k_out)
        if deterministic:
            k_in, k_out = torch.tensor(int(k_in)), torch.tensor(int(k_out))
        counted = layer.count(k_in, k_out, deterministic=deterministic, round_to=round_to)
        if name in factors:
            for entry in counted.values():
                entry.kept_params = entry.kept_params * factors[name]
                if deterministic and not factors[name]:
                    entry.kept_shape = (0, 0)
        entries.update({name + suffix: entry for suffix, entry in counted.items()})
    return entries


def sparsity_report(model: nn.Module, *, differentiable: bool = False) -> SparsityReport:
    """The pruning state of a FLOP model (a ``PeftModel`` or ``FlopModel``).

    With ``differentiable=True`` the expected fields are tensors connected to the gate
    parameters, ready to be constrained by the trainer.
    """
    flop_model = find_flop_model(model)
    check_gates_unsharded(model)  # FSDP shards would fail deep in the arithmetic below
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        expected = _count_all(flop_model, deterministic=False)
    with torch.no_grad():
        deterministic = _count_all(flop_model, deterministic=True)
        structures: dict[str, dict[str, tuple[int, int]]] = {}
        for group in flop_model.structure_groups:
            kept = int(flop_model.flop_structure_gates[group.key].l0(True))
            structures.setdefault(group.layer, {})[group.level] = (kept, group.n_units)
    for entry in deterministic.values():
        entry.kept_params = int(entry.kept_params)
    prunable = sum(e.shape[0] * e.shape[1] for e in deterministic.values())
    expected_total = sum((e.kept_params for e in expected.values()), torch.zeros(()))
    det_total = sum(e.kept_params for e in deterministic.values())
    total = max(prunable, 1)
    exp_sparsity = 1.0 - expected_total / total
    return SparsityReport(
        prunable_params=prunable,
        expected_kept_params=expected_total if differentiable else float(expected_total),
        deterministic_kept_params=det_total,
        expected_sparsity=exp_sparsity if differentiable else float(exp_sparsity),
        deterministic_sparsity=1.0 - det_total / total,
        target_sparsity=flop_model.flop_config.target_sparsity,
        modules=deterministic,
        structures=structures,
        layers_removed=depth_structures(flop_model)["layers"],
        sublayers_removed=depth_structures(flop_model)["sublayers"],
    )


def expected_sparsity(model: nn.Module) -> torch.Tensor:
    """Differentiable expected fraction of the prunable parameters removed (what the trainer constrains)."""
    return sparsity_report(model, differentiable=True).expected_sparsity


def min_reachable_kept_params(model: nn.Module) -> int:
    """Prunable parameters left with every gate closed: the floor under any target."""
    flop_model = find_flop_model(model)
    grouped = {g.consumer for g in flop_model.structure_groups}
    grouped |= {s.module for g in flop_model.structure_groups for s in g.producers}
    grouped |= {name for name, units in getattr(flop_model, "depth_cover", {}).items() if units}  # removable layers
    grouped |= stream_linears(flop_model)
    floor = 0
    for name, layer in flop_model.flop_layers().items():
        if layer.gates() or name in grouped:
            continue  # a closed gate can take this layer to (almost) nothing
        floor += layer.in_features * layer.out_features
    return floor


def check_reachable(model: nn.Module) -> None:
    """Raise ``ValueError`` when the model's ``FlopConfig.target_sparsity`` is above what closing every gate gives."""
    flop_model = find_flop_model(model)
    config = flop_model.flop_config
    floor = min_reachable_kept_params(model)
    if floor == 0:
        return  # every prunable parameter can go: any target below 1 is reachable
    prunable = sparsity_report(model).prunable_params
    reachable = 1.0 - floor / prunable
    if config.target_sparsity > reachable + 1e-9:
        raise ValueError(
            f"FlopConfig.target_sparsity={config.target_sparsity} cannot be reached: with levels {config.levels}, "
            f"{floor:,} of the {prunable:,} prunable parameters sit in layers no gate can shrink, so the sparsity "
            f"is at most {reachable:.4f}. Lower the target, or add 'rank' to levels (or narrow target_modules to "
            "layers that head/row gates reach)."
        )


def largest_unit_params(model: nn.Module) -> float:
    """About how many prunable parameters the largest gate unit stands for (a rank component, a block, a
    head or KV group, an FFN row): the weights of the modules a gate shrinks, divided by its units.

    Under ``FlopConfig(uniform_shapes=True)`` the masks move in uniform slices (``hf_flop.uniform``):
    one head, or ``round_to`` FFN rows, in every layer at once; the largest slice counts then."""
    flop_model = find_flop_model(model)
    config = flop_model.flop_config
    largest = 0.0
    for layer in flop_model.gated_layers().values():
        out_f, in_f = layer.shape
        for gate in layer.gates().values():
            largest = max(largest, out_f * in_f / max(gate.n, 1))
    slices: dict[str, float] = {}
    for layer in flop_model.gated_layers().values():  # units beyond (out, in) shapes: a MoE layer's experts
        for level, (unit, part) in layer.unit_slices(config.round_to).items():
            largest = max(largest, unit)
            slices[level] = slices.get(level, 0.0) + part
    layers = flop_model.flop_layers()
    for group in flop_model.structure_groups:
        modules = {group.consumer, *(s.module for s in group.producers)}  # GPT-2: q, k, v share one module
        unit = sum(layers[m].shape[0] * layers[m].shape[1] for m in modules) / max(group.n_units, 1)
        largest = max(largest, unit)
        width = config.round_to if group.level in ROUNDED_LEVELS else 1
        slices[group.level] = slices.get(group.level, 0.0) + unit * width
    depth: dict[int, float] = {}  # level "layer": a unit is every gated module of its layer (or sublayer)
    gated = flop_model.gated_layers()
    for name, units in getattr(flop_model, "depth_cover", {}).items():
        out_f, in_f = gated[name].shape
        for u in units:
            depth[u.index] = depth.get(u.index, 0.0) + out_f * in_f
    largest = max(largest, *depth.values(), 0.0)
    if config.uniform_shapes:
        largest = max(largest, *slices.values(), 0.0)
    return largest


@dataclass
class TargetCheck:
    """Where a pruned model's size ended against its target (``check_target``)."""

    sparsity: float  # from the eval masks: what compaction keeps
    expected: float  # what the trainer's constraint held
    target: float
    tolerance: float

    @property
    def gap(self) -> float:
        """``sparsity - target``: negative when the model kept more than the target allows."""
        return self.sparsity - self.target

    @property
    def met(self) -> bool:
        return abs(self.gap) <= self.tolerance

    def describe(self) -> str:
        """One sentence: the final sparsity, the target and the miss (if any)."""
        side = "short of" if self.gap < 0 else "past"
        miss = f": {abs(self.gap):.3f} {side} it" if not self.met else ", within"
        return (
            f"sparsity {self.sparsity:.3f} (eval masks, what compaction keeps) for a target of {self.target:.3f}"
            f"{miss} (tolerance {self.tolerance:.3f})"
        )


def check_target(model: nn.Module) -> TargetCheck:
    """The model's eval-mask sparsity against ``FlopConfig.target_sparsity``, with the tolerance that counts as met.

    The tolerance is the larger of ``TARGET_TOLERANCE`` (one point of the prunable parameters, the
    precision the trainer reaches on the test task) and half the largest gate unit: the eval-mask
    size moves in whole units (a head can be several points of a small model), so a target between
    two unit counts is met within half a unit (under ``uniform_shapes``, half a uniform slice).
    """
    report = sparsity_report(model)
    unit = largest_unit_params(model) / max(report.prunable_params, 1)
    return TargetCheck(
        sparsity=report.deterministic_sparsity,
        expected=float(report.expected_sparsity),
        target=report.target_sparsity,
        tolerance=max(TARGET_TOLERANCE, unit / 2),
    )
