"""Layouts recognised from the model: the ``ArchSpec`` of a model_type the table lacks, verified before use.

Most decoders written since Llama name their parts alike: a ``ModuleList`` of transformer layers, each
with an attention module holding ``q_proj``/``k_proj``/``v_proj`` and an output projection, an MLP
holding ``gate_proj`` and ``up_proj`` (or ``up_proj`` alone) and ``down_proj``, and a config stating
the head counts and widths. ``recognise`` reads those names and attributes into an ``ArchSpec``, so
such a model prunes by heads and rows without a table entry.

Names can mislead (a norm over the whole projection width, a head count kept on a module, a
projection a spec does not cut), so ``spec_for`` verifies every layout hf_flop does not ship (one
recognised here, or one a user added to ``ARCHITECTURES``) before any work: the installed verifier
(``hf_flop.layout_check.verify_layout``, which injects and compacts, so it sits above the modules that
read the layout) prunes a small copy of the model, compacts it and compares the outputs. A layout
that fails is refused, naming the part and the rank fallback; one that passes is used with a note on
the ``hf_flop`` logger.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable

from torch import nn

from .architectures import (
    ARCHITECTURES,
    BUILT_IN,
    RECOGNISED,
    ArchSpec,
    UnsupportedArchitectureError,
    base_model_type,
    layer_layouts,
)
from .linear import is_linear, linear_shape

logger = logging.getLogger(__name__)

GROUP_LEVELS = ("head", "row")  # the levels whose gates the layout places (hf_flop.groups)

# the standard names: projections (children of the attention module / the MLP), config attributes
QUERY, KEY, VALUE = "q_proj", "k_proj", "v_proj"
# Llama's names only: OPT's (out_proj, fc1/fc2), Phi's (dense) or Starcoder2's (c_fc/c_proj) would verify too, but
# a family named otherwise gets a table entry, which says what it is rather than what it resembles
OUTPUT_NAMES = ("o_proj",)
GATE = "gate_proj"
UP_NAMES = ("up_proj",)
DOWN_NAMES = ("down_proj",)
CONFIG_NAMES = {
    "heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "kv_heads": ("num_key_value_heads", "num_kv_heads", "n_kv_heads"),
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "intermediate": ("intermediate_size", "ffn_dim", "n_inner"),
}
# attention-module attributes that count heads (rewritten at compaction), and what they count
ATTENTION_COUNTS = {
    "num_heads": "heads",
    "num_attention_heads": "heads",
    "num_key_value_heads": "kv_heads",
    "num_kv_heads": "kv_heads",
    "num_key_value_groups": "group_size",  # repeat_kv's factor, for level query_head
}

# norms on the residual branches themselves (Gemma 2/3, OLMo-2: h + norm(attention(...))), by their standard names;
# a layer with both gates its sublayers after them (ArchSpec.branch_outputs). Llama's post_attention_layernorm
# alone is the FFN's input norm, not a branch norm
BRANCH_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")

RANK_FALLBACK = (
    "Rank pruning needs no layout: FlopConfig(levels=['rank'], target_modules=[...]) with the linear layers' names."
)

# (model, spec, checks) -> largest output difference; raises UnsupportedArchitectureError. Installed at import.
Verifier = Callable[[nn.Module, ArchSpec, set[tuple[str, bool]]], float]
_verifier: Verifier | None = None
_verified: dict[str, tuple[ArchSpec, frozenset[tuple[str, bool]]]] = {}  # model_type -> (spec, checks passed)


def set_verifier(verifier: Verifier) -> None:
    """Install the check ``spec_for`` runs on a layout it did not ship (``hf_flop.registration`` does, at import)."""
    global _verifier
    _verifier = verifier


def _is_linear(module: nn.Module) -> bool:  # a linear, or a gated layer around one (a model FLOP is injected in)
    return is_linear(module) or is_linear(getattr(module, "base_layer", None))


def _linears(module: nn.Module) -> dict[str, nn.Module]:
    return {name: child for name, child in module.named_children() if _is_linear(child)}


def _linear_names(layer: nn.Module) -> str:
    return ", ".join(name for name, m in layer.named_modules() if is_linear(m)) or "none"


def _attention(layer: nn.Module) -> tuple[str, str] | None:
    """``(attention child, output projection)`` of a transformer layer, by the standard names."""
    for name, child in layer.named_children():
        found = _linears(child)
        output = next((o for o in OUTPUT_NAMES if o in found), None)
        if {QUERY, KEY, VALUE} <= set(found) and output:
            return name, output
    return None


def _mlp(layer: nn.Module, attention: str) -> tuple[tuple[str, ...], str] | None:
    """``(producers, consumer)`` of the FFN: in the layer itself or one child of it (never deeper: an expert)."""
    containers = [("", layer), *((n, c) for n, c in layer.named_children() if n != attention)]
    for prefix, container in containers:
        found = _linears(container)
        up = next((u for u in UP_NAMES if u in found), None)
        down = next((d for d in DOWN_NAMES if d in found), None)
        if up and down:
            names = ((GATE,) if GATE in found else ()) + (up,)
            return tuple(f"{prefix}.{n}" if prefix else n for n in names), f"{prefix}.{down}" if prefix else down
    return None


def _layer_list(base: nn.Module) -> tuple[str, nn.Module] | None:
    """The first ModuleList (name relative to the base model) whose first layer has a recognisable attention."""
    for name, module in base.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and _attention(module[0]) is not None:
            return name, module[0]
    return None


def _config_attr(config, kind: str) -> str | None:
    return next((n for n in CONFIG_NAMES[kind] if isinstance(getattr(config, n, None), int)), None)


def _no_layers(base: nn.Module) -> str:
    lists = [(n, m) for n, m in base.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        return f"the transformer layers: {type(base).__name__} has no ModuleList of layers"
    name, layers = lists[0]
    return (
        f"the attention projections: no child of {name}.0 holds linears named {QUERY}, {KEY}, {VALUE} and "
        f"{'/'.join(OUTPUT_NAMES)} (its linears: {_linear_names(layers[0])})"
    )


def recognise(model: nn.Module) -> ArchSpec:
    """The layout of a Llama-shaped ``model``, read from its module names and config; not verified yet.

    Raises ``UnsupportedArchitectureError`` naming the part it could not find.
    """
    config = getattr(model, "config", None)
    base = getattr(model, "base_model", model)
    found = _layer_list(base)
    if found is None:
        raise UnsupportedArchitectureError(f"hf_flop could not recognise {_no_layers(base)}.")
    layers, layer = found
    attention, output = _attention(layer)
    mlp = _mlp(layer, attention)
    if mlp is None:
        raise UnsupportedArchitectureError(
            f"hf_flop could not recognise the MLP: neither {layers}.0 nor one of its children holds an up projection "
            f"({'/'.join(UP_NAMES)}, with or without {GATE}) and a down projection ({'/'.join(DOWN_NAMES)}) as "
            f"linears (its linears: {_linear_names(layer)})."
        )
    names = {kind: _config_attr(config, kind) for kind in CONFIG_NAMES}
    for kind in ("heads", "hidden"):
        if names[kind] is None:
            raise UnsupportedArchitectureError(
                f"hf_flop could not recognise the {kind} count: {type(config).__name__} has none of the integer "
                f"attributes {', '.join(CONFIG_NAMES[kind])}."
            )
    up, down = mlp
    width = linear_shape(layer.get_submodule(down))[1]
    intermediate = names["intermediate"] if getattr(config, names["intermediate"] or "", None) == width else None
    counts = {
        a: what
        for a, what in ATTENTION_COUNTS.items()
        if isinstance(getattr(layer.get_submodule(attention), a, None), int)
    }
    spec = ArchSpec(
        layers=re.escape(layers),
        attention=attention,
        q=f"{attention}.{QUERY}",
        k=f"{attention}.{KEY}",
        v=f"{attention}.{VALUE}",
        o=f"{attention}.{output}",
        up=up,
        down=down,
        heads_attr=names["heads"],
        kv_heads_attr=names["kv_heads"],
        hidden_attr=names["hidden"],
        head_dim_attr="head_dim",  # read when the config states it; stated in stock configs of fewer heads
        attention_head_attrs=counts,
        intermediate_attr=intermediate,
        pre_norm_residual=True,  # the Llama shape: h + attention(norm(h)), then h + mlp(norm(h))
        branch_outputs=BRANCH_NORMS if all(hasattr(layer, n) for n in BRANCH_NORMS) else None,
    )
    _check_shapes(model, spec)
    return spec


def _check_shapes(model: nn.Module, spec: ArchSpec) -> None:
    """The projections split into the config's heads and the MLP's producers into its width, in every layer."""
    modules = dict(model.named_modules())
    for layout in layer_layouts(model, spec):
        width = {name: linear_shape(modules[f"{layout.prefix}.{name}"])[0] for name in (spec.q, spec.k, spec.v)}
        heads = (layout.heads * layout.head_dim, layout.kv_heads * layout.head_dim, layout.kv_heads * layout.head_dim)
        if tuple(width.values()) != heads or layout.heads % layout.kv_heads:
            raise UnsupportedArchitectureError(
                f"hf_flop could not recognise the attention heads of {layout.prefix}: {spec.q}/{spec.k}/{spec.v} give "
                f"{'/'.join(map(str, width.values()))} features, while {layout.heads} heads and {layout.kv_heads} KV "
                f"heads of {layout.head_dim} (config {spec.heads_attr}, {spec.kv_heads_attr}, head_dim) make "
                f"{'/'.join(map(str, heads))}."
            )
        for name in spec.up:
            if linear_shape(modules[f"{layout.prefix}.{name}"])[0] != layout.intermediate:
                raise UnsupportedArchitectureError(
                    f"hf_flop could not recognise the MLP of {layout.prefix}: {name} does not give the "
                    f"{layout.intermediate} features {spec.down} takes."
                )


def describe(spec: ArchSpec) -> str:
    """One line naming the parts of a layout."""
    heads = spec.heads_attr + (f", {spec.kv_heads_attr}" if spec.kv_heads_attr else "")
    return (
        f"layers {spec.layers.replace(chr(92), '')}; attention {spec.q}, {spec.k}, {spec.v} -> {spec.o}; "
        f"MLP {', '.join(spec.up)} -> {spec.down}; heads from config {heads}"
    )


def spec_for(model: nn.Module, levels: Iterable[str] | None = (), *, uniform_shapes: bool = False) -> ArchSpec:
    """The layout of ``model``, checked for the head/row ``levels`` asked for; ``UnsupportedArchitectureError`` if none.

    A table entry hf_flop ships is returned as is (its test suite checks it). Otherwise the spec -- the
    user's ``ARCHITECTURES`` entry, or the layout recognised from the model (``recognise``) -- is verified
    for each level in ``levels`` (and ``uniform_shapes``: compaction to the stock class) on a small copy
    before it is returned, once per model_type and check in a process, with a one-line note on the
    ``hf_flop`` logger; the error names the part that failed. ``levels=None`` only looks the layout up
    (no verification, no note: a later call verifies). A recognised layout is kept in
    ``architectures.RECOGNISED`` for lookups by model_type.
    """
    model_type = base_model_type(getattr(getattr(model, "config", None), "model_type", None))
    table = ARCHITECTURES.get(model_type)
    if table is not None and table is BUILT_IN.get(model_type):
        return table
    spec = table or RECOGNISED.get(model_type) or recognise(model)
    if table is None:
        RECOGNISED[model_type] = spec  # injection and compaction look layouts up by model_type
    if levels is None:
        return spec
    checks = frozenset((level, bool(uniform_shapes)) for level in levels if level in GROUP_LEVELS)
    known, done = _verified.get(model_type, (None, frozenset()))
    done = done if known is spec else frozenset()
    todo = checks - done
    if not todo:
        if known is not spec:  # the first use, by levels that need no verification (rank with default targets)
            _verified[model_type] = (spec, done)
            logger.info("hf_flop: model_type %r: using %s (%s).", model_type, _source(table), describe(spec))
        return spec
    if _verifier is None:
        raise RuntimeError("no layout verifier is installed; import hf_flop (hf_flop.registration installs it).")
    _verified[model_type] = (spec, done | todo)  # first: the small copy's own injection looks this up
    try:
        gap = _verifier(model, spec, set(todo))
    except BaseException:
        _verified[model_type] = (spec, done)
        if table is None and not done:  # nothing of it verified: lookups by model_type must not find it
            RECOGNISED.pop(model_type, None)
        raise
    what = ", ".join(f"{level}{' (uniform shapes)' if uniform else ''}" for level, uniform in sorted(todo))
    logger.info(
        "hf_flop: model_type %r: using %s (%s), verified for %s on a small copy (compacted output within %.1e "
        "of the gated one).",
        model_type,
        _source(table),
        describe(spec),
        what,
        gap,
    )
    return spec


def _source(table: ArchSpec | None) -> str:
    return "the layout recognised from its modules" if table is None else "the ARCHITECTURES entry added for it"
