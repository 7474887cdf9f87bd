"""Offline evaluation: ``evaluate`` metrics shipped with hf_flop (never fetched from the Hub).

``load("accuracy")`` / ``load("perplexity")`` go through ``evaluate.load`` with the path of a
module file in this folder, so they behave like any ``evaluate`` metric (``add_batch``,
``compute``, distributed ``process_id``/``num_process``) while working with no network.
``evaluate_model`` and ``cpu_latency`` (in ``evaluation``) are the loops the CLI, the examples
and the benchmarks share; ``evaluate_onnx`` / ``onnx_latency`` (``onnx_runtime``) and ``gguf_perplexity`` /
``gguf_speed`` (``gguf_runtime``, through llama-cpp-python) measure exported files the same way.
"""

from __future__ import annotations

from .evaluation import cpu_latency, evaluate_model
from .gguf_runtime import gguf_perplexity, gguf_speed, llama_cpp_missing
from .loading import METRICS, TASK_METRICS, TASKS, load, metric_path, task_metric
from .onnx_runtime import evaluate_onnx, onnx_latency

__all__ = [
    "METRICS",
    "TASKS",
    "TASK_METRICS",
    "cpu_latency",
    "evaluate_model",
    "evaluate_onnx",
    "gguf_perplexity",
    "gguf_speed",
    "llama_cpp_missing",
    "load",
    "metric_path",
    "onnx_latency",
    "task_metric",
]
