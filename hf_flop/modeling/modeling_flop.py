"""Model classes of models compacted by hf_flop: the base architecture's classes, with planned shapes.

This file is copied next to the weights as remote code, so it imports only ``torch`` and
``transformers`` (and its siblings ``configuration_flop``, ``block_sparse`` and
``factorized_embedding``; ``CODE_FILES`` lists the four files saved with every compacted model).

``FlopX`` subclasses the stock class ``X`` (``BertForSequenceClassification``, ``LlamaForCausalLM``,
...). Its ``__init__`` runs the stock ``__init__`` and then rebuilds the modules listed in
``config.flop_plan`` with their compacted shapes: a smaller ``Linear`` (or GPT-2 ``Conv1D``), or a
``LowRankLinear`` (two Linear layers, in -> rank -> out) for a factorized layer, a
``BlockSparseLinear`` (``block_sparse.py``) for a block-pruned one, or a ``FactorizedEmbedding``
and its ``TiedFactorizedHead`` (``factorized_embedding.py``) for a pruned embedding. Attention modules
get their per-layer head counts rewritten from the plan (a dotted attribute such as
``config.num_attention_heads`` through a per-module ``ConfigView``), and a norm over a projection
cut with its heads (kind ``"norm"``) gets parameters of its kept width, and a mixture-of-experts layer's
experts and router (kind ``"parameters"``) get parameters of their planned shapes (fewer, narrower experts). Everything else -- forward, caching,
``generate()``, attention masks -- is the stock code, so the model behaves as the stock one does.
"""

from __future__ import annotations

import os
import shutil

import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

from .block_sparse import BlockSparseLinear
from .configuration_flop import CLASS_PREFIX, compacted_config_class, derive, stock_class_named
from .factorized_embedding import FactorizedEmbedding, TiedFactorizedHead

CODE_FILES = ("configuration_flop.py", "modeling_flop.py", "block_sparse.py", "factorized_embedding.py")


class LowRankLinear(nn.Module):
    """``x -> out_proj(in_proj(x))``: a rank-``rank`` linear map stored as two thin matrices."""

    def __init__(self, in_features: int, rank: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.rank, self.out_features = in_features, rank, out_features
        self.in_proj = nn.Linear(in_features, rank, bias=False)
        self.out_proj = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.in_proj(x))


# spelled torch.nn.Module: transformers reads this file for "class *Attention*(nn.Module):" to decide whether the
# model can switch attention implementations, and this module computes no attention at all
class SkippedAttention(torch.nn.Module):
    """A removed attention sublayer: adds nothing to the residual stream (returns zeros and no weights).

    The KV cache still gets this layer's entry, with no heads, so the cache's length (read at layer 0
    by ``generate()``) keeps counting the tokens seen.
    """

    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor | None = None, *args, **kwargs):
        cache = next((kwargs[k] for k in ("cache", "past_key_values", "layer_past") if kwargs.get(k) is not None), None)
        if cache is not None and hasattr(cache, "update"):
            empty = hidden_states.new_zeros(hidden_states.shape[0], 0, hidden_states.shape[1], 1)
            cache.update(empty, empty, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class SkippedFFN(nn.Module):
    """A removed FFN sublayer: adds nothing to the residual stream."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def build_module(spec: dict) -> nn.Module:
    """A fresh module with the shapes of one ``flop_plan["modules"]`` entry."""
    kind = spec["kind"]
    if kind == "low_rank":
        return LowRankLinear(spec["in"], spec["rank"], spec["out"], bias=spec["bias"])
    if kind == "conv1d":
        return Conv1D(spec["out"], spec["in"])
    if kind == "linear":
        return nn.Linear(spec["in"], spec["out"], bias=spec["bias"])
    if kind == "block_sparse":
        return BlockSparseLinear(spec["in"], spec["out"], spec["block_size"], spec["blocks"], bias=spec["bias"])
    if kind == "factorized_embedding":
        return FactorizedEmbedding(spec["clusters"], spec["hidden"], spec["order"])
    if kind == "tied_embedding_head":  # tied to its embedding by apply_flop_plan
        return TiedFactorizedHead(spec["bias"], spec["vocab"])
    if kind == "skipped_attention":
        return SkippedAttention(spec["layer_idx"])
    if kind == "skipped_ffn":
        return SkippedFFN()
    raise ValueError(
        f"flop_plan module kind {kind!r} is unknown; expected linear, conv1d, low_rank, block_sparse, "
        "factorized_embedding, tied_embedding_head, skipped_attention or skipped_ffn."
    )


class ConfigView:
    """One module's view of the shared model config: every value the config's own, but a few per layer.

    Stock code that reads a head count from ``self.config`` (Phi-3's attention slices ``qkv_proj`` at
    ``config.num_attention_heads * head_dim``) then sees its layer's count, while everything else,
    ``_attn_implementation`` included, stays the live shared config's.
    """

    def __init__(self, config, overrides: dict) -> None:
        object.__setattr__(self, "_flop_config", config)
        object.__setattr__(self, "_flop_overrides", dict(overrides))

    def __getattr__(self, name: str):
        if name.startswith(("__", "_flop_")):  # copy/pickle probe these before the instance is set up
            raise AttributeError(name)
        if name in self._flop_overrides:
            return self._flop_overrides[name]
        return getattr(self._flop_config, name)

    def __setattr__(self, name: str, value) -> None:
        if name in self._flop_overrides:
            self._flop_overrides[name] = value
        else:
            setattr(self._flop_config, name, value)


def read_attribute(module: nn.Module, name: str):
    """``module.<name>``, following a dotted name (``"config.num_attention_heads"``); ``None`` if missing."""
    for part in name.split("."):
        module = getattr(module, part, None)
    return module


def write_attribute(module: nn.Module, name: str, value) -> None:
    """Set ``module.<name>``; a dotted name changes the value in the module's own view of that object (``ConfigView``)."""
    owner, _, leaf = name.rpartition(".")
    if not owner:
        setattr(module, name, value)
        return
    if "." in owner:
        raise ValueError(f"flop_plan attribute {name!r}: only one level of nesting (e.g. 'config.x') is supported.")
    shared = getattr(module, owner)
    if isinstance(shared, ConfigView):
        shared._flop_overrides[leaf] = value
    else:
        setattr(module, owner, ConfigView(shared, {leaf: value}))


def resize_norm(module: nn.Module, width: int) -> None:
    """Give a norm module parameters of ``width`` features (a norm over a projection cut with its heads)."""
    for name, param in list(module.named_parameters(recurse=False)):
        setattr(module, name, nn.Parameter(param.detach()[:width].clone(), requires_grad=param.requires_grad))
    if hasattr(module, "normalized_shape"):
        module.normalized_shape = (width,)


def resize_parameters(module: nn.Module, shapes: dict) -> None:
    """Give ``module`` fresh parameters of the planned shapes (a MoE layer's experts and router: fewer or
    narrower experts); the weights are loaded afterwards."""
    for name, shape in shapes.items():
        param = getattr(module, name)
        fresh = torch.empty(*shape, dtype=param.dtype, device=param.device)
        setattr(module, name, nn.Parameter(fresh, requires_grad=param.requires_grad))


def locate(model: nn.Module, path: str) -> tuple[nn.Module, nn.Module] | None:
    """``(root, module)`` for a plan path; ``None`` when this class has no such module (another task head)."""
    for root in (model.base_model, model):
        try:
            return root, root.get_submodule(path)
        except AttributeError:
            continue
    return None


def apply_flop_plan(model: nn.Module, plan: dict | None) -> None:
    """Rebuild ``model``'s planned modules with their compacted shapes and rewrite head counts."""
    plan = plan or {}
    for path, spec in plan.get("modules", {}).items():
        found = locate(model, path)
        if found is not None and spec["kind"] == "norm":
            resize_norm(found[1], spec["width"])
        elif found is not None and spec["kind"] == "parameters":
            resize_parameters(found[1], spec["shapes"])
        elif found is not None:
            parent_path, _, child = path.rpartition(".")
            setattr(found[0].get_submodule(parent_path), child, build_module(spec))
    for path, spec in plan.get("modules", {}).items():
        if spec["kind"] == "tied_embedding_head" and locate(model, path) is not None:
            locate(model, path)[1].tie_to(locate(model, spec["embedding"])[1])
    for path, attrs in plan.get("attributes", {}).items():
        found = locate(model, path)
        for name, value in attrs.items() if found is not None else ():
            write_attribute(found[1], name, value)


def auto_class_names(model_type: str) -> dict[str, str]:
    """``{auto class name: stock class name}`` for every ``AutoModel*`` class that knows ``model_type``."""
    found = {}
    for auto_name in dir(transformers):
        if not auto_name.startswith("AutoModel"):
            continue
        mapping = getattr(getattr(transformers, auto_name), "_model_mapping", None)
        name = getattr(mapping, "_model_mapping", {}).get(model_type)
        # skip composite entries whose class is built on another config (e.g. a decision head over qwen2)
        if isinstance(name, str) and getattr(transformers, name).config_class.model_type == model_type:
            found[auto_name] = name
    return found


class FlopCompactedMixin:
    """Rebuilds the planned modules after the stock ``__init__``; saves its own code with the weights."""

    flop_stock_class: type = None  # the stock class this one extends

    def __init__(self, config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        apply_flop_plan(self, getattr(config, "flop_plan", None))

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """Save as the stock class does, plus the code files (``CODE_FILES``) and ``auto_map``, for ``trust_remote_code``."""
        stock_config = self.flop_stock_class.config_class
        names = auto_class_names(stock_config.model_type)
        auto_map = {"AutoConfig": f"configuration_flop.{CLASS_PREFIX}{stock_config.__name__}"}
        auto_map.update({auto: f"modeling_flop.{CLASS_PREFIX}{name}" for auto, name in names.items()})
        self.config.auto_map = auto_map
        os.makedirs(save_directory, exist_ok=True)
        here = os.path.dirname(os.path.abspath(__file__))
        for name in CODE_FILES:
            shutil.copyfile(os.path.join(here, name), os.path.join(save_directory, name))
        super().save_pretrained(save_directory, *args, **kwargs)


def compacted_model_class(base: type) -> type:
    """The compacted class of the stock model class ``base``."""
    if issubclass(base, FlopCompactedMixin):
        return base
    namespace = {
        "__doc__": f"{base.__name__} compacted by hf_flop: planned layers have their pruned shapes.",
        "config_class": compacted_config_class(base.config_class),
        "flop_stock_class": base,
    }
    return derive(base, (FlopCompactedMixin, base), namespace, globals())


def __getattr__(name: str) -> type:
    return compacted_model_class(stock_class_named(name, transformers.PreTrainedModel))
