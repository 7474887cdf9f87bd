"""Levels ``"head"``, ``"query_head"`` and ``"row"``: one gate over the attention heads, or the FFN rows, of a layer.

A *structure group* (``StructureGroup``) is one such gate with the modules it shrinks, built from
the architecture table (``hf_flop.architectures``). The gate masks the *consumer*'s input (the
attention output projection, or the FFN down projection) unit by unit: a head whose attention
output never reaches the output projection can have its Q/K/V rows removed exactly, and likewise
an FFN neuron that never reaches the down projection. Under grouped-query attention a unit of level
``"head"`` is a KV group (its KV head and the query heads sharing it).

Level ``"query_head"`` keeps every KV head and removes query heads inside the KV groups, so a
multi-query model (one KV head) can lose attention width too. The stock attention repeats each KV
head over the same number of query heads (``num_key_value_groups``), so every KV group of a layer
must keep as many query heads: a unit is a query-head *slot*, the ``j``-th query head of every KV
group (``StructureGroup.tiles`` = the KV heads: the slot's features repeat once per group). Its only
producer is Q (K and V are untouched); compaction rewrites the group size, and stays exact.

The gates live in the model (``FlopModel.flop_structure_gates``, keys ``head_<i>`` / ``query_head_<i>`` /
``row_<i>``),
not in one layer: they cut the kept input features of the consumer and the kept output features of
the *producers* (Q/K/V, or up/gate), which accounting and compaction read through
``kept_features`` and ``StructureCuts``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .architectures import ArchSpec, LayerLayout, arch_spec, layer_layouts
from .counting import compacted_count, expected_kept_count, kept_unit_indices, unit_features
from .gated import GatedUnits
from .gates import Gate

GROUP_LEVELS = ("head", "query_head", "row")
# FlopConfig.round_to applies to FFN widths (dense, and each expert's: "expert_row"), not to head counts
ROUNDED_LEVELS = ("row", "expert_row")


@dataclass(frozen=True)
class Segment:
    """Rows ``[offset + u * unit, offset + (u + 1) * unit)`` of ``module``'s output belong to unit ``u``
    (in each of the group's ``tiles`` blocks of ``n_units * unit`` rows)."""

    module: str
    unit: int
    offset: int = 0


@dataclass
class StructureGroup:
    """One gate over the heads (or FFN rows) of one transformer layer and the modules it shrinks."""

    key: str
    level: str
    layer: str  # the transformer layer's module name, e.g. "bert.encoder.layer.3"
    n_units: int
    consumer: str
    consumer_unit: int
    producers: list[Segment]
    norms: list[Segment] = field(default_factory=list)  # RMS norms over a whole producer's width, cut with it
    # the units' features repeat in this many consecutive blocks (query-head slots: once per KV group)
    tiles: int = 1

    def features(self, units: torch.Tensor, width: int) -> torch.Tensor:
        """Sorted feature indices of ``units`` in a span where each unit owns ``width`` features per tile."""
        blocks = torch.arange(self.tiles)[:, None] * (self.n_units * width)
        return (blocks + unit_features(units, width)).flatten()

    def feature_mask(self, mask: torch.Tensor, width: int) -> torch.Tensor:
        """A value per feature from a value per unit (``mask``), over the whole span."""
        return mask.repeat_interleave(width).repeat(self.tiles)

    def kept_units(self, gate: Gate, deterministic: bool, round_to: int):
        """Units compaction keeps (an int tensor), or their differentiable expectation."""
        if deterministic:
            rounding = round_to if self.level in ROUNDED_LEVELS else 1
            return torch.tensor(compacted_count(int(gate.l0(True)), self.n_units, rounding))
        return expected_kept_count(gate.l0(False))


def structure_groups(model: nn.Module, spec: ArchSpec, levels: set[str]) -> list[StructureGroup]:
    """The head and/or row groups of every transformer layer, layer by layer (heads first)."""
    groups = []
    names = {name for name, _ in model.named_modules()} if spec.head_extra_producers else set()
    for i, layout in enumerate(layer_layouts(model, spec)):
        p = layout.prefix
        if "head" in levels:
            hd, gs, kv = layout.head_dim, layout.group_size, layout.kv_heads
            q_width = layout.heads * hd
            units = {"q": gs * hd, "k": hd, "v": hd}  # rows of one KV group in each projection
            if spec.fused_qkv:  # q, k, v are consecutive slices of one output (GPT-2, Phi-3, ModernBERT)
                producers = [
                    Segment(f"{p}.{spec.q}", units["q"], 0),
                    Segment(f"{p}.{spec.k}", units["k"], q_width),
                    Segment(f"{p}.{spec.v}", units["v"], q_width + kv * hd),
                ]
            else:
                producers = [Segment(f"{p}.{getattr(spec, n)}", units[n]) for n in ("q", "k", "v")]
            # modules sliced per head like a projection (DeBERTa's position projections), where the layer has them
            producers += [
                Segment(f"{p}.{m}", units[proj]) for m, proj in spec.head_extra_producers.items() if f"{p}.{m}" in names
            ]
            norms = [Segment(f"{p}.{norm}", units[proj]) for norm, proj in spec.projection_norms.items()]
            groups.append(StructureGroup(f"head_{i}", "head", p, kv, f"{p}.{spec.o}", gs * hd, producers, norms))
        if "query_head" in levels:
            group = _query_head_group(f"query_head_{i}", layout, spec)
            group.producers += [
                Segment(f"{p}.{m}", layout.head_dim)
                for m, proj in spec.head_extra_producers.items()
                if proj == "q" and f"{p}.{m}" in names
            ]
            groups.append(group)
        if "row" in levels and layout.intermediate:  # a MoE layer's rows are its experts' (hf_flop.experts)
            # a fused producer ([gate; up]) holds its chunks one after the other, each cut the same way
            width = layout.intermediate
            producers = [Segment(f"{p}.{up}", 1, chunk * width) for up in spec.up for chunk in range(spec.up_chunks)]
            groups.append(StructureGroup(f"row_{i}", "row", p, layout.intermediate, f"{p}.{spec.down}", 1, producers))
    return groups


def _query_head_group(key: str, layout: LayerLayout, spec: ArchSpec) -> StructureGroup:
    """The query-head slots of one layer: unit ``j`` is the ``j``-th query head of every KV group.

    Q's rows are ``[group 0: its query heads; group 1: ...]``, as the output projection's columns, so
    one slot is ``head_dim`` features in each of the ``kv_heads`` blocks; with fused q/k/v, Q is the
    first slice. A norm over Q's whole width is cut with the query heads; K's norm is untouched.
    """
    p, hd = layout.prefix, layout.head_dim
    norms = [Segment(f"{p}.{norm}", hd) for norm, proj in spec.projection_norms.items() if proj == "q"]
    producers = [Segment(f"{p}.{spec.q}", hd)]
    return StructureGroup(
        key, "query_head", p, layout.group_size, f"{p}.{spec.o}", hd, producers, norms, tiles=layout.kv_heads
    )


class InputMask:
    """Forward pre-hook multiplying a consumer's input by its structure gate, unit by unit.

    A callable object rather than a closure so that ``copy.deepcopy`` of the model (e.g. to make a
    teacher) carries a hook bound to the copied gate.
    """

    def __init__(self, gate: Gate, group: StructureGroup) -> None:
        self.gate = gate
        self.group = group

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        mask = self.group.feature_mask(self.gate(), self.group.consumer_unit)
        return (args[0] * mask.to(args[0].dtype), *args[1:])


def kept_features(groups: list[StructureGroup], gates, deterministic: bool, round_to: int) -> tuple[dict, dict]:
    """Per module name: kept input features (consumers) and kept output features (producers).

    Producers map to ``[(kept, covered), ...]``, one pair per segment, from which ``output_features``
    adds the rows no group covers.
    """
    kept_in, kept_out = {}, {}
    for group in groups:
        units = group.kept_units(gates[group.key], deterministic, round_to) * group.tiles
        kept_in[group.consumer] = units * group.consumer_unit
        for seg in group.producers:
            kept_out.setdefault(seg.module, []).append((units * seg.unit, seg.unit * group.n_units * group.tiles))
    return kept_in, kept_out


def output_features(segments: list | None, out_features: int):
    """A producer's kept output features from its segments' ``(kept, covered)`` pairs (float tensor)."""
    if not segments:
        return torch.tensor(float(out_features))
    covered = sum(total for _, total in segments)
    return sum(kept for kept, _ in segments) + (out_features - covered)


class StructureCuts:
    """Which output rows and input columns of each targeted linear survive the head/row gates (eval masks),
    and what the compacted model's per-layer head counts and widths become."""

    def __init__(self, groups: list[StructureGroup], gates, model: nn.Module, round_to: int) -> None:
        self.cols: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # consumer -> (columns, mask values)
        self.segments: dict[str, list[tuple[int, int, torch.Tensor]]] = {}  # producer -> (start, length, rows)
        self.attributes: dict[str, dict[str, int]] = {}  # attention module -> {attribute: new value}
        self.layers: dict[str, dict[str, int]] = {}  # transformer layer -> kept heads / kv heads / FFN width
        self.norms: dict[str, torch.Tensor] = {}  # projection norm -> its kept features
        if not groups:
            return
        spec = arch_spec(model.config.model_type)
        layouts = {layout.prefix: layout for layout in layer_layouts(model, spec)}
        for group in groups:
            mask = gates[group.key].deterministic_mask().detach().float().cpu()
            count = int(group.kept_units(gates[group.key], True, round_to))
            units = kept_unit_indices(mask, count)
            self.cols[group.consumer] = (
                group.features(units, group.consumer_unit),
                group.feature_mask(mask[units], group.consumer_unit),
            )
            for seg in group.producers:
                self.segments.setdefault(seg.module, []).append(
                    (seg.offset, seg.unit * group.n_units * group.tiles, group.features(units, seg.unit))
                )
            for seg in group.norms:
                self.norms[seg.module] = group.features(units, seg.unit)
            layout = layouts[group.layer]
            before = {"heads": layout.heads, "kv_heads": layout.kv_heads, "intermediate": layout.intermediate}
            counts = self.layers.setdefault(group.layer, {**before, **{f"{k}_before": v for k, v in before.items()}})
            if group.level in ("head", "query_head"):
                if group.level == "head":  # whole KV groups go: the group size stays
                    heads = {"heads": count * layout.group_size, "kv_heads": count}
                    counted = {a: w for a, w in spec.attention_head_attrs.items() if w != "group_size"}
                else:  # query heads go, every KV head stays
                    heads = {"heads": count * layout.kv_heads, "kv_heads": layout.kv_heads, "group_size": count}
                    counted = spec.attention_head_attrs
                heads["q_width"] = heads["heads"] * layout.head_dim
                counts.update(heads=heads["heads"], kv_heads=heads["kv_heads"])
                attrs = {attr: heads[what] for attr, what in counted.items()}
                if attrs:
                    self.attributes[f"{group.layer}.{spec.attention}"] = attrs
            else:
                counts["intermediate"] = count

    def rows(self, name: str, out_features: int) -> torch.Tensor:
        keep = torch.ones(out_features, dtype=torch.bool)
        for start, length, rows in self.segments.get(name, []):
            span = torch.zeros(length, dtype=torch.bool)
            span[rows] = True
            keep[start : start + length] = span
        return keep.nonzero().squeeze(1)

    def columns(self, name: str, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cols.get(name, (torch.arange(in_features), torch.ones(in_features)))


def group_units(groups: list[StructureGroup], gates, layers: dict) -> list[GatedUnits]:
    """The scoring records of the head/row gates: producer rows and consumer columns of each unit,
    from the current effective weights (so head/row scores see what rank pruning left)."""
    found = []
    for group in groups:
        consumer = layers[group.consumer]
        columns = consumer.folded_weight().float()
        rows = torch.zeros(group.n_units, device=columns.device)
        unit_params = group.consumer_unit * group.tiles * consumer.out_features
        for seg in group.producers:
            producer = layers[seg.module]
            weight = producer.folded_weight().float()
            block = weight[seg.offset : seg.offset + group.n_units * seg.unit * group.tiles]
            rows += block.reshape(group.tiles, group.n_units, -1).pow(2).sum((0, 2))
            unit_params += seg.unit * group.tiles * producer.in_features
        # a unit's features, unit-major (a query-head slot's lie in every KV group's block)
        index = None
        if group.tiles > 1:
            index = torch.cat([group.features(torch.tensor([u]), group.consumer_unit) for u in range(group.n_units)])
        column_sq_norms = columns.pow(2).sum(0)
        if index is not None:
            column_sq_norms = column_sq_norms[index.to(column_sq_norms.device)]
        found.append(
            GatedUnits(
                key=group.key,
                level=group.level,
                gate=gates[group.key],
                n_units=group.n_units,
                unit=group.consumer_unit * group.tiles,
                unit_params=unit_params,
                observed=consumer,
                column_sq_norms=column_sq_norms,
                row_sq_norms=rows,
                feature_index=index,
                module=group.layer,
            )
        )
    return found


def check_heads_removable(model: nn.Module, levels: list[str]) -> None:
    """Refuse, before any work, a head level that could remove nothing from this model.

    Level ``"head"`` removes whole KV groups, so a model with one KV head per layer (multi-query
    attention) keeps it; level ``"query_head"`` removes query heads inside a KV group, so a model
    with one query head per KV head (no grouping) has none to remove, and an architecture whose
    attention states no group size (``ArchSpec.attention_head_attrs``) could not be compacted.
    """
    spec = arch_spec(model.config.model_type)
    layouts = layer_layouts(model, spec)
    model_type = model.config.model_type
    if "head" in levels and all(layout.kv_heads == 1 for layout in layouts):
        raise ValueError(
            f"level 'head' can remove nothing from this {model_type!r} model: every layer has a single KV head "
            "(multi-query attention: one KV head per layer), and a head unit is a KV group with the query heads "
            "that share it, so the head level could remove nothing. Use level 'query_head' instead (it removes "
            "query heads and keeps the KV head), or levels=['row']."
        )
    if "query_head" not in levels:
        return
    if all(layout.group_size == 1 for layout in layouts):
        raise ValueError(
            f"level 'query_head' removes query heads inside a KV group, but every layer of this {model_type!r} "
            "model has one query head per KV head (no grouped-query attention), so it could remove nothing. Use "
            "level 'head': it removes whole heads with their key and value rows."
        )
    if "group_size" not in spec.attention_head_attrs.values():
        raise ValueError(
            f"level 'query_head' changes how many query heads share a KV head, but the ArchSpec of {model_type!r} "
            "names no attention attribute holding that number (attention_head_attrs value 'group_size', e.g. "
            "{'num_key_value_groups': 'group_size'}), so the compacted attention would repeat K/V wrongly. Add it "
            "to the ArchSpec, or use level 'head'."
        )
