"""Exports of a model pruned at level "hidden": ONNX Runtime runs it, and GGUF writes it as plain llama."""

from __future__ import annotations

import pytest
import torch
from test_onnx_export import assert_onnx_runtime_matches
from tiny_models import VOCAB, tiny_bpe_tokenizer, tiny_llama

from hf_flop import FlopConfig, compact, export_gguf, export_onnx, get_flop_model
from hf_flop.hidden import hidden_channels


def narrow_llama(closed: int = 8, rows_closed: int = 16):
    """A tiny Llama (hidden 32) with ``closed`` residual channels and the same FFN rows closed in every layer."""
    model = get_flop_model(tiny_llama().eval(), FlopConfig(levels=["hidden", "row"], uniform_shapes=True)).eval()
    keep = torch.ones(32, dtype=torch.bool)
    keep[torch.arange(closed) * 3] = False  # spread over the stream
    hidden_channels(model.base_model).gate.set_mask(keep)
    for name, gate in model.base_model.gates().items():
        if name.startswith("row_"):
            gate.close(torch.arange(rows_closed))
    small = compact(model)
    assert type(small).__name__ == "LlamaForCausalLM" and small.config.hidden_size == 32 - closed
    return small


@pytest.mark.slow  # about 25 s on a shared 2-core machine (torch's ONNX exporter)
def test_onnx_runtime_runs_a_hidden_pruned_llama(tmp_path):
    pytest.importorskip("onnxruntime")
    small = narrow_llama()
    path = export_onnx(small, tmp_path / "model.onnx")
    assert_onnx_runtime_matches(path, small, ["input_ids", "attention_mask"])


def test_gguf_writes_a_hidden_pruned_uniform_llama_as_llama(tmp_path):
    gguf = pytest.importorskip("gguf")
    from test_export_gguf import read

    small = narrow_llama()
    fields, tensors = read(export_gguf(small, tmp_path / "m.gguf", tokenizer=tiny_bpe_tokenizer()))
    assert gguf is not None and fields["general.architecture"] == "llama"
    assert fields["llama.embedding_length"] == 24 and fields["llama.feed_forward_length"] == 48
    assert fields["llama.attention.key_length"] == fields["llama.attention.value_length"] == 8
    assert fields["llama.rope.dimension_count"] == 8 and fields["llama.attention.head_count"] == 4
    assert tensors["token_embd.weight"][0].shape == (VOCAB, 24)
    torch.testing.assert_close(tensors["token_embd.weight"][0], small.model.embed_tokens.weight.detach())
    assert tensors["output_norm.weight"][0].shape == (24,) and tensors["blk.0.attn_norm.weight"][0].shape == (24,)
    assert tensors["blk.1.attn_q.weight"][0].shape == (32, 24) and tensors["blk.1.attn_output.weight"][0].shape == (24, 32)
    assert tensors["blk.0.ffn_down.weight"][0].shape == (24, 48) and tensors["output.weight"][0].shape == (VOCAB, 24)
