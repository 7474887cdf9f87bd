"""The `hf-flop` command line: help, one-line errors, and the prune job end to end on tiny models."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForSequenceClassification,
)

import hf_flop_cli as cli
from hf_flop.app import data
from hf_flop.app import job as prune_job

POSITIVE = ["good", "great", "fine", "lovely", "superb"]
NEGATIVE = ["bad", "awful", "poor", "dull", "weak"]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(data.minilm_path())


def _save_tiny(folder, model_class, config, tokenizer):
    torch.manual_seed(0)
    model_class(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _tiny_sizes(tokenizer) -> dict:
    return dict(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )


@pytest.fixture(scope="module")
def tiny_cls_dir(tmp_path_factory, tokenizer):
    """A tiny random BERT classifier with the (real, local) MiniLM tokenizer."""
    config = BertConfig(**_tiny_sizes(tokenizer))
    return _save_tiny(tmp_path_factory.mktemp("tiny_cls"), BertForSequenceClassification, config, tokenizer)


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama with grouped-query attention and the MiniLM tokenizer."""
    config = LlamaConfig(**_tiny_sizes(tokenizer), num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id)
    return _save_tiny(tmp_path_factory.mktemp("tiny_lm"), LlamaForCausalLM, config, tokenizer)


@pytest.fixture(scope="module")
def tiny_opt_dir(tmp_path_factory, tokenizer):
    """A tiny random OPT classifier: an architecture hf_flop has no layout (ArchSpec) for."""
    sizes = _tiny_sizes(tokenizer)
    config = OPTConfig(
        vocab_size=sizes["vocab_size"],
        hidden_size=32,
        word_embed_proj_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=64,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _save_tiny(tmp_path_factory.mktemp("tiny_opt"), OPTForSequenceClassification, config, tokenizer)


@pytest.fixture(scope="module")
def sentiment_csv(tmp_path_factory):
    """A small learnable sentiment set: the label is the polarity of the adjectives."""
    folder = tmp_path_factory.mktemp("csv")
    lines = ["sentence,label"]
    for i in range(80):
        words = POSITIVE if i % 2 else NEGATIVE
        lines.append(f"the film was {words[i % 5]} and {words[(i // 2) % 5]},{i % 2}")
    path = folder / "sentiment.csv"
    path.write_text("\n".join(lines) + "\n")
    no_label = folder / "no_label.csv"
    no_label.write_text("sentence,score\nnice film,1.5\nbad film,-2.0\n")
    return path, no_label


def _run(argv, capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_no_subcommand_prints_help(capsys):
    code, out, _ = _run([], capsys)
    assert code == 0 and "prune" in out and "report" in out


def test_prune_help_documents_every_option(capsys):
    parser = cli.build_parser()
    prune = parser._subparsers._group_actions[0].choices["prune"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["prune", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    options = [opt for action in prune._actions for opt in action.option_strings if opt.startswith("--")]
    assert len(options) >= 25
    for action in prune._actions:
        assert action.help, f"{action.option_strings} has no help"
    for option in options:
        assert option in text, f"{option} missing from --help"


def _one_line_error(code: int, err: str, fragment: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and fragment in lines[0], err


ROOT = Path(__file__).resolve().parent.parent
# what the console script pip writes does (import the entry point, call it), then which heavy modules it loaded
_AS_CONSOLE_SCRIPT = """
import sys
from {module} import {function} as main
try:
    sys.exit(main())
finally:
    print("heavy modules:", [m for m in ("hf_flop", "torch", "transformers", "peft") if m in sys.modules], file=sys.stderr)
"""


def _run_console_script(argv: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """pyproject.toml's ``hf-flop`` entry point run on ``argv`` in a fresh interpreter: the run and its wall time.

    From the checkout (cwd), so it is this tree's code even where the installed package predates it.
    """
    entry = re.search(r'^hf-flop\s*=\s*"([\w.]+):(\w+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    code = _AS_CONSOLE_SCRIPT.format(module=entry.group(1), function=entry.group(2))
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT, timeout=300)
    return run, time.perf_counter() - start


@pytest.mark.parametrize(
    "argv, shown",
    [(["--help"], ["prune", "report", "--debug"]), (["prune", "--help"], ["--target", "--threads", "hard_concrete"])],
)
def test_help_answers_in_under_2_s_without_loading_torch(argv, shown):
    """Issue 15: hf_flop (whose import loads torch, transformers and peft) is imported only to run a command.

    The module check is the exact statement; the 2 s bound is the user's view, on the best of 3 runs so that a
    busy machine does not fail it (it took 9-20 s when the console script imported hf_flop before parsing).
    """
    runs = [_run_console_script(argv) for _ in range(3)]
    for run, _ in runs:
        assert run.returncode == 0, run.stderr
        assert "heavy modules: []" in run.stderr, run.stderr
        assert all(text in run.stdout for text in shown), run.stdout
    assert min(seconds for _, seconds in runs) < 2.0, [round(seconds, 2) for _, seconds in runs]


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["prune", "--target", "half"], "is not a number"),
        (["prune", "--max-steps", "0"], "must be > 0"),
        (["report", "--gate", "topq"], "invalid choice"),
        (["prune", "--push-to-hub"], "--repo-id"),
    ],
)
def test_option_errors_answer_without_loading_torch(argv, fragment):
    """Errors that need nothing from hf_flop come before its import. (FlopConfig's value checks, e.g. of
    ``--target 2``, come after it: they are FlopConfig's alone, see test_flop_config_errors_name_the_option.)"""
    run, _ = _run_console_script(argv)
    _one_line_error(run.returncode, run.stderr.replace("heavy modules: []", ""), fragment)
    assert "heavy modules: []" in run.stderr, run.stderr


@pytest.mark.parametrize("module", ["hf_flop_cli", "hf_flop"])
def test_python_m_runs_the_command_line(module):
    """``python -m hf_flop`` still works; it imports hf_flop first, so it is the slow way in."""
    command = [sys.executable, "-m", module, "--help"]
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0 and "prune" in run.stdout, run.stderr


def test_every_task_of_the_command_line_has_a_metric():
    from hf_flop import metrics

    assert tuple(cli.TASK_DEFAULTS) == metrics.TASKS


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--target", "1.2"], "outside [0, 1)"),
        (["--target", "half"], "is not a number"),
        (["--levels", "rank,bogus"], "comma-separated subset"),
        (["--max-steps", "0"], "must be > 0"),
        (["--task", "qa"], "invalid choice"),
        (["--push-to-hub"], "--repo-id"),
        (["--pruning-phase", "1.5"], "must be in [0, 1]"),
        (["--oneshot-score", "gradient"], "invalid choice"),
        (["--hidden-distillation", "1", "--no-distill"], "--hidden-distillation distils from the dense model"),
        (["--recovery-lora-rank", "0"], "must be > 0"),
        (["--recovery-lora-rank", "four"], "is not a int"),
        (["--recovery-lora-rank", "4", "--pruning-phase", "0.5"], "which only --pruning-phase 0 has (now 0.5)"),
        (["--recovery-lora-rank", "4", "--levels", "rank,row"], "(--levels has rank)"),
        (["--model", "/no/such/model/dir"], "model path /no/such/model/dir does not exist"),
        (["--model", "nobody-xyz/no-such-model"], "cannot load model 'nobody-xyz/no-such-model'"),
    ],
)
def test_bad_options_give_one_line_errors(argv, fragment, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:  # argparse errors exit; later checks return 2
        code = cli.main(["prune", *argv, "--output-dir", str(tmp_path / "out")])
        raise SystemExit(code)
    _one_line_error(exit_info.value.code, capsys.readouterr().err, fragment)


def test_bad_data_gives_one_line_errors(capsys, tmp_path, tiny_cls_dir, sentiment_csv):
    csv, no_label = sentiment_csv
    base = ["prune", "--model", str(tiny_cls_dir), "--output-dir", str(tmp_path / "out")]
    code, _, err = _run([*base, "--dataset", str(no_label)], capsys)
    _one_line_error(code, err, "no label column")
    code, _, err = _run([*base, "--dataset", str(csv), "--text-column", "body"], capsys)
    _one_line_error(code, err, "no text column 'body'")
    code, _, err = _run([*base, "--dataset", "rt-sentiment", "--data-dir", str(tmp_path)], capsys)
    _one_line_error(code, err, "bash scripts/setup.sh")
    code, _, err = _run([*base, "--dataset", str(tmp_path / "missing.csv")], capsys)
    _one_line_error(code, err, "does not exist")
    (tmp_path / "empty_model").mkdir()
    code, _, err = _run(["prune", "--model", str(tmp_path / "empty_model")], capsys)
    _one_line_error(code, err, "no config.json")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    code, _, err = _run([*base[:3], "--output-dir", str(full)], capsys)
    _one_line_error(code, err, "not empty")
    assert (full / "keep.txt").read_text() == "x"


def test_prune_seq_cls_end_to_end(capsys, tmp_path, tiny_cls_dir, sentiment_csv):
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

    from hf_flop.metrics import evaluate_model

    out = tmp_path / "run"
    argv = ["prune", "--model", str(tiny_cls_dir), "--dataset", str(sentiment_csv[0]), "--output-dir", str(out)]
    argv += ["--max-steps", "4", "--dense-epochs", "1", "--max-length", "16", "--eval-samples", "16"]
    argv += ["--levels", "rank,head,row", "--gate-learning-rate", "0.5", "--target", "0.3"]
    code, stdout, err = _run(argv, capsys)
    assert code == 0, err
    assert "accuracy" in stdout and "CPU latency, batch 32" in stdout
    summary = json.loads((out / "summary.json").read_text())
    # a single-split csv: 10% (8 rows) is carved out for validation, which is then the report split
    assert summary["results"]["metric"] == "accuracy" and summary["results"]["eval_split"] == "validation"
    assert summary["train_examples"] == 72 and summary["eval_examples"] == 8
    params = summary["params"]
    assert params["prunable_kept"] <= params["prunable"]
    assert any("expected_sparsity" in e for e in summary["log_history"])
    for name in ("sparsity.png", "kept.png"):
        assert (out / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    card = (out / "model" / "README.md").read_text()
    assert f"# {tiny_cls_dir.name}-flop-30" in card and "accuracy" in card
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers

    # the saved model is what was evaluated: same accuracy on the same examples, same size
    saved = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert sum(p.numel() for p in saved.parameters()) == params["pruned_total"]
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    args = cli.build_parser().parse_args(argv)
    cli._fill_task_defaults(args)
    report = prune_job.prepare_data(args, tokenizer)["report"]
    again = evaluate_model(saved, report, task="seq-cls", collator=DataCollatorWithPadding(tokenizer))
    assert again["accuracy"] == pytest.approx(summary["results"]["pruned"])

    code, _, err = _run(argv, capsys)  # the output folder now exists
    _one_line_error(code, err, "not empty")


@pytest.mark.parametrize("uniform", [False, True], ids=["per-layer", "uniform-shapes"])
def test_prune_causal_lm_end_to_end(capsys, tmp_path, tiny_lm_dir, uniform):
    """--uniform-shapes: every layer keeps the same KV groups and FFN width, so the saved model is the
    stock LlamaForCausalLM (no remote code); without it the per-layer shapes need hf_flop's class."""
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"the cat number {i % 7} sat on the mat near dog {i % 5}" for i in range(300)))
    out = tmp_path / "run"
    argv = ["prune", "--task", "causal-lm", "--model", str(tiny_lm_dir), "--dataset", str(text)]
    argv += ["--output-dir", str(out), "--max-steps", "3", "--max-length", "16", "--no-plots", "--no-distill"]
    code, stdout, err = _run(argv + (["--uniform-shapes"] if uniform else []), capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    results = summary["results"]
    assert results["metric"] == "perplexity"
    for key in ("pretrained", "dense", "pruned"):
        assert 1.0 < results[key] < 2 * 30522
    assert results["pretrained"] == results["dense"]  # no dense fine-tune by default for causal-lm
    assert not (out / "plots").exists()
    saved = json.loads((out / "model" / "config.json").read_text())
    assert saved["architectures"] == (["LlamaForCausalLM"] if uniform else ["FlopLlamaForCausalLM"])
    assert ("auto_map" in saved) is not uniform
    # the default score: obs, but activation with uniform shapes (what measured better there)
    assert summary["settings"]["oneshot_score"] == ("activation" if uniform else "obs")


def test_prune_causal_lm_with_lora_recovery(capsys, tmp_path, tiny_lm_dir):
    """--recovery-lora-rank: the recovery steps train LoRA adapters, merged into the saved (plain) model."""
    from transformers import AutoModelForCausalLM

    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"the cat number {i % 7} sat on the mat near dog {i % 5}" for i in range(300)))
    out = tmp_path / "run"
    argv = ["prune", "--task", "causal-lm", "--model", str(tiny_lm_dir), "--dataset", str(text)]
    argv += ["--output-dir", str(out), "--max-steps", "3", "--max-length", "16", "--no-plots"]
    code, _, err = _run([*argv, "--recovery-lora-rank", "4"], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["recovery_lora_rank"] == 4
    assert "LoRA adapters (rank 4, alpha 8, on all-linear) merged after" in (out / "model" / "README.md").read_text()
    assert not (out / "model" / "adapter_config.json").exists()
    saved = AutoModelForCausalLM.from_pretrained(out / "model", trust_remote_code=True)
    assert not any("lora" in name for name in saved.state_dict())
    assert sum(p.numel() for p in saved.parameters()) == summary["params"]["pruned_total"]


def test_uniform_shapes_with_heads_on_bert_is_refused_with_the_remedy(
    capsys, tmp_path, tiny_cls_dir, sentiment_csv, no_training
):
    """BERT derives its head size from hidden size / heads: fewer uniform heads cannot be a stock config.
    Refused before the dense fine-tune."""
    out = tmp_path / "run"
    argv = ["prune", "--model", str(tiny_cls_dir), "--dataset", str(sentiment_csv[0]), "--output-dir", str(out)]
    code, _, err = _run([*argv, "--uniform-shapes", "--max-steps", "1"], capsys)
    _one_line_error(code, err, "levels=['row']")
    assert not out.exists()


def test_prune_with_one_shot_masks_and_recovery(capsys, tmp_path, tiny_cls_dir, sentiment_csv):
    """--pruning-phase 0: the masks are set one-shot on calibration batches before the first step, exactly at
    the target; every step recovers (with hidden-state distillation here); the card says so."""
    out = tmp_path / "run"
    argv = ["prune", "--model", str(tiny_cls_dir), "--dataset", str(sentiment_csv[0]), "--output-dir", str(out)]
    argv += ["--max-steps", "3", "--dense-epochs", "0", "--max-length", "16", "--eval-samples", "16", "--no-plots"]
    argv += ["--levels", "head,row", "--target", "0.4", "--pruning-phase", "0", "--calibration-batches", "3"]
    argv += ["--hidden-distillation", "0.5"]
    code, stdout, err = _run(argv, capsys)
    assert code == 0, err
    text = " ".join(stdout.split())  # the progress lines name the phase and leave out the idle multipliers
    assert "pruning (recovery) step" in text and "masks fixed at sparsity" in text and "λ1" not in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["target_check"]["met"]
    logs = [e for e in summary["log_history"] if "loss" in e]
    assert logs and all(e["phase"] == "recovery" for e in logs)
    assert all("hidden_distillation_loss" in e for e in logs)
    boundary = next(e for e in summary["log_history"] if "boundary_step" in e)
    assert boundary["boundary_step"] == 0 and boundary["boundary_reconstructed_modules"] > 0
    card = (out / "model" / "README.md").read_text()
    assert "one-shot: masks set at the target by obs scores" in card and "hidden-state MSE" in card


def test_prune_exports_onnx(capsys, tmp_path, tiny_cls_dir, sentiment_csv):
    """--export-onnx: model.onnx beside the model; ONNX Runtime runs it on the tokenizer's output as PyTorch does."""
    import numpy as np
    from transformers import AutoModelForSequenceClassification

    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "run"
    argv = ["prune", "--model", str(tiny_cls_dir), "--dataset", str(sentiment_csv[0]), "--output-dir", str(out)]
    argv += ["--levels", "head,row", "--max-steps", "2", "--dense-epochs", "0", "--max-length", "16"]
    argv += ["--eval-samples", "8", "--no-plots", "--export-onnx"]
    code, stdout, err = _run(argv, capsys)
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["onnx"] == "model.onnx"
    assert "model.onnx (ONNX)" in " ".join(stdout.split())

    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    texts = ["a good film", "the film was awful and dull, really"]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], dict(tokenizer(texts, padding=True, return_tensors="np")))
    saved = AutoModelForSequenceClassification.from_pretrained(out / "model")
    with torch.no_grad():
        expected = saved(**tokenizer(texts, padding=True, return_tensors="pt")).logits.numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


def test_export_onnx_packages_are_checked_before_training(capsys, tmp_path, tiny_cls_dir, sentiment_csv, no_training):
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "onnxscript" else real_find_spec(name, *args)

    argv = ["prune", "--model", str(tiny_cls_dir), "--dataset", str(sentiment_csv[0]), "--export-onnx"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(importlib.util, "find_spec", find_spec)
        code, _, err = _run([*argv, "--output-dir", str(tmp_path / "out")], capsys)
    _one_line_error(code, err, "--export-onnx needs onnxscript: pip install 'hf-flop[deploy]', or drop --export-onnx")
    assert not (tmp_path / "out").exists()


def test_report_prints_the_sparsity_table(capsys, tiny_cls_dir):
    code, out, err = _run(["report", "--model", str(tiny_cls_dir), "--levels", "rank,head"], capsys)
    assert code == 0, err
    assert "prunable params" in out and "attention.self.query" in out and "head" in out


@pytest.mark.slow
def test_default_job_with_tiny_settings(tmp_path):
    """The real console script on the embedded defaults (MiniLM, Rotten Tomatoes), shrunk to a few steps."""
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [os.path.join(os.path.dirname(sys.executable), "hf-flop"), "prune", "--output-dir", str(out)]
    cmd += ["--train-samples", "64", "--eval-samples", "64", "--dense-epochs", "1", "--max-steps", "4"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "minilm" and summary["params"]["prunable"] == 10_616_832
    assert 0.0 <= summary["results"]["dense"] <= 1.0 and summary["results"]["eval_split"] == "test"
    assert (out / "model" / "config.json").is_file() and (out / "plots" / "kept.png").is_file()
    helped = subprocess.run([sys.executable, "-m", "hf_flop", "--help"], capture_output=True, text=True, env=env)
    assert helped.returncode == 0 and "prune" in helped.stdout


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--round-to", "0"], "invalid --round-to (a positive integer): FlopConfig.round_to=0"),
        (["--levels", "rank,block"], "invalid --levels (a comma-separated subset of"),
        (["--levels", ","], "levels is empty"),
        (["--target", "-0.1"], "invalid --target (a number in [0, 1))"),
    ],
)
def test_flop_config_errors_name_the_option(argv, fragment, capsys, tmp_path):
    """FlopConfig checks the values (no second copy of its rules in the CLI); the error names the option."""
    for command in (["prune", "--output-dir", str(tmp_path / "out")], ["report"]):
        code, _, err = _run([*command, *argv], capsys)
        _one_line_error(code, err, fragment)
    assert not (tmp_path / "out").exists()


def test_threads_are_honoured_in_training_and_evaluation(capsys, tmp_path, tiny_cls_dir, sentiment_csv, monkeypatch):
    """--threads is the torch thread count inside every training step and evaluation, restored afterwards."""
    from hf_flop import metrics
    from hf_flop.trainer import PruningTrainer

    seen = {"step": set(), "eval": set()}
    compute_loss, evaluate_model = PruningTrainer.compute_loss, metrics.evaluate_model

    def recording_loss(self, *args, **kwargs):
        seen["step"].add(torch.get_num_threads())
        return compute_loss(self, *args, **kwargs)

    def recording_eval(*args, **kwargs):
        seen["eval"].add(torch.get_num_threads())
        return evaluate_model(*args, **kwargs)

    monkeypatch.setattr(PruningTrainer, "compute_loss", recording_loss)
    monkeypatch.setattr(metrics, "evaluate_model", recording_eval)
    before = torch.get_num_threads()
    argv = ["prune", "--model", str(tiny_cls_dir), "--dataset", str(sentiment_csv[0]), "--output-dir", str(tmp_path)]
    argv += ["--max-steps", "2", "--dense-epochs", "0", "--max-length", "16", "--eval-samples", "8", "--no-plots"]
    code, _, err = _run([*argv, "--threads", "3"], capsys)
    assert code == 0, err
    assert seen == {"step": {3}, "eval": {3}}
    assert torch.get_num_threads() == before  # the caller's setting is back
    assert json.loads((tmp_path / "summary.json").read_text())["machine"]["torch_threads"] == 3


def test_threads_default_honours_omp_num_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert cli.default_threads() == 5
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")
    assert cli.default_threads() == len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cli.default_threads() == len(os.sched_getaffinity(0))
    args = cli.build_parser().parse_args(["prune", "--threads", "2"])
    cli._fill_task_defaults(args)
    assert args.threads == 2


@pytest.fixture
def no_training(monkeypatch):
    """Any Trainer step fails the test: what is refused must be refused before training starts."""
    from transformers import Trainer

    def refuse(*args, **kwargs):
        raise AssertionError("a training step ran")

    monkeypatch.setattr(Trainer, "training_step", refuse)


def test_unsupported_architecture_is_refused_before_training(capsys, tmp_path, tiny_opt_dir, sentiment_csv, no_training):
    out = tmp_path / "out"
    base = ["prune", "--model", str(tiny_opt_dir), "--dataset", str(sentiment_csv[0]), "--output-dir", str(out)]
    start = time.perf_counter()
    code, _, err = _run([*base, "--levels", "head", "--dense-epochs", "1"], capsys)
    assert time.perf_counter() - start < 30  # loading a tiny model and a csv; no dense fine-tune
    _one_line_error(code, err, "hf_flop does not know the layout of model_type='opt'")
    # both conditions at once: a layout for head pruning, and --target-modules (which alone is not enough)
    assert "add an ArchSpec for 'opt'" in err and "with --target-modules alone does not make head pruning work" in err
    assert "(by suffix: fc1, fc2, k_proj, out_proj, q_proj, score, v_proj)" in err and "target_modules" not in err
    code, _, err = _run([*base, "--levels", "head", "--target-modules", "q_proj,v_proj"], capsys)
    _one_line_error(code, err, "Level(s) head need that layout")
    code, _, err = _run([*base, "--levels", "rank"], capsys)  # rank needs the names, which the CLI now takes
    _one_line_error(code, err, "Name the linear layers to prune with --target-modules")
    assert "target_modules=" not in err
    assert not out.exists()


def test_target_modules_option_prunes_an_unknown_architecture(capsys, tmp_path, tiny_opt_dir, sentiment_csv):
    out = tmp_path / "out"
    argv = ["prune", "--model", str(tiny_opt_dir), "--dataset", str(sentiment_csv[0]), "--output-dir", str(out)]
    argv += ["--levels", "rank", "--target-modules", "fc1,fc2", "--max-steps", "2", "--dense-epochs", "0"]
    argv += ["--max-length", "16", "--eval-samples", "8", "--no-plots"]
    code, _, err = _run(argv, capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["params"]["prunable"] == 2 * 2 * 32 * 64  # fc1 and fc2 of both layers, nothing else


def test_unreachable_target_is_refused_before_training(capsys, tmp_path, tiny_cls_dir, sentiment_csv, no_training):
    argv = ["prune", "--model", str(tiny_cls_dir), "--dataset", str(sentiment_csv[0]), "--output-dir", str(tmp_path)]
    code, _, err = _run([*argv, "--levels", "row", "--target", "0.9"], capsys)
    _one_line_error(code, err, "FlopConfig.target_sparsity=0.9 cannot be reached")


def test_output_checks_come_before_training(capsys, tmp_path, tiny_cls_dir, sentiment_csv, no_training, monkeypatch):
    """The card template, matplotlib for the plots and the push settings are checked before anything loads."""
    import importlib.util

    from huggingface_hub import constants

    from hf_flop import hub

    argv = ["prune", "--model", str(tiny_cls_dir), "--dataset", str(sentiment_csv[0])]
    argv += ["--output-dir", str(tmp_path / "out")]
    monkeypatch.setattr(hub, "CARD_TEMPLATE", tmp_path / "missing.md")
    code, _, err = _run(argv, capsys)
    _one_line_error(code, err, "the model card template")
    monkeypatch.undo()

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
    code, _, err = _run(argv, capsys)
    _one_line_error(code, err, "pass --no-plots")
    monkeypatch.undo()

    code, _, err = _run([*argv, "--push-to-hub", "--repo-id", "not a repo"], capsys)
    _one_line_error(code, err, "is not a Hub repository id")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, _, err = _run([*argv, "--push-to-hub", "--repo-id", "me/tiny"], capsys)
    _one_line_error(code, err, "HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    code, _, err = _run([*argv, "--push-to-hub", "--repo-id", "me/tiny"], capsys)
    _one_line_error(code, err, "needs a Hub token")
    assert not (tmp_path / "out").exists()


def test_a_missed_target_is_reported_in_the_summary(capsys, tmp_path, tiny_cls_dir, sentiment_csv):
    """Two pruning steps cannot reach 0.5: the console and summary.json say so, in the CLI's option names."""
    argv = ["prune", "--model", str(tiny_cls_dir), "--dataset", str(sentiment_csv[0]), "--output-dir", str(tmp_path)]
    argv += ["--max-steps", "2", "--dense-epochs", "0", "--max-length", "16", "--eval-samples", "8", "--no-plots"]
    argv += ["--pruning-phase", "1", "--levels", "rank"]  # learned gates (one-shot masks are exact)
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    text = " ".join(out.split())
    assert "MISSED)" in text and "missed target: the model ended at sparsity" in text
    assert "Train longer (--max-steps / --epochs), or raise --gate-learning-rate (now 0.2)" in text
    assert "PruningTrainer" not in err  # reported once, by the CLI, not also as a raw warning
    check = json.loads((tmp_path / "summary.json").read_text())["target_check"]
    assert check["met"] is False and check["target"] == 0.5 and check["sparsity"] < 0.1
    assert check["message"].startswith("the model ended at sparsity")
    card = (tmp_path / "model" / "README.md").read_text()  # the card repeats it, beside the dense baseline
    assert "Target sparsity 0.500: **missed**" in card and "| metric | dense model (before pruning) |" in card
    assert f"from_pretrained({str((tmp_path / 'model').absolute())!r}" in card  # where the model really is
    assert "- distillation: from a teacher model" in card and "- data: sentiment.csv; 72 training examples" in card


def test_the_command_line_lists_the_embedded_defaults_the_job_loads():
    """``--help`` lists literal copies of the embedded defaults' names and what they are (it must not import
    hf_flop); the copies are the application's own tables."""
    from hf_flop_cli import choices

    assert choices.MODELS == data.MODELS and choices.DATASETS == data.DATASETS
