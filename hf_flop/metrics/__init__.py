"""Offline evaluation: ``evaluate`` metrics shipped with hf_flop (never fetched from the Hub).

``load("accuracy")`` / ``load("perplexity")`` go through ``evaluate.load`` with the path of a
module file in this folder, so they behave like any ``evaluate`` metric (``add_batch``,
``compute``, distributed ``process_id``/``num_process``) while working with no network.
``evaluate_model`` and ``cpu_latency`` (in ``evaluation``) are the loops the CLI, the examples
and the benchmarks share.
"""

from __future__ import annotations

from pathlib import Path

from .evaluation import TASKS, cpu_latency, evaluate_model

METRICS = ("accuracy", "perplexity")


def metric_path(name: str) -> str:
    """Local path of a shipped metric module, usable as ``evaluate.load(metric_path(name))``."""
    if name not in METRICS:
        raise ValueError(f"unknown hf_flop metric {name!r}; shipped metrics are {list(METRICS)}.")
    return str(Path(__file__).with_name(f"{name}.py"))


def load(name: str, **kwargs):
    """``evaluate.load`` of a shipped metric (``"accuracy"`` or ``"perplexity"``), offline."""
    import evaluate

    return evaluate.load(metric_path(name), **kwargs)


__all__ = ["METRICS", "TASKS", "cpu_latency", "evaluate_model", "load", "metric_path"]
