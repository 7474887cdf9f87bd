"""The block-sparse linear layer of models compacted after block-level pruning.

This file is copied next to the weights as remote code, so it imports only ``torch``.

``BlockSparseLinear`` stores a weight ``W`` (out x in) as its non-zero square blocks: ``values``
(n_blocks x bs x bs) holds each block *transposed* (input rows x output columns, so blocks can be
multiplied from the right without a copy), at block coordinates ``block_rows``/``block_cols``
(sorted by row, then column). Its parameter count is exactly ``n_blocks * bs * bs`` (+ bias).
Shapes that are not multiples of ``bs`` are zero-padded inside the edge blocks.

How it computes ``x W^T + b`` depends on the block sparsity and on how many tokens a call carries,
following ``benchmarks/bench_blocks.py`` (2-core CPU, one thread, 32 x 32 blocks; torch's own BSR
format was measured too and never beat these two kernels), see ``REGIMES``:

* ``gather_matmul``: gather the input slice of every stored block, one batched matmul, scatter-add
  into the output blocks -- best for decoding (few tokens) and at very high sparsity;
* ``rowwise_matmul``: per output block-row, one matmul of the gathered input columns with that
  row's blocks stacked (a view of ``values``) -- best for mid-size batches at moderate sparsity;
* below the break-even sparsity: the dense weight, rebuilt from the blocks once and cached (never
  saved). Break-even: about 0.7 block sparsity for 1-16 tokens, 0.6 at 128, 0.9 at 2048 tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Per regime: (at most this many tokens per call, ((from this block sparsity, use this kernel), ...)),
# dense below every listed sparsity. From benchmarks/bench_blocks.py (results/bench_blocks.json):
# with 1-16 tokens "gather" beats dense from 0.25-0.7 depending on the shape (0.7 covers all four);
# at 128 tokens "rowwise" does from 0.5-0.6 and "gather" wins from 0.9; at 2048 tokens every
# kernel (BSR included) needs ~0.9. The 512-token boundary lies between the measured 128 and 2048.
REGIMES: tuple[tuple[float, tuple[tuple[float, str], ...]], ...] = (
    (16, ((0.7, "gather"),)),
    (512, ((0.9, "gather"), (0.6, "rowwise"))),
    (math.inf, ((0.9, "gather"),)),
)


def kernel_for(tokens: int, sparsity: float) -> str:
    """``"gather"``, ``"rowwise"`` or ``"dense"``: the fastest way for this many tokens and this sparsity."""
    rules = next(rules for limit, rules in REGIMES if tokens <= limit)
    return next((kernel for least, kernel in rules if sparsity >= least), "dense")


def gather_matmul(
    x: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, n_row_blocks: int
) -> torch.Tensor:
    """``x W^T`` for a 2-D ``x`` (N x padded in), W given by its transposed blocks ``values``."""
    n, bs = values.shape[0], values.shape[-1]
    tokens = x.shape[0]
    out = x.new_zeros(n_row_blocks, tokens, bs)
    if n:
        pieces = x.view(tokens, -1, bs).index_select(1, cols).transpose(0, 1)  # n x N x bs
        out.index_add_(0, rows, torch.bmm(pieces, values))
    return out.transpose(0, 1).reshape(tokens, n_row_blocks * bs)


def rowwise_matmul(
    x: torch.Tensor, values: torch.Tensor, row_plan: list[tuple[int, int, torch.Tensor]]
) -> torch.Tensor:
    """``x W^T`` one output block-row at a time; ``row_plan[i] = (start, stop, input columns)``."""
    bs = values.shape[-1]
    outs = []
    for start, stop, columns in row_plan:
        if stop == start:
            outs.append(x.new_zeros(x.shape[0], bs))
        else:
            outs.append(x.index_select(1, columns) @ values[start:stop].reshape(-1, bs))
    return torch.cat(outs, dim=1)


class BlockSparseLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored as its non-zero ``block_size`` x ``block_size`` blocks."""

    def __init__(self, in_features: int, out_features: int, block_size: int, n_blocks: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.block_size = in_features, out_features, block_size
        self.row_blocks = math.ceil(out_features / block_size)
        self.col_blocks = math.ceil(in_features / block_size)
        if not 0 <= n_blocks <= self.row_blocks * self.col_blocks:
            raise ValueError(
                f"n_blocks={n_blocks} is impossible for a {out_features}x{in_features} weight in {block_size}-blocks."
            )
        self.values = nn.Parameter(torch.zeros(n_blocks, block_size, block_size))
        self.register_buffer("block_rows", torch.zeros(n_blocks, dtype=torch.long))
        self.register_buffer("block_cols", torch.zeros(n_blocks, dtype=torch.long))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._caches: dict[str, tuple[tuple, object]] = {}

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        block_size: int = 32,
        keep: torch.Tensor | None = None,
    ) -> BlockSparseLinear:
        """The blocks of ``weight`` (out x in) selected by ``keep`` (a bool grid of row x column blocks).

        ``keep=None`` keeps every block holding a non-zero value. Dropped blocks must be zero for the
        result to equal ``weight``; that is the caller's promise.
        """
        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, block_size, 0, bias=bias is not None)
        padded = weight.detach().new_zeros(layer.row_blocks * block_size, layer.col_blocks * block_size)
        padded[:out_f, :in_f] = weight.detach()
        blocks = padded.view(layer.row_blocks, block_size, layer.col_blocks, block_size).permute(0, 2, 3, 1)
        if keep is None:
            keep = (blocks != 0).any(dim=(2, 3))
        elif tuple(keep.shape) != (layer.row_blocks, layer.col_blocks):
            raise ValueError(f"keep has shape {tuple(keep.shape)}, expected {(layer.row_blocks, layer.col_blocks)}.")
        rows, cols = keep.to(torch.bool).nonzero(as_tuple=True)  # row-major: sorted by row, then column
        layer.values = nn.Parameter(blocks[rows, cols].contiguous())
        layer.block_rows, layer.block_cols = rows, cols
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone())
        return layer.to(weight.device)

    @property
    def sparsity(self) -> float:
        """Fraction of the block grid that is not stored."""
        return 1.0 - self.values.shape[0] / (self.row_blocks * self.col_blocks)

    def to_dense(self) -> torch.Tensor:
        """The ``(out, in)`` weight (differentiable in ``values``)."""
        bs = self.block_size
        grid = self.values.new_zeros(self.row_blocks, self.col_blocks, bs, bs)
        grid = grid.index_put((self.block_rows, self.block_cols), self.values)
        dense = grid.permute(0, 3, 1, 2).reshape(self.row_blocks * bs, self.col_blocks * bs)
        return dense[: self.out_features, : self.in_features]

    def _cached(self, name: str, build):
        # keyed on the tensors' versions: load_state_dict / in-place updates invalidate the cache
        key = tuple(
            (t._version, t.data_ptr(), t.dtype, t.device) for t in (self.values, self.block_rows, self.block_cols)
        )
        if name not in self._caches or self._caches[name][0] != key:
            self._caches[name] = (key, build())
        return self._caches[name][1]

    def _dense_weight(self) -> torch.Tensor:
        if torch.is_grad_enabled() and self.values.requires_grad:
            return self.to_dense()  # training: rebuilt each call so gradients reach the blocks
        return self._cached("dense", lambda: self.to_dense().detach().contiguous())

    def _row_plan(self) -> list[tuple[int, int, torch.Tensor]]:
        rows, cols, bs = self.block_rows, self.block_cols, self.block_size
        if rows.numel() > 1 and bool((rows[1:] < rows[:-1]).any()):
            raise ValueError("BlockSparseLinear.block_rows must be sorted (as from_dense writes them).")
        ends = torch.bincount(rows, minlength=self.row_blocks).cumsum(0).tolist()
        starts = [0, *ends[:-1]]
        span = torch.arange(bs, device=cols.device)
        return [(s, e, (cols[s:e, None] * bs + span).flatten()) for s, e in zip(starts, ends)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // self.in_features
        kernel = kernel_for(tokens, self.sparsity)
        if kernel == "dense":
            return F.linear(x, self._dense_weight(), self.bias)
        flat = x.reshape(tokens, self.in_features)
        pad = self.col_blocks * self.block_size - self.in_features
        if pad:
            flat = F.pad(flat, (0, pad))
        if kernel == "gather":
            out = gather_matmul(flat, self.values, self.block_rows, self.block_cols, self.row_blocks)
        else:
            out = rowwise_matmul(flat, self.values, self._cached("rows", self._row_plan))
        out = out[:, : self.out_features]
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}, "
            f"blocks={self.values.shape[0]}/{self.row_blocks * self.col_blocks}, bias={self.bias is not None}"
        )
