"""Level "layer" under PruningTrainer (the Lagrangian learns which layers to drop) and on the command line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from hf_flop import FlopConfig, PruningArguments, PruningTrainer, compact, get_flop_model, sparsity_report

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from tiny_task import CountingTask, tiny_llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _learned_run(model, tmp_path) -> PruningTrainer:
    """120 steps of learned gates (one phase) on the counting task; the trainer after ``train()``."""
    args = PruningArguments(
        output_dir=str(tmp_path),
        max_steps=120,
        per_device_train_batch_size=16,
        learning_rate=1e-3,
        logging_steps=20,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        pruning_phase=1.0,
    )
    trainer = PruningTrainer(model=model, args=args, train_dataset=CountingTask())
    trainer.train()
    return trainer


def test_the_lagrangian_learns_layer_gates_to_the_target(tmp_path):
    """Four layers, half of the prunable parameters to go: the run ends with two layers removed."""
    model = get_flop_model(tiny_llama(layers=4), FlopConfig(levels=["layer"], target_sparsity=0.5))
    trainer = _learned_run(model, tmp_path)
    logged = [h["expected_sparsity"] for h in trainer.state.log_history if "expected_sparsity" in h]
    assert logged[0] < 0.2 and abs(logged[-1] - 0.5) <= 0.05, logged  # the constraint pulled it to the target
    report = sparsity_report(trainer.model)
    assert report.deterministic_sparsity == pytest.approx(0.5)  # the masks fixed at the end: two whole layers
    assert len(report.layers_removed) == 2 and trainer.target_check.met
    small = compact(trainer.model)
    assert small.config.num_hidden_layers == 2


def test_the_lagrangian_learns_sublayer_gates_and_the_result_compacts(tmp_path):
    config = FlopConfig(levels=["layer", "row"], layer_granularity="sublayer", target_sparsity=0.5)
    model = get_flop_model(tiny_llama(layers=4), config)
    trainer = _learned_run(model, tmp_path)
    logged = [h["expected_sparsity"] for h in trainer.state.log_history if "expected_sparsity" in h]
    assert abs(logged[-1] - 0.5) <= 0.05, logged
    assert trainer.target_check.met, trainer.target_check.describe()
    report = sparsity_report(trainer.model)
    assert report.sublayers_removed and abs(report.deterministic_sparsity - 0.5) <= trainer.target_check.tolerance
    gated = trainer.model.eval()
    small = compact(gated)
    ids = CountingTask()[0]["input_ids"][None]
    torch.testing.assert_close(small(input_ids=ids).logits, gated(input_ids=ids).logits, atol=1e-4, rtol=0)


def test_the_command_line_takes_level_layer():
    import hf_flop_cli as cli

    args = cli.build_parser().parse_args(["prune", "--levels", "layer,row", "--uniform-shapes"])
    config = cli._flop_config(args)
    assert config.levels == ["layer", "row"] and config.uniform_shapes


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    """A tiny random four-layer Llama with the (real, local) MiniLM tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hf_flop.app import data

    tokenizer = AutoTokenizer.from_pretrained(data.minilm_path())
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny_lm4")
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow  # about 20 s: a whole job (data, one-shot masks, two recovery steps, evaluation, saving)
def test_prune_causal_lm_by_layers_end_to_end(capsys, tmp_path, tiny_lm_dir):
    """hf-flop prune --levels layer,row: the saved model has fewer layers and is the stock class."""
    import json

    import hf_flop_cli as cli

    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"the cat number {i % 7} sat on the mat near dog {i % 5}" for i in range(300)))
    out = tmp_path / "run"
    argv = ["prune", "--task", "causal-lm", "--model", str(tiny_lm_dir), "--dataset", str(text), "--target", "0.5"]
    argv += ["--output-dir", str(out), "--max-steps", "2", "--max-length", "16", "--no-plots", "--no-distill"]
    argv += ["--levels", "layer", "--uniform-shapes"]
    code = cli.main(argv)
    _, err = capsys.readouterr()
    assert code == 0, err
    saved = json.loads((out / "model" / "config.json").read_text())
    before = json.loads((tiny_lm_dir / "config.json").read_text())["num_hidden_layers"]
    assert saved["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in saved
    assert saved["num_hidden_layers"] == before // 2
