"""The linear layers FLOP targets, and the one place that knows GPT-2's ``Conv1D`` orientation.

``nn.Linear`` stores its weight as ``(out, in)``; transformers' ``Conv1D`` (GPT-2) as ``(in, out)``.
Everything else in hf_flop reads and writes weights as ``(out, in)`` through these functions.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

LINEAR_TYPES = (nn.Linear, Conv1D)


def is_linear(module: nn.Module) -> bool:
    """Whether FLOP can target ``module`` (an ``nn.Linear`` or a GPT-2 ``Conv1D``)."""
    return isinstance(module, LINEAR_TYPES)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of an ``nn.Linear``, a GPT-2 ``Conv1D`` or a gated layer wrapping one."""
    if hasattr(module, "base_layer") and hasattr(module, "in_features"):  # a FlopLinear
        return module.out_features, module.in_features
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, Conv1D):
        return module.nf, module.weight.shape[0]
    raise TypeError(f"{type(module).__name__} is not a linear layer (nn.Linear or transformers Conv1D).")


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight of a linear layer (a view: ``Conv1D`` stores its transpose)."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


@torch.no_grad()
def set_dense_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an ``(out, in)`` weight into a linear layer of the same shape, in place."""
    module.weight.data.copy_(weight.t() if isinstance(module, Conv1D) else weight)


def cut_linear(module: nn.Module, weight: torch.Tensor, rows: torch.Tensor) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(plan entry, tensors)`` of ``module`` cut to the ``(out', in')`` ``weight`` and its bias to ``rows``.

    The plan kind keeps the module's type (``"conv1d"`` for GPT-2), so the stock forward code and
    checkpoint layout of the architecture still apply to the compacted model. Tensors come back in
    the module's dtype.
    """
    conv = isinstance(module, Conv1D)
    dtype = module.weight.dtype
    bias = module.bias.detach()[rows] if module.bias is not None else None
    out_f, in_f = weight.shape
    spec = {"kind": "conv1d" if conv else "linear", "in": in_f, "out": out_f, "bias": bias is not None}
    tensors = {"weight": weight.t() if conv else weight}
    if bias is not None:
        tensors["bias"] = bias
    return spec, {k: v.to(dtype).contiguous() for k, v in tensors.items()}


@torch.no_grad()
def set_bias(module: nn.Module, bias: torch.Tensor | None) -> None:
    """Write ``bias`` into a linear layer, giving it a bias parameter if it had none (``None``: leave it)."""
    if bias is None:
        return
    bias = bias.to(device=module.weight.device, dtype=module.weight.dtype)
    if module.bias is None:
        module.bias = nn.Parameter(bias.clone(), requires_grad=module.weight.requires_grad)
    else:
        module.bias.data.copy_(bias)


def per_input(module: nn.Module, values: torch.Tensor) -> torch.Tensor:
    """``values`` (one per input feature) shaped to multiply ``module.weight`` (or its gradient) column by column."""
    return values[:, None] if isinstance(module, Conv1D) else values[None, :]


@torch.no_grad()
def scale_inputs_(module: nn.Module, scale: torch.Tensor) -> None:
    """Multiply each input feature's weights (a column of the ``(out, in)`` weight) by ``scale``, in place."""
    module.weight.mul_(per_input(module, scale))
