"""The examples and the CLI prepare data through the one shared function, and the examples' command lines run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from test_cli import _save_tiny, _tiny_sizes
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import hf_flop_cli as cli
from hf_flop.app import data

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
QUICK = ["--max_steps", "2", "--per_device_train_batch_size", "8", "--report_to", "none", "--save_strategy", "no"]
QUICK += ["--disable_tqdm", "true", "--seed", "0"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny random BERT classifier and Llama (MiniLM tokenizer), a sentiment csv and a text file."""
    tokenizer = AutoTokenizer.from_pretrained(data.minilm_path())
    root = tmp_path_factory.mktemp("examples")
    sizes = _tiny_sizes(tokenizer)
    cls = _save_tiny(root / "cls", BertForSequenceClassification, BertConfig(**sizes), tokenizer)
    lm_config = LlamaConfig(**sizes, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id)
    lm = _save_tiny(root / "lm", LlamaForCausalLM, lm_config, tokenizer)
    csv = root / "sentiment.csv"
    csv.write_text(
        "sentence,label\n" + "\n".join(f"the film was {'good' if i % 2 else 'bad'},{i % 2}" for i in range(60))
    )
    text = root / "corpus.txt"
    text.write_text("\n".join(f"the cat number {i % 7} sat on the mat near dog {i % 5}" for i in range(200)))
    return {"cls": cls, "lm": lm, "csv": csv, "text": text}


@pytest.fixture
def prepared(monkeypatch) -> list:
    """Records every ``prepare_task_data`` result (the examples bind the name when they are loaded)."""
    calls = []
    real = data.prepare_task_data

    def spy(*args, **kwargs):
        calls.append(real(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(data, "prepare_task_data", spy)
    return calls


def _example(name: str, monkeypatch):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def test_text_classification_example_shares_the_cli_data(tmp_path, folders, prepared, capsys, monkeypatch):
    model, csv = str(folders["cls"]), str(folders["csv"])
    example = _example("text_classification", monkeypatch)
    argv = ["--model_name_or_path", model, "--dataset", csv, "--max_length", "16", "--target_sparsity", "0.3"]
    results = example.main([*argv, "--output_dir", str(tmp_path / "example"), *QUICK])
    assert 0.0 <= results["eval_accuracy"] <= 1.0
    assert (tmp_path / "example" / "final" / "config.json").is_file()

    out = tmp_path / "cli"
    code = cli.main(["prune", "--model", model, "--dataset", csv, "--output-dir", str(out), "--max-length", "16"])
    assert code == 0, capsys.readouterr().err
    from_example, from_cli = prepared
    # the same dataset, seed and split give the same examples, whichever entry point prepared them
    assert from_example["eval_split"] == from_cli["eval_split"] == "validation"
    for split in ("train", "report"):
        assert from_example[split]["input_ids"] == from_cli[split]["input_ids"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_examples"] == len(from_cli["train"]) and summary["eval_examples"] == len(from_cli["report"])


def test_causal_lm_example_runs_on_shared_data(tmp_path, folders, prepared, monkeypatch):
    example = _example("causal_lm_ptb", monkeypatch)
    argv = ["--model_name_or_path", str(folders["lm"]), "--dataset", str(folders["text"]), "--block_size", "16"]
    argv += ["--max_eval_samples", "4", "--output_dir", str(tmp_path / "example"), *QUICK]
    perplexity = example.main(argv)
    assert 1.0 < perplexity["dense"] and 1.0 < perplexity["pruned"]
    (used,) = prepared
    assert used["metric"] == "perplexity" and len(used["report"]) == 4
    assert (tmp_path / "example" / "final" / "config.json").is_file()


def test_example_data_errors_are_clear(tmp_path, folders, monkeypatch):
    example = _example("text_classification", monkeypatch)
    argv = ["--model_name_or_path", str(folders["cls"]), "--dataset", str(folders["csv"]), "--label_column", "y"]
    with pytest.raises(ValueError, match="no label column 'y'"):
        example.main([*argv, "--output_dir", str(tmp_path / "x"), *QUICK])
