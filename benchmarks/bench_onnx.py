"""ONNX Runtime latency of compacted vs dense MiniLM.

MiniLM-L6-H384 (BERT, sequence classification: the embedded weights of ``hf_flop.app.data.minilm_path()``
with a new, seeded classifier head) is pruned one-shot (``hf_flop.prune_oneshot``, levels head and
row, magnitude scores: no calibration data and no training, since only speed is measured here) to
50 % and 75 % of the prunable linears, compacted (``hf_flop.compact``) and written with
``hf_flop.export_onnx``, as is the dense model. ONNX Runtime (CPUExecutionProvider, ``--threads``
intra-op threads, default 1) then times each model at batch 1 and 32 on 64-token inputs; the
models run interleaved and the best of ``--reps`` rounds is kept (the least disturbed one). PyTorch's
latency of the same models with the same thread count is measured in the same rounds, for
reference, and ONNX Runtime's logits are compared with PyTorch's on the timing inputs.

Writes ``benchmarks/results/bench_onnx.json`` and ``bench_onnx.png`` and prints a markdown table.
Latency must be timed on an otherwise idle machine. Run: ``.venv/bin/python benchmarks/bench_onnx.py``
(a few minutes); ``--quick`` is a smoke run on a tiny random BERT (16 tokens, 2 rounds) that writes
``bench_onnx_quick.{json,png}`` (meaningless numbers). Needs ``pip install 'hf-flop[deploy]'``.
``python benchmarks/tables.py`` prints the same table from the committed JSON.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime
import torch
import transformers

import hf_flop
from hf_flop import FlopConfig, compact, export_onnx, prune_oneshot, sparsity_report

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, also when imported
import common  # noqa: E402
from tables import onnx_table  # noqa: E402

TARGETS = (0.5, 0.75)
BATCHES = (1, 32)
GOAL = (0.5, 32, 1.6)  # the goal set for ONNX Runtime: compacted at 50 % >= 1.6x dense at batch 32


def models(build: Callable[[], torch.nn.Module]) -> dict[str, dict]:
    """The dense model and its one-shot compacted versions, with what the table reports about each."""
    dense = build().eval()
    found = {"dense": {"model": dense, "sparsity": 0.0}}
    for target in TARGETS:
        gated = prune_oneshot(
            build(), FlopConfig(levels=["head", "row"], target_sparsity=target), score="magnitude", reconstruct=False
        )
        found[f"pruned_{round(100 * target)}"] = {
            "model": compact(gated).eval(),
            "sparsity": sparsity_report(gated).deterministic_sparsity,
        }
    return found


def inputs(batch: int, length: int, vocab: int) -> dict[str, torch.Tensor]:
    """``batch x length`` token ids (no padding) as every model gets them; MiniLM's word pieces start at 1000."""
    g = torch.Generator().manual_seed(batch)
    low = 1000 if vocab > 2000 else 1
    return {
        "input_ids": torch.randint(low, vocab, (batch, length), generator=g),
        "attention_mask": torch.ones(batch, length, dtype=torch.long),
        "token_type_ids": torch.zeros(batch, length, dtype=torch.long),
    }


def session(path: Path, threads: int) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def measure(found: dict[str, dict], folder: Path, *, length: int, reps: int, threads: int) -> list[dict]:
    """Export every model, then time ONNX Runtime and PyTorch on each batch size; one row per model."""
    rows, sessions = [], {}
    for name, entry in found.items():
        path = export_onnx(entry["model"], folder / f"{name}.onnx")
        sessions[name] = session(path, threads)
        rows.append(
            {
                "model": name,
                "sparsity": round(entry["sparsity"], 4),
                "params": sum(p.numel() for p in entry["model"].parameters()),
                "onnx_bytes": path.stat().st_size,
            }
        )
    vocab = found["dense"]["model"].config.vocab_size
    for batch in BATCHES:
        feed = inputs(batch, length, vocab)
        numpy_feed = {k: v.numpy() for k, v in feed.items()}
        runs = {}
        for name, entry in found.items():
            runs[f"ort/{name}"] = lambda s=sessions[name], f=numpy_feed: s.run(["logits"], f)
            runs[f"torch/{name}"] = lambda m=entry["model"], f=feed: m(**f)
        times = common.best_times(runs, reps, warmup=2)
        for row in rows:
            name = row["model"]
            (logits,) = sessions[name].run(["logits"], numpy_feed)
            reference = found[name]["model"](**feed).logits.numpy()
            row[f"ort_ms_b{batch}"] = 1000 * times[f"ort/{name}"]
            row[f"torch_ms_b{batch}"] = 1000 * times[f"torch/{name}"]
            row[f"ort_speedup_b{batch}"] = times["ort/dense"] / times[f"ort/{name}"]
            row[f"torch_speedup_b{batch}"] = times["torch/dense"] / times[f"torch/{name}"]
            row[f"max_logit_diff_b{batch}"] = float(np.abs(logits - reference).max())
        print(f"batch {batch}: " + ", ".join(f"{k} {1000 * v:.2f} ms" for k, v in times.items()), flush=True)
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"{r['model']}\n(sparsity {r['sparsity']:.2f})" for r in rows]
    x = np.arange(len(rows))
    width = 0.2
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (engine, batch) in enumerate((("ort", 1), ("ort", 32), ("torch", 1), ("torch", 32))):
        name = {"ort": "ONNX Runtime", "torch": "PyTorch"}[engine]
        hatch = "" if engine == "ort" else "//"
        values = [r[f"{engine}_speedup_b{batch}"] for r in rows]
        ax1.bar(x + (i - 1.5) * width, values, width, label=f"{name}, batch {batch}", hatch=hatch)
        ax2.bar(x + (i - 1.5) * width, [r[f"{engine}_ms_b{batch}"] for r in rows], width, hatch=hatch)
    target, batch, goal = GOAL
    ax1.axhline(goal, color="gray", ls="--", lw=0.8, label=f"goal at {target:.0%}, batch {batch}: {goal}x")
    ax1.axhline(1.0, color="black", lw=0.6)
    ax1.set_ylabel("speed-up over the dense model (x)")
    ax1.legend(fontsize=7)
    ax2.set_yscale("log")
    ax2.set_ylabel("latency (ms, log scale)")
    for ax in (ax1, ax2):
        ax.set_xticks(x, labels, fontsize=8)
    title = f"{result['model']}: {result['seq_len']} tokens, {result['threads']} thread(s), best of {result['reps']}"
    fig.suptitle(title)
    fig.tight_layout()
    common.save_figure(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = common.standalone_parser(
        __doc__,
        quick="Tiny random BERT, 16 tokens, 2 rounds: a smoke run.",
        reps=10,
        reps_help="Timed rounds per batch size (after 2 warm-up rounds).",
        threads_help="ONNX Runtime intra-op and torch threads.",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # the exporter's notes on optional operators
    build, name, length, reps = (
        (common.tiny_bert, "tiny random BERT", 16, 2)
        if args.quick
        else (partial(common.minilm_classifier, seed=0), "MiniLM-L6-H384", 64, args.reps)
    )

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_onnx_") as folder:
        rows = measure(models(build), Path(folder), length=length, reps=reps, threads=args.threads)
    result = {
        "model": name,
        "seq_len": length,
        "threads": args.threads,
        "reps": reps,
        "rows": rows,
        "machine": {"cpus": os.cpu_count(), "load_avg_start": load_start, "load_avg_end": os.getloadavg()},
        "versions": {
            "hf_flop": hf_flop.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
    }
    stem = "bench_onnx_quick" if args.quick else "bench_onnx"
    common.write_json(args.output_dir / f"{stem}.json", result)
    plot(result, args.output_dir / f"{stem}.png")
    print(onnx_table(result))
    print(f"wrote {args.output_dir / stem}.json and .png")
    return result


if __name__ == "__main__":
    main()
