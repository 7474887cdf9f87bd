"""The data ``hf-flop prune`` and the examples share: embedded defaults, models for a task, prepared datasets.

* ``embedded``: real models and text that work offline (``minilm_path``, ``smollm2_path``,
  ``load_sentiment``, ``load_ptb``), their short names (``MODELS``, ``DATASETS``) and where they come
  from (``MODEL_HUB_IDS``, ``DATASET_SOURCES``);
* ``models``: ``find_model`` / ``load_tokenizer`` / ``load_task_model`` load a model for a task;
* ``text_datasets``: ``load_text_dataset`` reads a default name, a local folder or file, or a Hub id,
  and ``with_validation`` gives it a validation split;
* ``tokenization``: ``tokenize_classification`` and ``tokenize_lm``;
* ``task_data``: ``prepare_task_data`` turns a dataset into tokenized training and evaluation sets with
  their collator and metric, checking columns, splits and labels.

Use the names from here (``from hf_flop.app.data import prepare_task_data``): the job looks them up here
when it runs, so one patched name (a test's spy) is seen by every entry point.
"""

from __future__ import annotations

from .embedded import (
    DATASET_SOURCES,
    DATASETS,
    MODEL_HUB_IDS,
    MODELS,
    SETUP_COMMAND,
    VADER_SDIST,
    MissingResourceError,
    cache_dir,
    load_ptb,
    load_sentiment,
    minilm_path,
    read_sentiment_rows,
    resolve_model,
    smollm2_gguf,
    smollm2_path,
    source_gguf,
)
from .embedded import _vader_sdist as _vader_sdist  # where the sentiment sdist is: tests skip without it
from .models import find_model, load_task_model, load_tokenizer
from .task_data import LABEL_COLUMNS, TEXT_COLUMNS, TaskData, find_column, prepare_task_data
from .text_datasets import load_text_dataset, with_validation
from .tokenization import tokenize_classification, tokenize_lm

__all__ = [
    "DATASETS",
    "DATASET_SOURCES",
    "LABEL_COLUMNS",
    "MODELS",
    "MODEL_HUB_IDS",
    "SETUP_COMMAND",
    "TEXT_COLUMNS",
    "VADER_SDIST",
    "MissingResourceError",
    "TaskData",
    "cache_dir",
    "find_column",
    "find_model",
    "load_ptb",
    "load_sentiment",
    "load_task_model",
    "load_text_dataset",
    "load_tokenizer",
    "minilm_path",
    "prepare_task_data",
    "read_sentiment_rows",
    "resolve_model",
    "smollm2_gguf",
    "smollm2_path",
    "source_gguf",
    "tokenize_classification",
    "tokenize_lm",
    "with_validation",
]
