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

Compaction: the layer becomes a ``BlockSparseLinear`` (``hf_flop/modeling/block_sparse.py``, which
picks a gather kernel or dense per call from the measured break-even sparsities); its plan entry is
``{"kind": "block_sparse", "in", "out", "block_size", "blocks", "bias"}`` (``blocks``: how many
weight blocks it stores).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .gated import Compacted, Cut, GatedUnits, ModuleSparsity
from .gates import Gate
from .linear import dense_weight, is_linear, linear_shape
from .modeling.block_sparse import BlockSparseLinear


def check_block_shapes(model: nn.Module, names: list[str], block_size: int) -> None:
    """Raise a clear ``ValueError`` if ``block_size`` does not tile every targeted linear."""
    modules = dict(model.named_modules())
    bad = {
        name: linear_shape(modules[name])
        for name in names
        if is_linear(modules[name]) and any(d % block_size for d in linear_shape(modules[name]))
    }
    if bad:
        shown = ", ".join(f"{n} {o}x{i}" for n, (o, i) in list(bad.items())[:4])
        raise ValueError(
            f"FlopConfig.block_size={block_size} does not divide the shape (out x in) of {len(bad)} targeted "
            f"module(s): {shown}. Choose a block_size dividing both dimensions, or list these modules in "
            "exclude_modules. (After head/row pruning, compact with FlopConfig(round_to=block_size) so the "
            "kept widths stay multiples of it.)"
        )


def grid(layer: nn.Module) -> tuple[int, int]:
    """``(row blocks, column blocks)`` of a block-gated layer."""
    return layer.out_features // layer.block_size, layer.in_features // layer.block_size


def masked_weight(weight: torch.Tensor, mask: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``weight`` (out x in) with block ``(i, j)`` scaled by ``mask[i * cols + j]`` (broadcast, no expansion)."""
    out_f, in_f = weight.shape
    tiled = weight.reshape(rows, out_f // rows, cols, in_f // cols)
    return (tiled * mask.to(weight.dtype).view(rows, 1, cols, 1)).reshape(out_f, in_f)


class BlockVariant:
    """The ``FlopLinear`` variant of level ``"block"`` (one gate unit per square block, ``flop_block_gate``).

    Every verb takes the ``FlopLinear`` it serves as ``layer`` (see ``hf_flop.layers.LinearVariant``).
    """

    supersedes_base_weight = False

    @staticmethod
    def update_layer(layer: nn.Module, adapter_name: str, gate_factory: Callable[[int], Gate]) -> None:
        bs = layer.block_size
        if layer.out_features % bs or layer.in_features % bs:
            raise ValueError(
                f"FlopConfig.block_size={bs} does not divide this layer's shape "
                f"{layer.out_features}x{layer.in_features}; choose a block_size dividing both, or exclude the module."
            )
        rows, cols = grid(layer)
        layer.flop_block_gate[adapter_name] = gate_factory(rows * cols).to(device=layer.base_layer.weight.device)

    @staticmethod
    def gates(layer: nn.Module) -> dict[str, Gate]:
        return {"block": layer.flop_block_gate[layer.active_adapters[0]]}

    @staticmethod
    def forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        weight = masked_weight(dense_weight(layer.base_layer), layer.block_gate(), *grid(layer))
        return F.linear(x.to(weight.dtype), weight, layer.bias)

    @staticmethod
    def folded_weight(layer: nn.Module) -> torch.Tensor:
        mask = layer.block_gate.deterministic_mask().detach()
        return masked_weight(dense_weight(layer.base_layer).detach(), mask, *grid(layer))

    @staticmethod
    def count(layer: nn.Module, kept_in, kept_out, deterministic: bool, round_to: int) -> ModuleSparsity:
        """``kept blocks * bs^2``, scaled by ``(out'/out) (in'/in)`` when head/row gates cut the layer."""
        gate = layer.block_gate
        kept = gate.l0(deterministic)
        scale = (kept_out / layer.out_features) * (kept_in / layer.in_features)
        params = (kept.to(torch.float64) if deterministic else kept) * layer.block_size**2 * scale
        entry = ModuleSparsity(layer.shape, (int(kept_out), int(kept_in)), None, None, params, False)
        if deterministic:
            entry.kept_params = torch.round(params).long()
            entry.blocks, entry.kept_blocks = gate.n, int(kept)
        return entry

    @staticmethod
    def compact(layer: nn.Module, cut: Cut) -> Compacted:
        return Compacted(*compact_block_layer(layer, cut.rows, cut.cols, cut.scale))

    @staticmethod
    def scored_units(layer: nn.Module, name: str) -> list[GatedUnits]:
        """A unit is a ``bs x bs`` block (i, j) reading inputs ``j*bs..``; magnitude is its Frobenius norm."""
        bs = layer.block_size
        rows, cols = grid(layer)
        weight = layer.folded_weight().float()
        column_sq = weight.reshape(rows, bs, cols, bs).pow(2).sum(1)  # (rows, cols, bs): unit i*cols + j
        index = (torch.arange(cols)[:, None] * bs + torch.arange(bs)).repeat(rows, 1).flatten()
        return [
            GatedUnits(
                key=f"{name}.block",
                level="block",
                gate=layer.block_gate,
                n_units=rows * cols,
                unit=bs,
                unit_params=bs * bs,
                observed=layer,
                column_sq_norms=column_sq.flatten(),
                row_sq_norms=torch.ones(rows * cols, device=weight.device),
                feature_index=index.to(weight.device),
                module=name,
            )
        ]

    @staticmethod
    def reference(layer: nn.Module) -> torch.Tensor:
        return dense_weight(layer.base_layer).detach()

    @staticmethod
    def refit(layer: nn.Module, moments: torch.Tensor, scale: torch.Tensor, fit_bias: bool, ridge: float) -> None:
        return None  # a free least-squares refit would fill the closed blocks again: left as pruned

    @staticmethod
    def describe(layer: nn.Module) -> str:
        return f"blocks of {layer.block_size}"


@torch.no_grad()
def compact_block_layer(
    layer: nn.Module, rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor
) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(plan entry, tensors)`` of a block-gated layer after compaction.

    ``rows``/``cols`` are the output rows and input columns kept by head/row gates (all of them in
    the two-step pipeline) and ``scale`` the folded head/row gate values per kept column. The result
    is a ``BlockSparseLinear`` holding the open blocks (when head/row gates cut the layer: the
    non-zero blocks of the masked, cut weight, re-tiled); the tensors are named as its state dict
    (``values``, ``block_rows``, ``block_cols``, ``bias``).
    """
    dtype = dense_weight(layer.base_layer).dtype
    weight = layer.folded_weight().float().cpu()[rows][:, cols] * scale
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
