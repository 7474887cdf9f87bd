"""Compaction: a gated FLOP model -> a plain, smaller transformers model with the same eval outputs.

Every targeted linear is cut to what its gates keep, with the eval-mask values folded in:

* rank: the components with a non-zero gate (rounded up to ``round_to`` with closed components,
  whose folded gate is 0, so the result is exact) become two thin Linear layers ``in -> r' -> out``
  with ``z`` folded into ``P``, or one dense Linear ``P' Q'`` when ``r'(in' + out') >= in' out'``;
* head: a closed head group (a KV group under GQA) loses its Q/K/V output rows and the output
  projection's input columns; the gate value is folded into those columns;
* row: a closed FFN neuron loses its up/gate rows and the down projection's column, likewise.

A block whose heads (or rows) are all closed keeps one unit whose folded gate is 0: the block then
adds exactly nothing, as in the gated model, and the stock attention code still has a head to run.
The parameter count of the cut linears is ``sparsity_report(model).deterministic_kept_params``.

The result is an instance of ``FlopX`` (``hf_flop.modeling``), a subclass of the model's own class
``X`` whose config carries the per-layer shapes (``flop_plan``); when every shape is one a stock
config of ``X`` describes (no low-rank layer, uniform head counts and FFN widths), it is a plain
``X`` with that stock config, which needs no custom code to load.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from .accounting import find_flop_model
from .embedding import compact_embedding, find_embedding, find_tied_head
from .layers import FlopLinear, dense_weight, round_up
from .modeling import compacted_config_class, compacted_model_class, locate
from .structures import arch_spec, block_layouts

# config entries that describe a saved file, not the architecture
_NOT_ARCHITECTURE = ("model_type", "auto_map", "architectures", "transformers_version", "flop_plan")


def kept_units(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Sorted indices of ``count`` units: every open unit (``mask != 0``), then closed ones as padding."""
    order = torch.argsort((mask == 0).to(torch.int8), stable=True)
    return order[:count].sort().values


def _unit_features(units: torch.Tensor, width: int) -> torch.Tensor:
    return (units[:, None] * width + torch.arange(width)).flatten()


class _Cuts:
    """Which output rows and input columns of each targeted linear survive the head/row gates."""

    def __init__(self) -> None:
        self.cols: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # consumer -> (columns, mask values)
        self.segments: dict[str, list[tuple[int, int, torch.Tensor]]] = {}  # producer -> (start, length, rows)
        self.attributes: dict[str, dict[str, int]] = {}
        self.blocks: dict[str, dict[str, int]] = {}

    def rows(self, name: str, out_features: int) -> torch.Tensor:
        keep = torch.ones(out_features, dtype=torch.bool)
        for start, length, rows in self.segments.get(name, []):
            span = torch.zeros(length, dtype=torch.bool)
            span[rows] = True
            keep[start : start + length] = span
        return keep.nonzero().squeeze(1)


def _structure_cuts(flop_model) -> _Cuts:
    cuts = _Cuts()
    if not flop_model.structure_groups:
        return cuts
    model = flop_model.model
    spec = arch_spec(model.config.model_type)
    layouts = {layout.prefix: layout for layout in block_layouts(model, spec)}
    round_to = flop_model.flop_config.round_to
    for group in flop_model.structure_groups:
        mask = flop_model.flop_structure_gates[group.key].deterministic_mask().detach().float().cpu()
        count = max(int((mask != 0).sum()), 1)  # an all-closed block keeps one unit, folded to zero
        if group.level == "row":
            count = round_up(count, round_to, group.n_units)
        units = kept_units(mask, count)
        cuts.cols[group.consumer] = (
            _unit_features(units, group.consumer_unit),
            mask[units].repeat_interleave(group.consumer_unit),
        )
        for seg in group.producers:
            cuts.segments.setdefault(seg.module, []).append(
                (seg.offset, seg.unit * group.n_units, _unit_features(units, seg.unit))
            )
        layout = layouts[group.block]
        before = {"heads": layout.heads, "kv_heads": layout.kv_heads, "intermediate": layout.intermediate}
        block = cuts.blocks.setdefault(group.block, {**before, **{f"{k}_before": v for k, v in before.items()}})
        if group.level == "head":
            counts = {"heads": count * layout.group_size, "kv_heads": count}
            counts["q_width"] = counts["heads"] * layout.head_dim
            block.update(heads=counts["heads"], kv_heads=count)
            attrs = {attr: counts[what] for attr, what in spec.attention_head_attrs.items()}
            if attrs:
                cuts.attributes[f"{group.block}.{spec.attention}"] = attrs
        else:
            block["intermediate"] = count
    return cuts


@torch.no_grad()
def _compact_layer(layer: FlopLinear, rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, round_to: int):
    """``(plan entry, {tensor name: tensor})`` of one targeted linear."""
    if getattr(layer, "block_size", None):  # level "block": hf_flop.blocks owns that layout
        from .blocks import compact_block_layer

        return compact_block_layer(layer, rows, cols, scale)
    bias = layer.bias.detach()[rows] if layer.bias is not None else None
    dtype = dense_weight(layer.base_layer).dtype
    if layer.factorized and not layer.merged:
        p, q = (t.detach().float().cpu() for t in layer.factors())
        z = layer.gate.deterministic_mask().detach().float().cpu()
        rank = round_up(max(int((z != 0).sum()), 1), round_to, layer.rank)
        comps = kept_units(z, rank)
        p = p[rows][:, comps] * z[comps]
        q = q[comps][:, cols] * scale
        if rank * (len(rows) + len(cols)) < len(rows) * len(cols):
            spec = {"kind": "low_rank", "in": len(cols), "out": len(rows), "rank": rank, "bias": bias is not None}
            tensors = {"in_proj.weight": q, "out_proj.weight": p}
            if bias is not None:
                tensors["out_proj.bias"] = bias
            return spec, {k: v.to(dtype) for k, v in tensors.items()}
        weight = p @ q
    else:
        weight = dense_weight(layer.base_layer).detach().float().cpu()[rows][:, cols] * scale
    conv = isinstance(layer.base_layer, Conv1D)
    spec = {"kind": "conv1d" if conv else "linear", "in": len(cols), "out": len(rows), "bias": bias is not None}
    tensors = {"weight": weight.t() if conv else weight}
    if bias is not None:
        tensors["bias"] = bias
    return spec, {k: v.to(dtype).contiguous() for k, v in tensors.items()}


def _relative_paths(model: PreTrainedModel):
    """Map absolute module names to plan paths (relative to the base model when inside it)."""
    prefix = next(name for name, module in model.named_modules() if module is model.base_model)

    def relative(name: str) -> str:
        return name[len(prefix) + 1 :] if prefix and name.startswith(prefix + ".") else name

    return relative


def compact(model: nn.Module) -> PreTrainedModel:
    """A plain, smaller copy of a FLOP model (``PeftModel`` or ``FlopModel``), in eval mode.

    The gated model is not modified. Its eval-mode outputs and the result's agree to float
    rounding. See the module docstring for what is removed and how the result loads.
    """
    return compact_with_plan(model)[0]


def compact_with_plan(model: nn.Module) -> tuple[PreTrainedModel, dict]:
    """``compact(model)`` and its plan (the ``flop_plan`` dict, also when the result has a stock config)."""
    flop_model = find_flop_model(model)
    task_model = flop_model.model
    if not isinstance(task_model, PreTrainedModel):
        raise TypeError(
            f"compact needs a transformers PreTrainedModel inside the FLOP model, got {type(task_model).__name__}."
        )
    round_to = flop_model.flop_config.round_to
    cuts = _structure_cuts(flop_model)
    relative = _relative_paths(task_model)
    state = task_model.state_dict()
    modules, layer_tensors = {}, {}
    for name, layer in flop_model.flop_layers().items():
        out_f, in_f = layer.out_features, layer.in_features
        cols, scale = cuts.cols.get(name, (torch.arange(in_f), torch.ones(in_f)))
        spec, tensors = _compact_layer(layer, cuts.rows(name, out_f), cols, scale, round_to)
        modules[relative(name)] = spec
        for key in [k for k in state if k.startswith(name + ".")]:
            del state[key]
        layer_tensors.update({f"{name}.{k}": v for k, v in tensors.items()})
    overrides = {}
    found = find_embedding(task_model)  # level "embedding": per-cluster factors, a tied head reuses them
    if found is not None:
        name, layer = found
        spec, tensors = compact_embedding(layer, round_to)
        head = find_tied_head(task_model)
        for prefix in (name, head):
            for key in [k for k in state if prefix and k.startswith(prefix + ".")]:
                del state[key]
        modules[relative(name)] = spec
        layer_tensors.update({f"{name}.{k}": v for k, v in tensors.items()})
        if head is not None:
            bias = task_model.get_submodule(head).bias
            modules[relative(head)] = {
                "kind": "tied_embedding_head",
                "embedding": relative(name),
                "vocab": layer.num_embeddings,
                "bias": bias is not None,
            }
            if bias is not None:
                layer_tensors[f"{head}.bias"] = bias.detach().clone()
            overrides["tie_word_embeddings"] = False  # the head module ties itself; nothing for transformers to tie
    state.update(layer_tensors)

    old_plan = getattr(task_model.config, "flop_plan", None) or {}  # compacting an already compacted model
    plan = {
        "modules": {**old_plan.get("modules", {}), **modules},
        "attributes": {**old_plan.get("attributes", {}), **{relative(k): v for k, v in cuts.attributes.items()}},
        "blocks": {**old_plan.get("blocks", {}), **{relative(k): v for k, v in cuts.blocks.items()}},
    }
    stock_class = getattr(type(task_model), "flop_stock_class", None) or type(task_model)
    config_dict = {k: v for k, v in task_model.config.to_dict().items() if k not in _NOT_ARCHITECTURE}
    config_dict.update(overrides)
    config = compacted_config_class(stock_class.config_class).from_dict({**config_dict, "flop_plan": plan})
    model_class = compacted_model_class(stock_class)
    stock_config = _stock_config(stock_class, config_dict, plan, state)
    if stock_config is not None:
        config, model_class = stock_config, stock_class
    config._attn_implementation = task_model.config._attn_implementation

    compacted = model_class(config).to(task_model.dtype)
    missing, unexpected = compacted.load_state_dict(state, strict=False)
    if missing or unexpected:  # a bug in the plan, never the user's fault: fail loudly
        raise RuntimeError(f"compaction produced mismatched weights: missing {missing}, unexpected {unexpected}")
    if getattr(task_model, "generation_config", None) is not None and compacted.can_generate():
        compacted.generation_config = copy.deepcopy(task_model.generation_config)
    return compacted.to(next(task_model.parameters()).device).eval(), plan


def _stock_config(stock_class: type, config_dict: dict, plan: dict, state: dict):
    """A stock config of ``stock_class`` that builds exactly these shapes, or ``None`` if none does."""
    if any(spec["kind"] not in ("linear", "conv1d") for spec in plan["modules"].values()):
        return None
    overrides = {}
    if plan["blocks"]:
        spec = arch_spec(stock_class.config_class.model_type)
        for key, attr in (
            ("heads", spec.heads_attr),
            ("kv_heads", spec.kv_heads_attr),
            ("intermediate", spec.intermediate_attr),
        ):
            values = {block[key] for block in plan["blocks"].values()}
            if len(values) != 1:
                return None
            if attr is not None:
                overrides[attr] = values.pop()
    try:
        config = stock_class.config_class.from_dict({**config_dict, **overrides})
        with torch.device("meta"):
            candidate = stock_class(config)
    except Exception:  # the stock code refuses these numbers (e.g. hidden size not a multiple of heads)
        return None
    shapes = {k: tuple(v.shape) for k, v in candidate.state_dict().items()}
    if shapes != {k: tuple(v.shape) for k, v in state.items()}:
        return None
    for path, attrs in plan["attributes"].items():
        module = locate(candidate, path)[1]
        if any(getattr(module, attr, None) != value for attr, value in attrs.items()):
            return None
    return config
