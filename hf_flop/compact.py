"""Compaction: a gated FLOP model -> a plain, smaller transformers model with the same eval outputs.

Every gated module is cut to what its gates keep, with the eval-mask values folded in:

* head / row (``hf_flop.groups``): a closed head group (a KV group under GQA) loses its Q/K/V
  output rows and the output projection's input columns (and its features of a norm over the whole
  projection, ``hf_flop.projection_norms``), a closed FFN neuron its up/gate rows and the down
  projection's column; the gate value is folded into the kept columns. These cuts reach each linear
  as a ``Cut``;
* each gated module then compacts itself (its ``compact`` verb): rank (``hf_flop.rank``), block
  (``hf_flop.blocks``), embedding (``hf_flop.embedding``), or the plain cut linear.

A transformer layer whose heads (or rows) are all closed keeps one unit whose folded gate is 0: the
layer then adds exactly nothing, as in the gated model, and the stock attention code still has a
head to run. The parameter count of the result's gated modules is
``sparsity_report(model).deterministic_kept_params`` (both follow ``hf_flop.counting``).

The result is an instance of ``FlopX`` (``hf_flop.modeling``), a subclass of the model's own class
``X`` whose config carries the per-layer shapes (``flop_plan``); when every shape is one a stock
config of ``X`` describes (no low-rank layer, uniform head counts and FFN widths), it is a plain
``X`` with that stock config, which needs no custom code to load. Under
``FlopConfig(uniform_shapes=True)`` it always is (``hf_flop.uniform``): eval masks that keep different
counts per layer are refused, with the call that fixes them.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn
from transformers import PreTrainedModel

from .architectures import arch_spec
from .depth import check_foldable
from .depth_compact import remove_depth
from .experts_injection import uneven_experts
from .fsdp import check_weights_whole
from .gated import Cut
from .groups import StructureCuts
from .hidden_cuts import stream_cuts
from .linear import dense_weight, set_dense_weight
from .lookup import find_flop_model
from .modeling import compacted_config_class, compacted_model_class, locate, read_attribute
from .projection_norms import cut_projection_norms
from .uniform import uneven_levels

# config entries that describe a saved file, not the architecture
_NOT_ARCHITECTURE = ("model_type", "auto_map", "architectures", "transformers_version", "flop_plan")


def plan_layers(plan: dict) -> dict[str, dict[str, int]]:
    """The per-transformer-layer summary of a plan; older models call it ``"blocks"``."""
    return plan.get("layers", plan.get("blocks", {}))


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
    check_weights_whole(model, "compact")
    task_model = flop_model.model
    if not isinstance(task_model, PreTrainedModel):
        raise TypeError(
            f"compact needs a transformers PreTrainedModel inside the FLOP model, got {type(task_model).__name__}."
        )
    round_to = flop_model.flop_config.round_to
    _check_uniform_masks(flop_model, round_to)
    check_foldable(flop_model)  # depth-gate values strictly between 0 and 1 compact to nothing exact
    cuts = _structure_cuts(flop_model)
    relative = _relative_paths(task_model)
    names = {module: name for name, module in task_model.named_modules()}
    state = task_model.state_dict()
    stream = stream_cuts(flop_model)  # level "hidden": the residual channels
    modules, layer_tensors, overrides, attributes = {}, {}, {}, {}
    for name, layer in flop_model.gated_layers().items():
        out_f, in_f = layer.shape
        cols, scale = cuts.columns(name, in_f)
        cut = Cut(cuts.rows(name, out_f), cols, scale, round_to, path_of=lambda module: relative(names[module]))
        cut = stream.narrow_cut(name, cut) if stream else cut
        compacted = layer.compact(cut)
        compacted = stream.fold_rows(name, compacted) if stream else compacted
        if compacted.spec is not None:  # None: a gated module that rebuilds none of its own (the channel gate)
            modules[relative(name)] = compacted.spec
        for key in [k for k in state if k.startswith(name + ".")]:
            del state[key]
        layer_tensors.update({f"{name}.{k}": v for k, v in compacted.tensors.items()})
        overrides.update(compacted.config)
        modules.update(compacted.modules)  # what it changes outside itself (a MoE layer's router)
        layer_tensors.update(compacted.state)
        attributes.update(compacted.attributes)
    state.update(layer_tensors)
    if stream:
        stream.cut_stream(state)
    modules.update(cut_projection_norms(cuts.norms, state, relative))

    old_plan = getattr(task_model.config, "flop_plan", None) or {}  # compacting an already compacted model
    plan = {
        "modules": {**old_plan.get("modules", {}), **modules},
        "attributes": {
            **old_plan.get("attributes", {}),
            **{relative(k): v for k, v in cuts.attributes.items()},
            **attributes,
        },
        "layers": {**plan_layers(old_plan), **{relative(k): v for k, v in cuts.layers.items()}},
    }
    config_dict = _architecture_config(task_model, overrides)
    remove_depth(flop_model, state, plan, config_dict, relative)  # level "layer": fewer layers, renumbered
    return build_compacted(task_model, flop_model.flop_config.uniform_shapes, plan, config_dict, state), plan


def _architecture_config(task_model: PreTrainedModel, overrides: dict) -> dict:
    """``task_model``'s config entries that describe the architecture, with ``overrides`` applied."""
    config_dict = {k: v for k, v in task_model.config.to_dict().items() if k not in _NOT_ARCHITECTURE}
    config_dict.update(overrides)
    return config_dict


def build_compacted(
    task_model: PreTrainedModel,
    uniform_shapes: bool,
    plan: dict,
    overrides: dict,
    state: dict,
    *,
    on_meta: bool = False,
) -> PreTrainedModel:
    """The compacted model of ``task_model`` with ``plan`` holding ``state`` (the cut tensors): a stock class
    when a stock config describes the shapes, else the ``FlopX`` class with the plan in its config.

    ``on_meta`` builds it on the meta device, from meta tensors of the right shapes in ``state``: the config
    and shapes without the weights (``hf_flop.streaming`` writes those itself).
    """
    stock_class = getattr(type(task_model), "flop_stock_class", None) or type(task_model)
    config_dict = _architecture_config(task_model, overrides)
    config = compacted_config_class(stock_class.config_class).from_dict({**config_dict, "flop_plan": plan})
    model_class = compacted_model_class(stock_class)
    stock_config = _stock_config(stock_class, config_dict, plan, state)
    if stock_config is not None:
        config, model_class = stock_config, stock_class
    elif uniform_shapes:  # the injection checks make this unreachable: a bug
        raise RuntimeError("uniform_shapes=True, yet no stock config describes these shapes; please report this.")
    config._attn_implementation = task_model.config._attn_implementation
    config._experts_implementation = getattr(task_model.config, "_experts_implementation", None)  # MoE models

    # built in the model's dtype as from_pretrained builds it (not cast afterwards), so buffers that
    # transformers keeps in float32, such as the rotary frequencies, stay float32 in a bf16 model
    with torch.device("meta") if on_meta else contextlib.nullcontext(), _default_dtype(task_model.dtype):
        compacted = model_class(config)
    missing, unexpected = compacted.load_state_dict(state, strict=False)
    if missing or unexpected:  # a bug in the plan, never the user's fault: fail loudly
        raise RuntimeError(f"compaction produced mismatched weights: missing {missing}, unexpected {unexpected}")
    if getattr(task_model, "generation_config", None) is not None and compacted.can_generate():
        compacted.generation_config = copy.deepcopy(task_model.generation_config)
    return compacted.to(next(task_model.parameters()).device).eval()


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """torch's default floating dtype set to ``dtype`` for the block (restored after)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _structure_cuts(flop_model) -> StructureCuts:
    return StructureCuts(
        flop_model.structure_groups, flop_model.flop_structure_gates, flop_model.model, flop_model.flop_config.round_to
    )


def kept_slices(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per gated module (named as in the task model): ``(rows, cols, scale)`` as ``compact`` cuts it.

    ``rows``/``cols`` index the output/input features of the ``(out, in)`` weight that the head/row
    gates keep; ``scale`` is the eval-mask value folded into each kept column (0 for the closed
    units kept only as padding: ``round_to``, or one unit of an all-closed layer).
    """
    flop_model = find_flop_model(model)
    cuts = _structure_cuts(flop_model)
    slices = {}
    for name, layer in flop_model.gated_layers().items():
        out_f, in_f = layer.shape
        slices[name] = (cuts.rows(name, out_f), *cuts.columns(name, in_f))
    return slices


@torch.no_grad()
def write_back(model: nn.Module, compacted: PreTrainedModel) -> None:
    """Write the weights of ``compacted`` (``compact(model)``, trained since) into the gated ``model``.

    The inverse of compaction's slicing, for levels ``head`` and ``row`` only (every gated module a
    plain cut linear) with eval masks of exactly 0 or 1: each cut linear's kept rows and columns and
    its bias take the compacted values; its pruned rows and columns, which the eval masks hide, are
    set to 0, so the gated model is a function of ``compacted`` and its masks alone (a run resumed
    from a compacted checkpoint ends with the same gated model). Every other parameter (embeddings,
    norms, the task head) is copied one to one, a norm over a whole projection
    (``ArchSpec.projection_norms``) into its kept heads' features. Afterwards ``compact(model)`` holds
    exactly the weights of ``compacted``.
    """
    flop_model = find_flop_model(model)
    slices, layers = kept_slices(model), flop_model.gated_layers()
    for name, (rows, cols, scale) in slices.items():
        layer, target = layers[name], compacted.get_submodule(name)
        if layer.gates() or not hasattr(layer, "base_layer"):
            raise ValueError(
                f"write_back handles head/row-cut linears only; {name} is a {type(layer).__name__} with gates of "
                f"its own ({', '.join(layer.gates()) or 'an embedding'}), which compacts to another module type."
            )
        if not bool(((scale == 0) | (scale == 1)).all()):
            raise ValueError(
                f"{name}: eval-mask values other than 0 and 1 are folded into the compacted weights; write_back "
                "needs fixed masks (set_mask, fix_masks_at_target or prune_oneshot)."
            )
        base = layer.base_layer
        weight = torch.zeros_like(dense_weight(base))
        weight[rows.to(weight.device)[:, None], cols.to(weight.device)] = dense_weight(target).to(weight)
        set_dense_weight(base, weight)
        if base.bias is not None:
            bias = torch.zeros_like(base.bias)
            bias[rows.to(bias.device)] = target.bias.to(bias)
            base.bias.copy_(bias)
    counterparts = gated_counterparts(model, compacted)
    norms = _structure_cuts(flop_model).norms  # norms over a projection: their kept features
    for name, param in compacted.named_parameters():
        module = name.rsplit(".", 1)[0]
        if module in norms:
            counterparts[name][norms[module].to(param.device)] = param.to(counterparts[name])
        elif module not in slices:
            counterparts[name].copy_(param)


def gated_counterparts(model: nn.Module, compacted: PreTrainedModel) -> dict[str, nn.Parameter]:
    """For each parameter of ``compacted`` (``compact(model)``), the parameter of the gated ``model`` it
    was cut or copied from: ``<linear>.base_layer.weight`` / ``.bias`` for a cut linear, the parameter
    of the same name for every other (wider for a norm over a projection, cut with the heads) (levels
    ``head`` and ``row``; other levels compact to other module types and are refused)."""
    flop_model = find_flop_model(model)
    gated = flop_model.gated_layers()
    cut = {*gated, *_structure_cuts(flop_model).norms}  # modules whose shapes differ (norms: cut with heads)
    params = dict(flop_model.model.named_parameters())
    found = {}
    for name, param in compacted.named_parameters():
        module, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        source = f"{module}.base_layer.{leaf}" if module in gated else name
        if source not in params or (module not in cut and params[source].shape != param.shape):
            raise ValueError(
                f"{name} of the compacted model has no counterpart in the gated model (looked for {source}); "
                "only levels head and row compact to the same module types."
            )
        found[name] = params[source]
    return found


def _check_uniform_masks(flop_model, round_to: int) -> None:
    """Under ``FlopConfig(uniform_shapes=True)``, refuse eval masks that keep different counts per layer."""
    if not flop_model.flop_config.uniform_shapes:
        return
    uneven = uneven_levels(flop_model.structure_groups, flop_model.flop_structure_gates, round_to)
    uneven.update(uneven_experts(flop_model, round_to))
    if uneven:
        found = "; ".join(f"{level} kept per layer: {counts}" for level, counts in uneven.items())
        raise ValueError(
            f"FlopConfig(uniform_shapes=True), but the eval masks keep different counts per layer ({found}), "
            "which no stock config describes. Call hf_flop.oneshot.fix_masks_at_target(model) to make them "
            "uniform at the target (prune_oneshot and PruningTrainer.train() do this themselves), then compact."
        )


def _stock_config(stock_class: type, config_dict: dict, plan: dict, state: dict):
    """A stock config of ``stock_class`` that builds exactly these shapes, or ``None`` if none does."""
    if any(spec["kind"] not in ("linear", "conv1d", "norm", "parameters") for spec in plan["modules"].values()):
        return None
    overrides = {}
    if plan["layers"]:
        spec = arch_spec(stock_class.config_class.model_type)
        if spec.head_dim_attr is not None:  # stated, since fewer heads must not change it (Qwen2 derives it)
            derived = config_dict[spec.hidden_attr] // config_dict[spec.heads_attr]
            overrides[spec.head_dim_attr] = config_dict.get(spec.head_dim_attr) or derived
        for key, attr in (
            ("heads", spec.heads_attr),
            ("kv_heads", spec.kv_heads_attr),
            ("intermediate", spec.intermediate_attr),
        ):
            values = {layer[key] for layer in plan["layers"].values() if layer.get(key)}  # 0: no dense FFN (MoE)
            if not values:
                continue
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
        if any(read_attribute(module, attr) != value for attr, value in attrs.items()):
            return None
    return config
