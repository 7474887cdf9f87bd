"""The command line takes level "hidden": ``--levels hidden,...`` prunes residual channels end to end."""

from __future__ import annotations

import json

from test_cli import _run, tiny_lm_dir, tokenizer  # noqa: F401  (the fixtures)


def test_report_counts_the_embedding_and_norms_with_level_hidden(capsys, tiny_lm_dir):  # noqa: F811
    code, out, err = _run(["report", "--model", str(tiny_lm_dir), "--levels", "hidden,row"], capsys)
    assert code == 0, err
    assert "flop_hidden.model.embed_tokens" in out and "flop_hidden.model.norm" in out


def test_prune_causal_lm_with_hidden_channels_saves_a_narrower_stock_model(capsys, tmp_path, tiny_lm_dir):  # noqa: F811
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"the cat number {i % 7} sat on the mat near dog {i % 5}" for i in range(300)))
    out = tmp_path / "run"
    argv = ["prune", "--task", "causal-lm", "--model", str(tiny_lm_dir), "--dataset", str(text)]
    argv += ["--output-dir", str(out), "--max-steps", "2", "--max-length", "16", "--no-plots", "--no-distill"]
    argv += ["--levels", "hidden,row", "--target", "0.3", "--uniform-shapes"]
    code, _, err = _run(argv, capsys)
    assert code == 0, err
    saved = json.loads((out / "model" / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in saved
    assert saved["hidden_size"] < 32 and saved["hidden_size"] % saved["num_attention_heads"] == 0
    assert saved["head_dim"] == 8
    summary = json.loads((out / "summary.json").read_text())
    assert summary["target_check"]["met"]
