"""hf_flop.app.evaluate_lm: lm-eval's harness on the bundled local task, one JSON per run; clear errors."""

from __future__ import annotations

import json
import sys

import pytest

from hf_flop.app.lm_eval_run import evaluate_lm
from tests.tiny_models import tiny_bpe_tokenizer, tiny_llama


@pytest.fixture
def model_dir(tmp_path):
    """A tiny random Llama saved with a tokenizer, as a user's model folder."""
    folder = tmp_path / "dense"
    tiny_llama().save_pretrained(folder)
    tiny_bpe_tokenizer().save_pretrained(folder)
    return folder


def test_local_task_writes_metrics_settings_and_version(model_dir, tmp_path):
    pytest.importorskip("lm_eval")
    import lm_eval

    output = tmp_path / "eval.json"
    models = {"dense": model_dir, "in_memory": tiny_llama()}
    evaluate_lm(
        models, ["hf_flop_next_sentence"], output, limit=4, batch_size=2, seed=1, tokenizer=tiny_bpe_tokenizer()
    )
    report = json.loads(output.read_text())
    assert report["settings"]["lm_eval_version"] == lm_eval.__version__
    assert report["settings"]["seed"] == 1 and report["settings"]["limit"] == 4
    for name in models:
        accuracy = report["results"][name]["hf_flop_next_sentence"]["acc,none"]
        assert 0.0 <= accuracy <= 1.0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".eval.json")]  # no temporary file left


def test_unknown_task_is_refused(model_dir, tmp_path):
    pytest.importorskip("lm_eval")
    with pytest.raises(ValueError, match="unknown lm-eval task 'no_such_task'"):
        evaluate_lm({"dense": model_dir}, ["no_such_task"], tmp_path / "eval.json")
    assert not (tmp_path / "eval.json").exists()


def test_missing_lm_eval_names_the_extra(model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval then raises ImportError
    with pytest.raises(ImportError, match=r'pip install "hf_flop\[eval\]"'):
        evaluate_lm({"dense": model_dir}, ["hf_flop_next_sentence"], tmp_path / "eval.json")


def test_missing_model_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        evaluate_lm({"dense": tmp_path / "nowhere"}, ["hf_flop_next_sentence"], tmp_path / "eval.json")


def test_card_table_from_results_json(tmp_path):
    from hf_flop.app.eval_card import add_eval_table

    report = {
        "settings": {"lm_eval_version": "0.4.13", "num_fewshot": 0, "batch_size": 8, "seed": 0, "limit": None},
        "results": {
            "dense": {"piqa": {"acc,none": 0.7, "acc_stderr,none": 0.01}},
            "pruned": {"piqa": {"acc,none": 0.65, "acc_stderr,none": 0.01}},
        },
    }
    (tmp_path / "eval.json").write_text(json.dumps(report))
    card = tmp_path / "README.md"
    card.write_text("# model\n")
    add_eval_table(card, tmp_path / "eval.json")
    add_eval_table(card, tmp_path / "eval.json")  # a re-run replaces the table
    text = card.read_text()
    assert "| piqa | acc | 0.7000 | 0.6500 |" in text and text.count("## lm-evaluation-harness") == 1
    assert "stderr" not in text and text.startswith("# model\n")


def test_cli_eval_runs_the_local_task(model_dir, tmp_path):
    pytest.importorskip("lm_eval")
    from hf_flop_cli import main

    (model_dir / "README.md").write_text("# pruned\n")
    output = tmp_path / "cli.json"
    argv = ["eval", "--dense", str(model_dir), "--model", str(model_dir), "--tasks", "hf_flop_next_sentence"]
    main([*argv, "--output", str(output), "--limit", "2", "--batch-size", "2", "--card", str(model_dir / "README.md")])
    assert set(json.loads(output.read_text())["results"]) == {"dense", "pruned"}
    assert "| hf_flop_next_sentence | acc |" in (model_dir / "README.md").read_text()


def test_cli_parses_eval_options():
    from hf_flop_cli.parser import build_parser

    args = build_parser().parse_args(
        ["eval", "--model", "a", "--model", "b", "--tasks", "piqa,boolq", "--output", "r.json", "--num-fewshot", "5"]
        + ["--batch-size", "4", "--seed", "3", "--limit", "10", "--include-path", "tasks"]
    )
    assert (args.command, args.model, args.tasks, args.output) == ("eval", ["a", "b"], "piqa,boolq", "r.json")
    assert (args.num_fewshot, args.batch_size, args.seed, args.limit, args.include_path) == (5, 4, 3, 10, "tasks")


def test_cli_eval_one_model_is_reported_as_pruned(model_dir, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    from hf_flop_cli import main

    output = tmp_path / "eval.json"
    argv = ["eval", "--model", str(model_dir), "--tasks", "hf_flop_next_sentence", "--output", str(output)]
    assert main([*argv, "--limit", "2", "--batch-size", "2"]) == 0
    report = json.loads(output.read_text())
    assert report["settings"]["limit"] == 2 and len(report["results"]) == 1


def test_cli_eval_unknown_task_is_a_one_line_error(model_dir, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    from hf_flop_cli import main

    argv = ["eval", "--model", str(model_dir), "--tasks", "nope", "--output", str(tmp_path / "e.json")]
    assert main(argv) == 2
    assert "unknown lm-eval task 'nope'" in capsys.readouterr().err
