"""The shipped metrics and which one each task reports; loading them offline through ``evaluate``.

A module of its own so that ``evaluation`` and the package ``__init__`` both import from here
(no import cycle between them). Torch-free.
"""

from __future__ import annotations

from pathlib import Path

METRICS = ("accuracy", "perplexity")
# the metric each task is judged by: evaluate_model computes it, the CLI and the examples report it
TASK_METRICS = {"seq-cls": "accuracy", "causal-lm": "perplexity"}
TASKS = tuple(TASK_METRICS)


def metric_path(name: str) -> str:
    """Local path of a shipped metric module, usable as ``evaluate.load(metric_path(name))``."""
    if name not in METRICS:
        raise ValueError(f"unknown hf_flop metric {name!r}; shipped metrics are {list(METRICS)}.")
    return str(Path(__file__).with_name(f"{name}.py"))


def load(name: str, **kwargs):
    """``evaluate.load`` of a shipped metric (``"accuracy"`` or ``"perplexity"``), offline."""
    import evaluate

    return evaluate.load(metric_path(name), **kwargs)


def task_metric(task: str) -> str:
    """The metric name ``task`` reports (``TASK_METRICS``); a ``ValueError`` names the valid tasks."""
    if task not in TASK_METRICS:
        raise ValueError(f"task={task!r} is not valid; use one of {list(TASKS)}.")
    return TASK_METRICS[task]
