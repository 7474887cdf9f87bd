"""A ``DatasetDict`` from a name: an embedded default, a local folder or file, or a Hub id; and its validation split."""

from __future__ import annotations

from pathlib import Path

from .embedded import load_ptb, load_sentiment

_DATA_FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_DATA_FILE_BUILDERS[".txt"] = "text"


def load_text_dataset(name_or_path: str, config_name: str | None = None, *, data_dir: str | Path | None = None):
    """A ``DatasetDict`` from a default name (``embedded.DATASETS``), a local folder or file, or a Hub id.

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
