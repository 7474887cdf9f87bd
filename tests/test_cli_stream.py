"""``hf-flop stream``: a causal-LM checkpoint folder pruned layer by layer from the command line."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import hf_flop_cli as cli
from hf_flop.app import data


def _tiny_lm(folder):
    tokenizer = AutoTokenizer.from_pretrained(data.minilm_path())
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_stream_prunes_a_checkpoint_folder(tmp_path, capsys):
    source = _tiny_lm(tmp_path / "src")
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"the cat number {i % 7} sat on the mat near dog {i % 5}" for i in range(200)))
    out = tmp_path / "pruned"
    argv = ["stream", "--model", str(source), "--dataset", str(text), "--output-dir", str(out), "--target", "0.4"]
    argv += ["--calibration-batches", "4", "--batch-size", "2", "--max-length", "32"]
    code = cli.main(argv)
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "sparsity 0.4" in stdout or "sparsity 0.3" in stdout
    saved = json.loads((out / "config.json").read_text())
    assert saved["architectures"] == ["FlopLlamaForCausalLM"]
    assert (out / "tokenizer.json").is_file() and (out / "README.md").is_file()
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    dense = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(source).parameters())
    assert sum(p.numel() for p in model.parameters()) < dense


def test_stream_refuses_an_existing_output_in_one_line(tmp_path, capsys):
    source = _tiny_lm(tmp_path / "src")
    (tmp_path / "out").mkdir()
    code = cli.main(["stream", "--model", str(source), "--output-dir", str(tmp_path / "out")])
    _, err = capsys.readouterr()
    assert code == 2 and "exists" in err and len(err.strip().splitlines()) == 1
