"""Block-sparse matmul on CPU: torch BSR vs two gather kernels vs dense, across block sparsities.

Decides the compacted representation of level "block" (``hf_flop/modeling/block_sparse.py``) and
its break-even sparsities. For each weight shape (MiniLM's and SmolLM2's FFN matrices), token count
(1 token: decoding ... 32 x 64 tokens: a batch) and block sparsity, it times ``x W^T`` with

* ``dense``:   ``F.linear`` with the zero-filled dense weight;
* ``bsr``:     ``torch.sparse`` BSR weight (``to_sparse_bsr``) times ``x^T``;
* ``gather``:  gather every stored block's input slice, one batched matmul, scatter-add;
* ``rowwise``: per output block-row, gathered input columns times that row's stacked blocks.

The kernels are the ones ``BlockSparseLinear`` runs. Each repetition times every kernel in turn and
the minimum per kernel is kept (the machine is shared: the minimum is the least disturbed run).
Writes ``benchmarks/results/bench_blocks.json`` and ``bench_blocks.png``. One thread by default
(``--threads`` to change). Run: ``.venv/bin/python benchmarks/bench_blocks.py`` (a few minutes),
``--quick`` for a smoke run that writes nothing.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from hf_flop.modeling.block_sparse import BlockSparseLinear, gather_matmul, rowwise_matmul

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, also when imported
import common  # noqa: E402

SHAPES = [(1536, 384), (384, 1536), (1536, 576), (576, 1536)]  # (out, in): FFN up/down of MiniLM, SmolLM2
TOKENS = [1, 16, 128, 32 * 64]
KERNELS = ("bsr", "gather", "rowwise")
SPARSITIES = [0.0, 0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]


def _block_weight(out_f: int, in_f: int, block: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    """A random weight with exactly ``round(sparsity * n)`` of its ``n`` blocks zero."""
    rows, cols = out_f // block, in_f // block
    n = rows * cols
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.randperm(n, generator=gen)[: n - round(sparsity * n)]] = True
    mask = keep.view(rows, 1, cols, 1).expand(rows, block, cols, block).reshape(out_f, in_f)
    return torch.randn(out_f, in_f, generator=gen) * mask


def measure(shape, tokens: int, sparsity: float, block: int, reps: int, gen: torch.Generator) -> dict:
    out_f, in_f = shape
    weight = _block_weight(out_f, in_f, block, sparsity, gen)
    x = torch.randn(tokens, in_f, generator=gen)
    layer = BlockSparseLinear.from_dense(weight, None, block).requires_grad_(False)
    plan = layer._row_plan()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "BSR support is in beta"
        bsr = weight.to_sparse_bsr((block, block))
    xt = x.t().contiguous()
    kernels = {
        "dense": lambda: F.linear(x, weight),
        "bsr": lambda: (bsr @ xt).t(),
        "gather": lambda: gather_matmul(x, layer.values, layer.block_rows, layer.block_cols, layer.row_blocks),
        "rowwise": lambda: rowwise_matmul(x, layer.values, plan),
    }
    reference = kernels["dense"]()
    row = {"out": out_f, "in": in_f, "tokens": tokens, "sparsity": sparsity}
    with torch.no_grad():
        for name, fn in kernels.items():
            err = (fn() - reference).abs().max().item()
            if err > 1e-3 * max(1.0, reference.abs().max().item()):
                raise RuntimeError(f"{name} disagrees with dense by {err} at {row}")
        row.update({f"{name}_ms": 1e3 * t for name, t in common.best_times(kernels, reps, warmup=1).items()})
    return row


def break_even(rows: list[dict], kernel: str) -> float | None:
    """Smallest measured sparsity from which ``kernel`` stays faster than dense (None: never)."""
    found = None
    for row in sorted(rows, key=lambda r: r["sparsity"], reverse=True):
        if row[f"{kernel}_ms"] < row["dense_ms"]:
            found = row["sparsity"]
        else:
            break
    return found


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(TOKENS), len(SHAPES), figsize=(4 * len(SHAPES), 3.2 * len(TOKENS)), sharex=True)
    for i, tokens in enumerate(TOKENS):
        for j, (out_f, in_f) in enumerate(SHAPES):
            ax = axes[i][j]
            sel = [r for r in rows if r["tokens"] == tokens and (r["out"], r["in"]) == (out_f, in_f)]
            xs = [r["sparsity"] for r in sel]
            for kernel in KERNELS:
                ax.plot(xs, [r["dense_ms"] / r[f"{kernel}_ms"] for r in sel], marker="o", label=kernel)
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_yscale("log")
            ax.set_title(f"{out_f}x{in_f}, {tokens} token{'s' if tokens > 1 else ''}", fontsize=9)
            if i == len(TOKENS) - 1:
                ax.set_xlabel("block sparsity")
            if j == 0:
                ax.set_ylabel("speed-up over dense")
    axes[0][0].legend()
    fig.tight_layout()
    common.save_figure(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = common.standalone_parser(__doc__, quick="One shape, three sparsities, 2 rounds; writes nothing.", reps=7)
    parser.add_argument("--block-size", type=int, default=32, help="Block side (default 32).")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes, sparsities, reps = (SHAPES[:1], [0.0, 0.5, 0.9], 2) if args.quick else (SHAPES, SPARSITIES, args.reps)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape in shapes:
        for tokens in TOKENS:
            for sparsity in sparsities:
                rows.append(measure(shape, tokens, sparsity, args.block_size, reps, gen))
                r = rows[-1]
                speedups = "  ".join(f"{k} x{r['dense_ms'] / r[f'{k}_ms']:5.2f}" for k in KERNELS)
                print(
                    f"{shape[0]:>5}x{shape[1]:<5} tokens {tokens:>5} sparsity {sparsity:.2f}: dense {r['dense_ms']:8.3f} ms  {speedups}"
                )
    summary = {}
    for shape in shapes:
        for tokens in TOKENS:
            sel = [r for r in rows if (r["out"], r["in"]) == shape and r["tokens"] == tokens]
            key = f"{shape[0]}x{shape[1]}@{tokens}"
            summary[key] = {k: break_even(sel, k) for k in KERNELS}
            print(f"break-even sparsity {key}: {summary[key]}")
    result = {
        "block_size": args.block_size,
        "threads": args.threads,
        "torch": torch.__version__,
        "quick": args.quick,
        "rows": rows,
        "break_even": summary,
    }
    if not args.quick:
        path = args.output_dir / "bench_blocks.json"
        common.write_json(path, result, indent=1)
        plot(rows, args.output_dir / "bench_blocks.png")
        print(f"wrote {path} and bench_blocks.png")
    return result


if __name__ == "__main__":
    main()
