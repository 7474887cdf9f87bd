"""``prepare_task_data``: a dataset, checked and tokenized for a task, with its collator and metric.

The CLI's job and the examples prepare data through it: the same dataset, seed and split give the
same examples whichever entry point prepared them. Errors say what to change (a column, a split, labels).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict

from .text_datasets import load_text_dataset, with_validation
from .tokenization import tokenize_classification, tokenize_lm

TEXT_COLUMNS = ("text", "sentence", "content", "review")  # tried in this order when no text column is named
LABEL_COLUMNS = ("label", "labels")


def find_column(dataset, wanted: str | None, candidates: tuple[str, ...], what: str) -> str:
    """The column to use for ``what``: ``wanted`` if given, else the first of ``candidates`` present.

    Raises a ``ValueError`` naming the columns the dataset has and the option to set.
    """
    columns = dataset.column_names
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"the dataset has no {what} column {wanted!r}; its columns are {columns}.")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    raise ValueError(f"the dataset has no {what} column (looked for {list(candidates)}); its columns are {columns}.")


class TaskData(TypedDict):
    """What ``prepare_task_data`` returns: everything a Trainer and ``evaluate_model`` need.

    ``train`` / ``report``: tokenized training and evaluation examples (``report`` comes from the
    ``eval_split`` split and is what metrics are reported on); ``collator`` batches their rows;
    ``metric`` is the task's metric name (``hf_flop.metrics.TASK_METRICS``); ``num_labels`` and
    ``label_names`` describe the classes (``None`` for ``"causal-lm"``).
    """

    train: Any
    report: Any
    eval_split: str
    collator: Callable
    metric: str
    num_labels: int | None
    label_names: list[str] | None


def _subset(dataset, n: int, seed: int):
    """A seeded random ``n`` rows of ``dataset``; all of it when ``n`` is 0 or not smaller."""
    return dataset if not n or n >= len(dataset) else dataset.shuffle(seed=seed).select(range(n))


def prepare_task_data(
    dataset,
    tokenizer,
    *,
    task: str,
    max_length: int,
    text_column: str | None = None,
    label_column: str | None = None,
    eval_split: str | None = None,
    train_samples: int = 0,
    eval_samples: int = 0,
    seed: int = 0,
    data_dir: str | Path | None = None,
    dataset_config: str | None = None,
) -> TaskData:
    """Tokenized training and evaluation sets for ``task``, with their collator and metric; checks the data.

    Args:
        dataset: a ``DatasetDict``, or a name for ``load_text_dataset`` (with ``dataset_config``,
            ``data_dir``). A ``validation`` split is carved from ``train`` when there is none.
        task: ``"seq-cls"`` (rows truncated to ``max_length`` tokens) or ``"causal-lm"`` (the text cut
            into ``max_length``-token blocks).
        text_column, label_column: default to the first of ``TEXT_COLUMNS`` / ``LABEL_COLUMNS`` present.
        eval_split: the split metrics are reported on. Default: ``test``, unless it is missing or (for
            ``"seq-cls"``) unlabelled (labels -1, as in GLUE), then ``validation``.
        train_samples, eval_samples: seeded random subsets (of rows, or of blocks); 0 = all.

    Raises ``ValueError`` saying what to change: a missing column or split, labels that are not
    class ids ``0..n-1`` or a single class, or no examples left.
    """
    from transformers import DataCollatorWithPadding, default_data_collator

    from ...metrics import task_metric

    metric = task_metric(task)
    if isinstance(dataset, (str, os.PathLike)):
        dataset = load_text_dataset(os.fspath(dataset), dataset_config, data_dir=data_dir)
    raw = with_validation(dataset, seed=seed)
    train = raw["train"]
    text_col = find_column(train, text_column, TEXT_COLUMNS, "text")
    split = eval_split or ("test" if "test" in raw else "validation")
    if split not in raw:
        raise ValueError(f"the dataset has no split {split!r}; it has {sorted(raw)}.")
    if task == "seq-cls":
        label_col = find_column(train, label_column, LABEL_COLUMNS, "label")
        names = getattr(train.features[label_col], "names", None)
        labels = sorted(set(train[label_col]))
        num_labels = len(names) if names else len(labels)
        if eval_split is None and split == "test" and min(raw["test"][label_col]) < 0:
            split = "validation"  # GLUE-style unlabelled test split (labels -1)
        if any(not isinstance(v, int) or v < 0 or v >= num_labels for v in labels):
            raise ValueError(
                f"label column {label_col!r} must hold class ids 0..n-1 (found {labels[:5]}...); "
                "map labels to integers first or pick another label column."
            )
        if num_labels < 2:
            raise ValueError(f"label column {label_col!r} has a single class; classification needs two or more.")

        def prepare(part, n):
            part = _subset(part, n, seed)
            return tokenize_classification(
                part, tokenizer, text_column=text_col, label_column=label_col, max_length=max_length
            )

        collator, classes = DataCollatorWithPadding(tokenizer), {"num_labels": num_labels, "label_names": names}
    else:

        def prepare(part, n):
            return _subset(tokenize_lm(part, tokenizer, text_column=text_col, block_size=max_length), n, seed)

        collator, classes = default_data_collator, {"num_labels": None, "label_names": None}
    train_set, report_set = prepare(train, train_samples), prepare(raw[split], eval_samples)
    if len(train_set) == 0 or len(report_set) == 0:
        raise ValueError("the dataset yields no training or evaluation examples with these settings.")
    return TaskData(train=train_set, report=report_set, eval_split=split, collator=collator, metric=metric, **classes)
