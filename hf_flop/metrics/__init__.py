"""Offline evaluation: ``evaluate`` metrics shipped with hf_flop (never fetched from the Hub).

``load("accuracy")`` / ``load("perplexity")`` go through ``evaluate.load`` with the path of a
module file in this folder, so they behave like any ``evaluate`` metric (``add_batch``,
``compute``, distributed ``process_id``/``num_process``) while working with no network.
``evaluate_model`` and ``cpu_latency`` (in ``evaluation``) are the loops the CLI, the examples
and the benchmarks share.
"""

from __future__ import annotations

from .evaluation import cpu_latency, evaluate_model
from .loading import METRICS, TASK_METRICS, TASKS, load, metric_path, task_metric

__all__ = [
    "METRICS",
    "TASKS",
    "TASK_METRICS",
    "cpu_latency",
    "evaluate_model",
    "load",
    "metric_path",
    "task_metric",
]
