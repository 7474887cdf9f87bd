"""Evaluation and CPU latency of (pruned, compacted or dense) models, offline.

Metrics go through the ``evaluate`` modules shipped in this folder, so results read the same as
any ``evaluate`` pipeline's while nothing is fetched from the Hub.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from .loading import TASKS, load, task_metric

__all__ = ["TASKS", "add_batch", "cpu_latency", "evaluate_model"]


@torch.no_grad()
def evaluate_model(model: nn.Module, dataset, *, task: str, collator, batch_size: int = 32) -> dict[str, float]:
    """Accuracy (``task="seq-cls"``) or per-token perplexity (``"causal-lm"``) of ``model`` on ``dataset``.

    ``dataset`` holds model inputs plus ``labels`` (as ``hf_flop.app.data.tokenize_classification`` /
    ``tokenize_lm`` make them); ``collator`` batches its rows. The model is put in eval mode, so a
    FLOP model uses its deterministic masks.
    """
    metric = load(task_metric(task))
    model.eval()
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collator)
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        add_batch(metric, task, model(**batch).logits, labels)
    return metric.compute()


def add_batch(metric, task: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Add one batch's ``logits`` against its ``labels`` to ``task``'s ``metric`` (``load(task_metric(task))``).

    The one scoring rule of every evaluation loop (PyTorch here, ONNX Runtime and llama.cpp in their own
    modules), so a file's metric and the model's are computed alike: accuracy of the argmax, or the summed
    next-token loss (labels shifted by one, ``-100`` ignored) with its token count.
    """
    if task == "seq-cls":
        metric.add_batch(predictions=logits.argmax(-1).tolist(), references=labels.tolist())
        return
    targets = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
    metric.add_batch(nll=[nll.item()], n_tokens=[int((targets != -100).sum())])


@torch.no_grad()
def cpu_latency(
    models: dict[str, nn.Module], inputs: dict, *, repeats: int = 10, warmup: int = 2, threads: int | None = None
) -> dict[str, float]:
    """Fastest of ``repeats`` forward passes of each model on ``inputs``, in seconds.

    The models run in alternation, one forward each per round, so that a change in machine load
    (shared CPUs) hits them all alike; the minimum is the least disturbed measurement, which keeps
    the ratio between models meaningful on a busy machine. ``threads`` (default: leave torch's
    setting) fixes the torch thread count for the measurement and restores it afterwards.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1.")
    if threads is not None and threads < 1:
        raise ValueError(f"threads={threads} must be >= 1 (or None to keep torch's setting).")
    times: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():
        model.eval()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        for round_ in range(warmup + repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(**inputs)
                if round_ >= warmup:
                    times[name].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return {name: min(values) for name, values in times.items()}
