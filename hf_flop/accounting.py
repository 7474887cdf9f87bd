"""Parameter accounting: how many prunable parameters the gates keep, expected and deterministic.

For a targeted linear of shape ``(out, in)`` whose rank gate keeps ``r`` components and whose
head/row gates keep ``in'`` input and ``out'`` output features, compaction writes either two small
matrices, ``r (in' + out')`` parameters, or one dense matrix, ``in' out'``, whichever is smaller.
The deterministic count is exactly that. The expected count uses expectations of ``r``, ``in'``
and ``out'`` under the gates; its value is the same ``min``, but its gradient is always the
factorized term's, so the constraint pushes rank gates even while a layer is still above the
break-even rank (where ``min`` alone would give no gradient). A block-gated layer (level
``"block"``) keeps ``kept blocks * block_size^2`` parameters (see ``hf_flop.blocks``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .blocks import block_params
from .gates import Gate
from .layers import FlopLinear, round_up


@dataclass
class ModuleSparsity:
    """What the gates keep of one targeted linear."""

    shape: tuple[int, int]  # (out, in) of the original
    kept_shape: tuple[int, int]  # (out', in') after head/row pruning
    rank: int | None  # full rank, None for dense (non-factorized) layers
    kept_rank: int | None
    kept_params: int
    factorized_after_compaction: bool
    blocks: int | None = None  # block grid size, None without level "block"
    kept_blocks: int | None = None


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
    structures: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)  # block -> level -> (kept, total)

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
        for block, levels in self.structures.items():
            kept = ", ".join(f"{lvl} {k}/{t}" for lvl, (k, t) in levels.items())
            lines.append(f"{block[-48:]:<48} {kept}")
        return "\n".join(lines)


def _kept_units(gate: Gate, deterministic: bool) -> torch.Tensor:
    if deterministic:
        return (gate.deterministic_mask() != 0).sum()
    return gate.expected_l0()


def _kept_dims(flop_model, deterministic: bool) -> tuple[dict, dict]:
    """Per module name: kept input features and kept output features (tensors), from head/row gates."""
    round_to = flop_model.flop_config.round_to
    kept_in, kept_out = {}, {}
    for group in flop_model.structure_groups:
        units = _kept_units(flop_model.flop_structure_gates[group.key], deterministic)
        if deterministic:  # compaction keeps one (zeroed) unit of an all-closed block, rows rounded up
            units = torch.tensor(max(int(units), 1))
            if group.level == "row":
                units = torch.tensor(round_up(int(units), round_to, group.n_units))
        else:  # the same floor in expectation, so expected and eval counts agree once gates are decided
            units = units.clamp(min=1.0)
        kept_in[group.consumer] = units * group.consumer_unit
        for seg in group.producers:
            kept_out.setdefault(seg.module, []).append((units * seg.unit, seg.unit * group.n_units))
    return kept_in, kept_out


def _module_params(layer: FlopLinear, in_k, out_k, deterministic: bool, round_to: int):
    """(kept params, kept rank, factorized-after-compaction) of one layer."""
    if layer.block_size:
        return block_params(layer, in_k, out_k, deterministic), None, False
    if not layer.factorized:
        return in_k * out_k, None, False
    return _factor_params(layer.gate, layer.rank, in_k, out_k, deterministic, round_to)


def _factor_params(gate: Gate, full_rank: int, in_k, out_k, deterministic: bool, round_to: int):
    """(kept params, kept rank, factorized-after-compaction) of a gated factorization ``P diag(z) Q``."""
    dense = in_k * out_k
    rank = _kept_units(gate, deterministic)
    if deterministic:
        rank = torch.tensor(round_up(max(int(rank), 1), round_to, full_rank))  # compaction keeps >= 1
    else:
        rank = rank.clamp(min=1.0)  # the same floor in expectation
    factored = rank * (in_k + out_k)
    if deterministic or factored < dense:
        keep_factored = bool(factored < dense)
        return (factored if keep_factored else dense), rank, keep_factored
    # value of the dense branch, gradient of the factorized one (see the module docstring)
    return dense.detach() + factored - factored.detach(), rank, False


def sparsity_report(model: nn.Module, *, differentiable: bool = False) -> SparsityReport:
    """The pruning state of a FLOP model (a ``PeftModel`` or ``FlopModel``).

    With ``differentiable=True`` the expected fields are tensors connected to the gate
    parameters, ready to be constrained by the trainer.
    """
    flop_model = find_flop_model(model)
    config = flop_model.flop_config
    layers = flop_model.flop_layers()
    report = SparsityReport(0, 0.0, 0, 0.0, 0.0, config.target_sparsity)
    expected_total = torch.zeros(())
    det_total = 0
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        exp_in, exp_out = _kept_dims(flop_model, deterministic=False)
    with torch.no_grad():
        det_in, det_out = _kept_dims(flop_model, deterministic=True)
        for group in flop_model.structure_groups:
            mask = flop_model.flop_structure_gates[group.key].deterministic_mask()
            report.structures.setdefault(group.block, {})[group.level] = (int((mask != 0).sum()), group.n_units)
    for name, layer in layers.items():
        out_f, in_f = layer.out_features, layer.in_features
        report.prunable_params += out_f * in_f
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            e_in = exp_in.get(name, torch.tensor(float(in_f)))
            e_out = _out_dim(exp_out.get(name), out_f)
            e_params, _, _ = _module_params(layer, e_in, e_out, False, config.round_to)
            expected_total = expected_total.to(e_params.dtype) + e_params
        with torch.no_grad():
            d_in = int(det_in.get(name, in_f))
            d_out = int(_out_dim(det_out.get(name), out_f))
            d_params, d_rank, factored = _module_params(
                layer, torch.tensor(d_in), torch.tensor(d_out), True, config.round_to
            )
        det_total += int(d_params)
        report.modules[name] = ModuleSparsity(
            shape=(out_f, in_f),
            kept_shape=(d_out, d_in),
            rank=layer.rank if layer.factorized else None,
            kept_rank=int(d_rank) if d_rank is not None else None,
            kept_params=int(d_params),
            factorized_after_compaction=factored,
        )
        if layer.block_size:
            mask = layer.block_gate.deterministic_mask()
            report.modules[name].blocks, report.modules[name].kept_blocks = mask.numel(), int((mask != 0).sum())
    for name, layer in _embeddings(flop_model):  # level "embedding": one entry per vocabulary cluster
        report.prunable_params += layer.num_embeddings * layer.hidden
        for c, (size, gate) in enumerate(zip(layer.sizes, layer.flop_gates)):
            n, d = torch.tensor(float(size)), torch.tensor(float(layer.hidden))
            with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
                e_params, _, _ = _factor_params(gate, gate.n, n, d, False, config.round_to)
                expected_total = expected_total.to(e_params.dtype) + e_params
            with torch.no_grad():
                d_params, d_rank, factored = _factor_params(gate, gate.n, n, d, True, config.round_to)
            det_total += int(d_params)
            report.modules[f"{name}.cluster_{c}"] = ModuleSparsity(
                shape=(size, layer.hidden),
                kept_shape=(size, layer.hidden),
                rank=gate.n,
                kept_rank=int(d_rank),
                kept_params=int(d_params),
                factorized_after_compaction=factored,
            )
    total = max(report.prunable_params, 1)
    report.expected_kept_params = expected_total if differentiable else float(expected_total)
    report.deterministic_kept_params = det_total
    exp_sparsity = 1.0 - expected_total / total
    report.expected_sparsity = exp_sparsity if differentiable else float(exp_sparsity)
    report.deterministic_sparsity = 1.0 - det_total / total
    return report


def _embeddings(flop_model):
    from .embedding import FlopEmbedding

    return [(n, m) for n, m in flop_model.model.named_modules() if isinstance(m, FlopEmbedding)]


def _out_dim(segments, out_features: int):
    if not segments:
        return torch.tensor(float(out_features))
    covered = sum(total for _, total in segments)
    return sum(kept for kept, _ in segments) + (out_features - covered)


def expected_sparsity(model: nn.Module) -> torch.Tensor:
    """Differentiable expected fraction of the prunable parameters removed (what the trainer constrains)."""
    return sparsity_report(model, differentiable=True).expected_sparsity


def min_reachable_kept_params(model: nn.Module) -> int:
    """Prunable parameters left with every gate closed: the floor under any target."""
    flop_model = find_flop_model(model)
    gated_consumers = {g.consumer for g in flop_model.structure_groups}
    gated_producers = {s.module for g in flop_model.structure_groups for s in g.producers}
    floor = 0
    for name, layer in flop_model.flop_layers().items():
        if layer.factorized or layer.block_size or name in gated_consumers or name in gated_producers:
            continue  # a closed gate can take this layer to (almost) nothing
        floor += layer.in_features * layer.out_features
    return floor


def find_flop_model(model: nn.Module):
    """The ``FlopModel`` inside a ``PeftModel`` (or the object itself), or a clear error."""
    from .model import FlopModel

    for candidate in (
        model,
        getattr(model, "base_model", None),
        getattr(getattr(model, "module", None), "base_model", None),
    ):
        if isinstance(candidate, FlopModel):
            return candidate
    raise ValueError(
        f"{type(model).__name__} has no FLOP layers; wrap it first with hf_flop.get_flop_model(model, FlopConfig(...))."
    )
