"""An ONNX file measured where it runs: its task metric and its latency through ONNX Runtime (CPU).

``evaluate_onnx`` is ``evaluate_model`` with ONNX Runtime computing the logits: the same batches, the same
scoring (``evaluation.add_batch``), so a file's accuracy or perplexity reads against the PyTorch model's.
``onnx_latency`` is ``cpu_latency``'s measurement (the fastest of ``repeats`` runs) for one file.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from ..onnx_quant import onnx_inputs
from .evaluation import add_batch
from .loading import load, task_metric

__all__ = ["evaluate_onnx", "onnx_latency", "onnx_session"]


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An ONNX Runtime CPU session of the file at ``path``, on ``threads`` threads (default: ONNX Runtime's)."""
    import onnxruntime

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is not a file; pass the .onnx file export_onnx wrote.")
    if threads is not None and threads < 1:
        raise ValueError(f"threads={threads} must be >= 1 (or None for ONNX Runtime's default).")
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1  # one operator at a time: the thread count is the one asked for
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def evaluate_onnx(
    path: str | os.PathLike,
    dataset,
    *,
    task: str,
    collator,
    batch_size: int = 32,
    threads: int | None = None,
) -> dict[str, float]:
    """Accuracy (``task="seq-cls"``) or per-token perplexity (``"causal-lm"``) of the ONNX model at ``path``.

    Arguments as ``evaluate_model``'s (``dataset`` holds model inputs plus ``labels``, ``collator`` batches
    its rows); the logits are ONNX Runtime's, for the inputs the file declares (``export_onnx``'s).
    """
    metric = load(task_metric(task))
    session = onnx_session(path, threads)
    names = [node.name for node in session.get_inputs()]
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collator)
    for index, batch in enumerate(loader):
        labels = batch.pop("labels")
        (logits,) = session.run(["logits"], onnx_inputs(batch, names, index, what="evaluation batch"))
        add_batch(metric, task, torch.from_numpy(logits), labels)
    return metric.compute()


def onnx_latency(
    path: str | os.PathLike, inputs: dict, *, repeats: int = 10, warmup: int = 2, threads: int | None = None
) -> float:
    """Fastest of ``repeats`` ONNX Runtime runs of the file at ``path`` on ``inputs`` (a batch of model inputs,
    tensors or arrays), in seconds, after ``warmup`` runs; on ``threads`` threads (default: ONNX Runtime's)."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1.")
    session = onnx_session(path, threads)
    feed = onnx_inputs(inputs, [node.name for node in session.get_inputs()], what="latency batch")
    times = []
    for round_ in range(warmup + repeats):
        start = time.perf_counter()
        session.run(["logits"], feed)
        if round_ >= warmup:
            times.append(time.perf_counter() - start)
    return min(times)
