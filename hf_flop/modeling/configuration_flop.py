"""Configuration of a model compacted by hf_flop: the base architecture's config plus a ``flop_plan``.

This file is copied next to the weights as remote code, so it imports only ``transformers``.

``flop_plan`` (a JSON-able dict) says what differs from the base architecture:

* ``"modules"``: module path -> ``{"kind": "linear" | "conv1d" | "low_rank" | "block_sparse", "in": int,
  "out": int, "rank": int (low_rank), "block_size", "blocks": int (block_sparse), "bias": bool}``; the
  model rebuilds these modules with these shapes (``{"kind": "norm", "width": int}``: the stock norm
  module, its parameters ``width`` wide; ``{"kind": "skipped_attention", "layer_idx": int}`` /
  ``{"kind": "skipped_ffn"}``: a removed sublayer, a module that adds nothing);
* ``"attributes"``: module path -> ``{attribute: value}`` rewritten after the rebuild (per-layer
  head counts of attention modules; ``"config.x"``: ``x`` in that module's own view of the config);
* ``"layers"``: transformer layer path -> ``{"heads", "kv_heads", "intermediate"}`` kept (and their
  ``*_before`` values), informative only (models compacted by older versions call it ``"blocks"``);
* ``"removed_layers"``: the original paths of the transformer layers level ``"layer"`` removed
  (informative; the config's layer count and per-layer lists already describe the kept ones).

Paths are relative to the base model (``model.base_model``), or to the whole model for modules
outside it (task heads), so one checkpoint loads into every head class of the architecture.

The compacted config class of base ``XConfig`` is ``FlopXConfig`` with ``model_type`` ``"flop_" +
XConfig.model_type``; the classes are made on first use, by name (see ``__getattr__``).
"""

from __future__ import annotations

import transformers

CLASS_PREFIX = "Flop"
TYPE_PREFIX = "flop_"


def derive(stock: type, bases: tuple[type, ...], namespace: dict, registry: dict) -> type:
    """The class ``Flop<stock name>``, made once from ``bases`` and ``namespace`` and kept in ``registry``.

    ``registry`` is the defining module's ``globals()``, so the class is also a module attribute.
    """
    name = CLASS_PREFIX + stock.__name__
    if name not in registry:
        registry[name] = type(name, bases, {"__module__": registry["__name__"], **namespace})
    return registry[name]


def stock_class_named(name: str, kind: type) -> type:
    """``transformers.X`` for ``name == "FlopX"`` if it subclasses ``kind``; else ``AttributeError``.

    Remote code is looked up by class name (``auto_map`` holds "configuration_flop.FlopBertConfig"),
    so the modules answer such names on demand through module-level ``__getattr__``.
    """
    stock = getattr(transformers, name[len(CLASS_PREFIX) :], None) if name.startswith(CLASS_PREFIX) else None
    if isinstance(stock, type) and issubclass(stock, kind):
        return stock
    raise AttributeError(f"no attribute {name!r}: not 'Flop' + a transformers {kind.__name__} class")


def compacted_config_class(base: type) -> type:
    """The compacted config class of the stock config class ``base``."""
    if getattr(base, "model_type", "").startswith(TYPE_PREFIX):
        return base  # already a compacted config
    namespace = {
        "__doc__": f"{base.__name__} of a model compacted by hf_flop; ``flop_plan`` holds the per-layer shapes.",
        "model_type": TYPE_PREFIX + base.model_type,
        "__annotations__": {"flop_plan": "dict | None"},
        "flop_plan": None,
    }
    return derive(base, (base,), namespace, globals())


def __getattr__(name: str) -> type:
    return compacted_config_class(stock_class_named(name, transformers.PreTrainedConfig))
