"""EleutherAI's lm-evaluation-harness on several causal LMs (dense and pruned) with pinned settings, one JSON.

``lm-eval`` is an optional extra (``pip install "hf_flop[eval]"``), imported only when ``evaluate_lm`` runs.
The bundled task ``hf_flop_next_sentence`` (``data/lm_eval_tasks``) needs no Hub access; Hub tasks such as
``piqa`` or ``hellaswag`` run for users who can download their data sets.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..files import write_json_atomic

TASKS_DIR = Path(__file__).parent / "data" / "lm_eval_tasks"
INSTALL_HINT = 'lm-eval is not installed; install it with pip install "hf_flop[eval]" (or pip install lm-eval).'


def _import_lm_eval():
    """``lm_eval`` and its ``HFLM`` and ``TaskManager``, or an ``ImportError`` naming the extra to install."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return lm_eval, HFLM, TaskManager


def _bundled_task(name: str) -> dict[str, Any] | None:
    """The bundled task ``name`` as a config dict with its JSONL's absolute path, or ``None`` if not bundled."""
    import yaml

    path = TASKS_DIR / f"{name}.yaml"
    if not path.is_file():
        return None
    config = yaml.safe_load(path.read_text())
    files = config["dataset_kwargs"]["data_files"]
    # lm-eval hands data_files to datasets, which resolves them from the working folder: make them absolute
    config["dataset_kwargs"]["data_files"] = {split: str(TASKS_DIR / file) for split, file in files.items()}
    return config


def _check(models: dict, tasks: list[str], batch_size: int, num_fewshot: int) -> None:
    """Refuse bad arguments before any model is loaded."""
    if not isinstance(models, dict) or not models:
        raise ValueError("models must be a non-empty dict of name -> model folder or PreTrainedModel.")
    for name, model in models.items():
        if isinstance(model, (str, os.PathLike)) and not Path(model).is_dir():
            raise ValueError(f"model {name!r}: {model} is not a folder; pass a saved model folder (no Hub ids).")
    if not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f"tasks must be a non-empty list of task names, got {tasks!r}.")
    if batch_size < 1 or num_fewshot < 0:
        raise ValueError(f"batch_size must be >= 1 and num_fewshot >= 0, got {batch_size} and {num_fewshot}.")


def evaluate_lm(
    models: dict[str, Any],
    tasks: list[str],
    output: str | os.PathLike,
    *,
    num_fewshot: int = 0,
    batch_size: int = 8,
    seed: int = 0,
    limit: int | float | None = None,
    include_path: str | os.PathLike | None = None,
    tokenizer: Any = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Run lm-eval's ``tasks`` on each of ``models`` (name -> folder or ``PreTrainedModel``); write one JSON.

    Every model gets the same pinned settings (few-shot count, batch size, seed for Python, NumPy, torch
    and few-shot sampling, ``limit`` documents per task). ``tokenizer`` (object or folder) is needed for
    in-memory models; a folder model uses its own tokenizer unless one is given. ``include_path`` adds
    a folder of task YAMLs. ``device`` defaults to ``cuda`` when available, else ``cpu``. The JSON, written atomically to ``output``, holds ``settings`` (with
    ``lm_eval_version``) and ``results``: model name -> task -> metric -> value. Returns the same dict.
    """
    _check(models, tasks, batch_size, num_fewshot)
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    resolved: list[str | dict] = []
    for task in tasks:
        bundled = _bundled_task(task)
        if bundled is not None:
            resolved.append(bundled)
        elif task in manager.all_tasks:
            resolved.append(task)
        else:
            raise ValueError(
                f"unknown lm-eval task {task!r}; use hf_flop_next_sentence (bundled), a task lm-eval lists "
                "(lm-eval ls tasks), or a YAML folder passed as include_path."
            )
    settings = {
        "tasks": list(tasks),
        "num_fewshot": num_fewshot,
        "batch_size": batch_size,
        "seed": seed,
        "limit": limit,
        "lm_eval_version": lm_eval.__version__,
    }
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    settings["device"] = device
    results: dict[str, dict] = {}
    for name, model in models.items():
        pretrained = str(model) if isinstance(model, (str, os.PathLike)) else model
        lm = HFLM(pretrained=pretrained, tokenizer=tokenizer, batch_size=batch_size, device=device)
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=resolved,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            limit=limit,
            task_manager=manager,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            log_samples=False,
        )
        results[name] = {
            task: {metric: value for metric, value in metrics.items() if metric != "alias"}
            for task, metrics in out["results"].items()
        }
    report = {"settings": settings, "results": results}
    write_json_atomic(output, report)
    return report
