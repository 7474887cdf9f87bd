"""Compaction of level ``"layer"``: removed transformer layers leave the model, removed sublayers become no-ops.

``remove_depth`` edits what ``hf_flop.compact`` assembled (the full-size state dict, the plan and the
config entries) before the compacted model is built:

* a removed layer's tensors are dropped and the layers after it renumbered (``layers.3`` becomes
  ``layers.2``): state-dict keys and plan paths alike. The config states the new layer count and
  every per-layer list (``ArchSpec.layer_lists``: Gemma's sliding and full ``layer_types``, SmolLM3's
  ``no_rope_layers``) keeps the entries of the kept layers. The compacted model is built
  fresh from that config, so every attention module gets its new ``layer_idx`` (the KV cache's index)
  from the stock code itself; with no other change the result is the stock class with a stock config;
* a removed sublayer (``layer_granularity="sublayer"``) is replaced by a module that returns zeros
  (``hf_flop.modeling.modeling_flop.SkippedAttention`` / ``SkippedFFN``, plan kinds
  ``"skipped_attention"`` / ``"skipped_ffn"``), so the layer adds nothing for it; no stock config
  describes that, so the model loads with its saved remote code. A layer that loses both sublayers is
  removed whole.
"""

from __future__ import annotations

from collections.abc import Callable

from .architectures import arch_spec, find_layers
from .depth import check_foldable, removed_units, units_of


def _rename(path: str, renames: dict[str, str | None]) -> str | None:
    """``path`` with its layer prefix renamed (``None``: it lies in a removed layer; unchanged: outside)."""
    for old, new in renames.items():
        if path == old or path.startswith(old + "."):
            return None if new is None else new + path[len(old) :]
    return path


def _renamed(mapping: dict, renames: dict[str, str | None]) -> dict:
    found = {}
    for key, value in mapping.items():
        new = _rename(key, renames)
        if new is not None:
            found[new] = value
    return found


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def layers_attribute(config) -> str:
    """The config entry holding the layer count (``num_hidden_layers``, or what the config maps it to: ``n_layer``)."""
    return getattr(config, "attribute_map", {}).get("num_hidden_layers", "num_hidden_layers")


def remove_depth(flop_model, state: dict, plan: dict, config_dict: dict, relative: Callable[[str], str]) -> None:
    """Remove what the depth gate closed from ``state`` (absolute keys), ``plan`` (relative paths) and
    ``config_dict``, in place (see the module docstring). Nothing without level ``"layer"``."""
    if not units_of(flop_model):
        return
    check_foldable(flop_model)
    task_model = flop_model.model
    spec = arch_spec(task_model.config.model_type)
    names = find_layers(task_model, spec)
    removed = removed_units(flop_model)
    parts: dict[int, set[str]] = {}
    for u in removed:
        parts.setdefault(u.position, set()).add(u.part)
    gone = {p for p, found in parts.items() if "layer" in found or found >= {"attention", "ffn"}}
    kept = [p for p in range(len(names)) if p not in gone]
    new_index = {p: i for i, p in enumerate(kept)}
    renames = {names[p]: (names[new_index[p]] if p in new_index else None) for p in range(len(names))}

    skipped = {}  # sublayers left as no-ops: relative path of the replaced module -> its plan entry
    for u in removed:
        if u.position in gone:
            continue
        for key in [k for k in state if _under(k, u.replaced)]:
            del state[key]
        path = relative(u.replaced)
        for section in ("modules", "attributes"):
            plan[section] = {k: v for k, v in plan[section].items() if not _under(k, path)}
        entry = (
            {"kind": "skipped_attention", "layer_idx": new_index[u.position]}
            if u.part == "attention"
            else {"kind": "skipped_ffn"}
        )
        skipped[path] = entry
    plan["modules"].update(skipped)

    relative_renames = {relative(old): (relative(new) if new else None) for old, new in renames.items()}
    for key in list(state):
        new = _rename(key, renames)
        value = state.pop(key)
        if new is not None:
            state[new] = value
    for section in ("modules", "attributes", "layers"):
        plan[section] = _renamed(plan[section], relative_renames)
    if gone:
        plan["removed_layers"] = sorted({*plan.get("removed_layers", []), *(relative(names[p]) for p in gone)})

    count = len(names)
    for key in spec.layer_lists:
        value = config_dict.get(key)
        if isinstance(value, list) and len(value) == count:
            config_dict[key] = [value[p] for p in kept]
    config_dict[layers_attribute(task_model.config)] = len(kept)
