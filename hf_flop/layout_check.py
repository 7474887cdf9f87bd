"""Verifying a layout before any work: prune a small copy of the model by it, compact, compare the outputs.

A layout (``ArchSpec``) that hf_flop does not ship -- recognised from the model's module names, or added
to ``ARCHITECTURES`` by the user -- may name the right modules and still be wrong: a norm spans the
whole projection width, an attention module keeps a head count the spec does not rewrite, the
forward code slices a projection by config values. Each such mistake would surface as a shape error
or a silently different output of the compacted model. ``verify_layout`` finds them first, on a copy
of the model's own class with a small config (two layers, of different kinds where the model mixes
them, e.g. sliding and full attention; two KV groups of at most two query heads; a short MLP and
vocabulary; the head size and every other setting as in the model) and weights drawn at unit scale,
so that attention is far from uniform and a misplaced row shows. For each level it closes some units
(one head unit, every third FFN row; under ``uniform_shapes`` the same in every layer), checks that
this changed the output (the gates sit on the forward path), compacts, and checks that the compacted
copy runs and computes the gated copy's output (to 1e-4 relative), as the stock class when shapes
are uniform.

A weightless (``meta``) copy, as ``hf_flop.preflight`` uses, cannot verify this: it has no values to
compare, and compaction picks the kept units from the gates' values.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .architectures import ArchSpec, UnsupportedArchitectureError, find_layers, layer_layouts
from .compact import compact
from .config import FlopConfig
from .model import get_flop_model
from .recognition import RANK_FALLBACK, describe

LAYERS = ("num_hidden_layers", "n_layer", "num_layers")  # config attributes of the layer count
TOLERANCE = 1e-4  # relative to the output's scale
VOCAB, ROWS, LENGTH = 64, 16, 8  # the small copy's vocabulary and FFN width, and the test sequence's length


def _small_config_values(model: nn.Module, spec: ArchSpec) -> dict:
    """The model's config values with fewer layers, heads, FFN rows and tokens (head size unchanged)."""
    config = model.config
    values = {k: v for k, v in config.to_dict().items() if k not in ("flop_plan", "auto_map", "architectures")}
    values.pop("model_type", None)
    layers = len(find_layers(model, spec))
    small = {}
    layer_attr = next((a for a in LAYERS if values.get(a) == layers), None)
    if layer_attr and layers > 2:
        # per-layer lists (layer_types, no_rope_layers): the first layer and the first that differs from it
        per_layer = {k: v for k, v in values.items() if isinstance(v, list) and len(v) == layers}
        other = next((i for i in range(1, layers) if any(v[i] != v[0] for v in per_layer.values())), 1)
        small[layer_attr] = 2
        small |= {k: [v[0], v[other]] for k, v in per_layer.items()}
    heads = getattr(config, spec.heads_attr)
    kv = (getattr(config, spec.kv_heads_attr) if spec.kv_heads_attr else None) or heads
    head_dim = layer_layouts(model, spec)[0].head_dim
    kv_small = min(kv, 2)
    small[spec.heads_attr] = kv_small * min(heads // kv, 2)
    if spec.kv_heads_attr:
        small[spec.kv_heads_attr] = kv_small
    if getattr(config, spec.hidden_attr) == heads * head_dim:  # keep the relation, whichever way the code reads it
        small[spec.hidden_attr] = small[spec.heads_attr] * head_dim
    if spec.intermediate_attr:
        small[spec.intermediate_attr] = min(getattr(config, spec.intermediate_attr), ROWS)
    if isinstance(values.get("vocab_size"), int) and values["vocab_size"] > VOCAB:
        small["vocab_size"] = VOCAB
        for key, value in values.items():  # special tokens must stay inside the smaller vocabulary
            if key.endswith("_token_id") and value is not None:
                ids = [min(i, VOCAB - 1) for i in value] if isinstance(value, list) else min(value, VOCAB - 1)
                small[key] = ids
    return {**values, **small}


def small_copy(model: nn.Module, spec: ArchSpec) -> nn.Module:
    """A float32 copy of ``model``'s class (its stock class if compacted) with a small config, unit-scale weights."""
    stock = getattr(type(model), "flop_stock_class", None) or type(model)
    config = stock.config_class.from_dict(_small_config_values(model, spec))
    with torch.random.fork_rng(devices=[]):  # the caller's random state is not ours to move
        torch.manual_seed(0)
        small = stock(config).float()
        with torch.no_grad():
            for param in small.parameters():  # unit scale: attention far from uniform, every row visible
                if param.dim() >= 2:
                    param.normal_(0.0, param.shape[-1] ** -0.5)
                else:
                    param.add_(0.1 * torch.randn_like(param))
    return small.eval()


def _output(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    hidden = getattr(out, "hidden_states", None)
    return (hidden[-1] if hidden else out[0]).float()


def _close_some(flop_model, level: str, uniform: bool) -> None:
    """One head unit (the last) or every third FFN row in the first layer, or in every layer if ``uniform``; every
    fourth row in the others. Single units, not aligned blocks: a unit of the wrong size must cut a head apart."""
    groups = [g for g in flop_model.structure_groups if g.level == level]
    for i, group in enumerate(groups):
        first = i == 0 or uniform
        if level in ("head", "query_head"):
            units = torch.tensor([group.n_units - 1]) if first else torch.zeros(0, dtype=torch.long)
        else:
            units = torch.arange(1, group.n_units, 3 if first else 4)
        flop_model.flop_structure_gates[group.key].close(units)


def _part(spec: ArchSpec, level: str) -> str:
    if level == "head":
        return f"attention heads ({spec.q}, {spec.k}, {spec.v} -> {spec.o})"
    if level == "query_head":
        return f"query heads ({spec.q} -> {spec.o})"
    return f"MLP rows ({', '.join(spec.up)} -> {spec.down})"


def _check_level(small: nn.Module, level: str, uniform: bool, inputs: dict, dense: torch.Tensor) -> float:
    """The relative difference between the compacted and the gated small copy; raises ``ValueError`` saying why not."""
    gated = get_flop_model(copy.deepcopy(small), FlopConfig(levels=[level], uniform_shapes=uniform)).eval()
    _close_some(gated.base_model, level, uniform)
    reference = _output(gated, inputs)
    if (reference - dense).abs().max() < 1e-3:
        raise ValueError("closing units changed nothing, so these modules are not where the units' outputs go")
    try:
        compacted = compact(gated)
        out = _output(compacted, inputs)
    except Exception as err:  # the very error a user's compacted forward would meet
        raise ValueError(f"the compacted copy failed: {type(err).__name__}: {err}") from err
    gap = float((out - reference).abs().max()) / max(1.0, float(reference.abs().max()))
    if out.shape != reference.shape or gap > TOLERANCE:
        raise ValueError(f"the compacted copy computes something else (relative difference {gap:.1e})")
    stock = getattr(type(small), "flop_stock_class", None) or type(small)
    if uniform and type(compacted) is not stock:
        raise ValueError(f"no stock {stock.__name__} config describes the compacted shapes")
    return gap


def verify_layout(model: nn.Module, spec: ArchSpec, checks: set[tuple[str, bool]]) -> float:
    """Verify ``spec`` on a small copy of ``model`` for each ``(level, uniform_shapes)`` in ``checks``.

    Returns the largest relative output difference between a compacted and a gated copy; raises
    ``UnsupportedArchitectureError`` naming the part that failed, what to do instead, and the rank fallback.
    """
    model_type = model.config.model_type
    try:
        small = small_copy(model, spec)
        g = torch.Generator().manual_seed(0)
        inputs = {"input_ids": torch.randint(0, small.config.vocab_size, (1, LENGTH), generator=g)}
        dense = _output(small, inputs)
    except Exception as err:
        raise UnsupportedArchitectureError(
            f"hf_flop could not build a small copy of {type(model).__name__} to verify its layout ({describe(spec)}): "
            f"{type(err).__name__}: {err}. {RANK_FALLBACK}"
        ) from err
    gaps = [0.0]
    for level, uniform in sorted(checks):
        try:
            gaps.append(_check_level(small, level, uniform, inputs, dense))
        except Exception as err:
            others = [lvl for lvl in ("head", "row") if lvl != level]
            instead = (
                "set uniform_shapes=False (the compacted model then loads with its saved code), or "
                if uniform
                else f"prune without level {level!r} (e.g. levels={others}), or "
            )
            raise UnsupportedArchitectureError(
                f"hf_flop could not verify the {_part(spec, level)} of model_type {model_type!r}"
                f"{' with uniform_shapes=True' if uniform else ''} on a small copy: {err}. To prune this model, "
                f"{instead}describe its layout with an ArchSpec in hf_flop.ARCHITECTURES. {RANK_FALLBACK}"
            ) from err
    return max(gaps)
