"""Level ``"block"``: MLPruning's block-wise sparsity inside dense targeted matrices.

A targeted linear of shape ``(out, in)`` in dense mode (no ``"rank"`` level in the same step) is
tiled into ``(out / bs) x (in / bs)`` square blocks of side ``bs = FlopConfig.block_size``; one gate
unit per block, stored in ``FlopLinear.flop_block_gate[adapter]`` (a PEFT adapter-layer
ModuleDict, so adapter checkpoints hold it). The forward multiplies the weight by the block mask.

Accounting: a block-pruned layer keeps ``kept_blocks * bs^2`` parameters, exactly what
``BlockSparseLinear`` stores after compaction. When head/row gates also shrink the layer in the
same step, the count is scaled by the kept fractions ``(out'/out) (in'/in)``: an estimate, since
compaction then re-tiles the cut matrix into blocks of its own. The recommended two-step pipeline
(head/row first, compact, then block on the compacted model) never hits that case.

Compaction: ``compact_block_layer`` turns a layer into a ``BlockSparseLinear`` plan entry and its
tensors (``hf_flop/modeling/block_sparse.py``, which picks a gather kernel or dense per call from
the measured break-even sparsities).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .gates import Gate
from .layers import LINEAR_TYPES, dense_weight, linear_shape
from .modeling.block_sparse import BlockSparseLinear


def check_block_shapes(model: nn.Module, names: list[str], block_size: int) -> None:
    """Raise a clear ``ValueError`` if ``block_size`` does not tile every targeted linear."""
    modules = dict(model.named_modules())
    bad = {
        name: linear_shape(modules[name])
        for name in names
        if isinstance(modules[name], LINEAR_TYPES) and any(d % block_size for d in linear_shape(modules[name]))
    }
    if bad:
        shown = ", ".join(f"{n} {o}x{i}" for n, (o, i) in list(bad.items())[:4])
        raise ValueError(
            f"FlopConfig.block_size={block_size} does not divide the shape (out x in) of {len(bad)} targeted "
            f"module(s): {shown}. Choose a block_size dividing both dimensions, or list these modules in "
            "exclude_modules. (After head/row pruning, compact with FlopConfig(round_to=block_size) so the "
            "kept widths stay multiples of it.)"
        )


def add_block_gate(layer: nn.Module, adapter_name: str, gate_factory, block_size: int) -> None:
    """Give ``layer`` (a dense-mode ``FlopLinear``) one gate unit per ``block_size`` square block."""
    out_f, in_f = layer.out_features, layer.in_features
    if out_f % block_size or in_f % block_size:
        raise ValueError(
            f"FlopConfig.block_size={block_size} does not divide this layer's shape {out_f}x{in_f}; choose a "
            "block_size dividing both, or exclude the module."
        )
    gate: Gate = gate_factory((out_f // block_size) * (in_f // block_size))
    layer.flop_block_gate[adapter_name] = gate.to(device=dense_weight(layer.base_layer).device)


def grid(layer: nn.Module) -> tuple[int, int]:
    """``(row blocks, column blocks)`` of a block-gated layer."""
    return layer.out_features // layer.block_size, layer.in_features // layer.block_size


def masked_weight(weight: torch.Tensor, mask: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``weight`` (out x in) with block ``(i, j)`` scaled by ``mask[i * cols + j]`` (broadcast, no expansion)."""
    out_f, in_f = weight.shape
    tiled = weight.reshape(rows, out_f // rows, cols, in_f // cols)
    return (tiled * mask.to(weight.dtype).view(rows, 1, cols, 1)).reshape(out_f, in_f)


def block_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The dense-mode forward of a block-gated ``FlopLinear``: ``x (W * M)^T + b``."""
    weight = masked_weight(dense_weight(layer.base_layer), layer.block_gate(), *grid(layer))
    return F.linear(x.to(weight.dtype), weight, layer.bias)


def folded_block_weight(layer: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight with the eval block mask applied."""
    mask = layer.block_gate.deterministic_mask().detach()
    return masked_weight(dense_weight(layer.base_layer).detach(), mask, *grid(layer))


def block_params(layer: nn.Module, in_kept, out_kept, deterministic: bool):
    """Kept parameters of a block-gated layer (a tensor; differentiable when not ``deterministic``).

    ``kept blocks * bs^2``, scaled by ``(out'/out) (in'/in)`` when head/row gates cut the layer.
    """
    gate = layer.block_gate
    if deterministic:
        kept = (gate.deterministic_mask() != 0).sum().to(torch.float64)
    else:
        kept = gate.expected_l0()
    params = kept * layer.block_size**2
    scale = (out_kept / layer.out_features) * (in_kept / layer.in_features)
    params = params * scale
    return torch.round(params).long() if deterministic else params


@torch.no_grad()
def compact_block_layer(
    layer: nn.Module, rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor
) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(plan entry, tensors)`` of a block-gated layer after compaction.

    ``rows``/``cols`` are the output rows and input columns kept by head/row gates (all of them in
    the two-step pipeline) and ``scale`` the folded head/row gate values per kept column. The result
    is a ``BlockSparseLinear`` holding the open blocks (when head/row gates cut the layer: the
    non-zero blocks of the masked, cut weight, re-tiled); its plan entry
    is ``{"kind": "block_sparse", "in", "out", "block_size", "blocks", "bias"}`` and the tensors are
    named as its state dict (``values``, ``block_rows``, ``block_cols``, ``bias``).
    """
    dtype = dense_weight(layer.base_layer).dtype
    weight = folded_block_weight(layer).float().cpu()[rows][:, cols] * scale
    bias = layer.bias.detach().float().cpu()[rows] if layer.bias is not None else None
    keep = None  # cut by head/row gates: re-tile, keeping the blocks that hold anything
    if len(rows) == layer.out_features and len(cols) == layer.in_features:
        keep = (layer.block_gate.deterministic_mask() != 0).view(*grid(layer)).cpu()  # exactly the open blocks
    compact = BlockSparseLinear.from_dense(weight, bias, layer.block_size, keep=keep)
    spec = {
        "kind": "block_sparse",
        "in": compact.in_features,
        "out": compact.out_features,
        "block_size": compact.block_size,
        "blocks": compact.values.shape[0],
        "bias": bias is not None,
    }
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in compact.state_dict().items()}
    return spec, tensors
