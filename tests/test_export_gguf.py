"""GGUF export (issue 14, item 4): what the file says, read back with gguf's own reader.

Tiny random Llama-GQA models, pruned one-shot and compacted, are written with ``hf_flop.export_gguf``
and read with ``gguf.GGUFReader``: architecture, per-layer arrays, tensor names, shapes and values,
the vocabulary, and every refusal. That llama.cpp runs these files is the slow test's job
(``tests/test_export_gguf_llama_cpp.py``).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from tiny_models import (
    LLAMA3_ROPE,
    VOCAB,
    tiny_bert,
    tiny_bpe_tokenizer,
    tiny_gpt2,
    tiny_llama,
    tiny_mistral,
    tiny_qwen2,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import hf_flop
from hf_flop import FlopConfig, compact, export_gguf, get_flop_model, prune_oneshot
from hf_flop.app.data import minilm_path
from hf_flop.architectures import arch_spec, layer_layouts
from hf_flop.modeling.factorized_embedding import FactorizedEmbedding

gguf = pytest.importorskip("gguf")


def batches(n: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, VOCAB, (2, 16), generator=g)} for _ in range(n)]


def non_uniform(levels=("head", "row"), target: float = 0.5, model=None):
    """A tiny Llama-GQA pruned one-shot (activation scores) and its compaction: per-layer shapes differ."""
    config = FlopConfig(levels=list(levels), target_sparsity=target)
    gated = prune_oneshot((model or tiny_llama()).eval(), config, batches(), "activation", reconstruct=False)
    return gated, compact(gated)


def uniform(heads_closed: int = 1, rows_closed: int = 16, model=None):
    """A tiny Llama-GQA with the same KV groups and FFN rows closed in every layer: a stock, uniform model."""
    gated = get_flop_model((model or tiny_llama()).eval(), FlopConfig(levels=["head", "row"])).eval()
    for name, gate in gated.base_model.gates().items():
        gate.close(torch.arange(heads_closed if name.startswith("head_") else rows_closed))
    return compact(gated)


def shapes(model) -> list[tuple[int, int, int]]:
    return [(lay.heads, lay.kv_heads, lay.intermediate) for lay in layer_layouts(model, arch_spec("llama"))]


def read(path):
    """``(metadata values by key, tensors by name)`` of a GGUF file; tensors as ``(out, in)`` float32 tensors."""
    reader = gguf.GGUFReader(path)
    fields = {key: field.contents() for key, field in reader.fields.items()}
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists the fastest-varying dimension first
        tensors[t.name] = (torch.from_numpy(t.data.astype("float32").reshape(shape)), t.tensor_type.name)
    return fields, tensors


def layer_tensor_names(i: int) -> set[str]:
    kinds = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
    return {f"blk.{i}.{kind}.weight" for kind in kinds}


def halves_to_pairs(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp rotates (2j, 2j+1) where transformers rotates (j, j + d/2): the expected row order, by index."""
    d = rows.shape[0] // heads
    order = [h * d + (i // 2 if i % 2 == 0 else d // 2 + i // 2) for h in range(heads) for i in range(d)]
    return rows[order]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_bpe_tokenizer()


def test_export_gguf_is_public():
    assert "export_gguf" in hf_flop.__all__ and hf_flop.export_gguf is export_gguf


# --- architecture and shapes ---------------------------------------------------------------------------
def test_a_uniform_model_is_written_as_llama(tmp_path, tokenizer):
    small = uniform()
    assert set(shapes(small)) == {(2, 1, 48)}
    fields, tensors = read(export_gguf(small, tmp_path / "m.gguf", tokenizer=tokenizer))
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == 2
    assert (fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]) == (2, 1)
    assert fields["llama.feed_forward_length"] == 48
    assert fields["llama.attention.key_length"] == fields["llama.rope.dimension_count"] == 8
    assert fields["llama.embedding_length"] == 32 and fields["llama.vocab_size"] == VOCAB
    expected = (
        {"token_embd.weight", "output_norm.weight", "output.weight"} | layer_tensor_names(0) | layer_tensor_names(1)
    )
    assert set(tensors) == expected
    assert tensors["blk.1.attn_q.weight"][0].shape == (16, 32) and tensors["blk.1.attn_k.weight"][0].shape == (8, 32)
    assert tensors["blk.1.ffn_down.weight"][0].shape == (32, 48) and tensors["output.weight"][0].shape == (VOCAB, 32)


def test_a_non_uniform_model_is_written_as_deci_with_per_layer_arrays(tmp_path, tokenizer):
    _, small = non_uniform()
    per_layer = shapes(small)
    assert len(set(per_layer)) > 1, per_layer  # the one-shot pruning did cut the layers differently
    fields, tensors = read(export_gguf(small, tmp_path / "m.gguf", tokenizer=tokenizer))
    assert fields["general.architecture"] == "deci"
    assert fields["deci.attention.head_count"] == [h for h, _, _ in per_layer]
    assert fields["deci.attention.head_count_kv"] == [kv for _, kv, _ in per_layer]
    assert fields["deci.feed_forward_length"] == [f for _, _, f in per_layer]
    assert fields["deci.attention.key_length"] == fields["deci.attention.value_length"] == 8
    assert fields["deci.block_count"] == 2 and fields["deci.rope.dimension_count"] == 8
    state = small.state_dict()
    for i, (heads, kv_heads, ffn) in enumerate(per_layer):
        for kind, hf, rows in (
            ("attn_q", "self_attn.q_proj", heads * 8),
            ("attn_k", "self_attn.k_proj", kv_heads * 8),
            ("attn_v", "self_attn.v_proj", kv_heads * 8),
            ("ffn_gate", "mlp.gate_proj", ffn),
            ("ffn_up", "mlp.up_proj", ffn),
        ):
            assert tensors[f"blk.{i}.{kind}.weight"][0].shape == (rows, 32)
            assert state[f"model.layers.{i}.{hf}.weight"].shape == (rows, 32)
        assert tensors[f"blk.{i}.attn_output.weight"][0].shape == (32, heads * 8)
        assert tensors[f"blk.{i}.ffn_down.weight"][0].shape == (32, ffn)


def test_deci_can_be_asked_for_and_llama_refuses_per_layer_shapes(tmp_path, tokenizer):
    fields, _ = read(export_gguf(uniform(), tmp_path / "u.gguf", tokenizer=tokenizer, architecture="deci"))
    assert fields["general.architecture"] == "deci" and fields["deci.attention.head_count"] == [2, 2]
    _, small = non_uniform()
    with pytest.raises(ValueError, match=r"FlopConfig\(uniform_shapes=True\)") as err:
        export_gguf(small, tmp_path / "n.gguf", tokenizer=tokenizer, architecture="llama")
    assert "architecture=None" in str(err.value)
    assert not (tmp_path / "n.gguf").exists()
    with pytest.raises(ValueError, match="architecture='gpt2' is not one of"):
        export_gguf(small, tmp_path / "n.gguf", tokenizer=tokenizer, architecture="gpt2")
    with pytest.raises(ValueError, match="dtype='q4' is not one of"):
        export_gguf(small, tmp_path / "n.gguf", tokenizer=tokenizer, dtype="q4")


def test_uniform_shapes_pruning_gives_a_llama_file(tmp_path, tokenizer):
    # the remedy the refusal above names: FlopConfig(uniform_shapes=True) prunes every layer alike
    config = FlopConfig(levels=["head", "row"], target_sparsity=0.5, uniform_shapes=True)
    small = compact(prune_oneshot(tiny_llama().eval(), config, batches(), "activation", reconstruct=False))
    assert len(set(shapes(small))) == 1
    fields, _ = read(export_gguf(small, tmp_path / "m.gguf", tokenizer=tokenizer, architecture="llama"))
    heads, kv_heads, ffn = shapes(small)[0]
    assert fields["general.architecture"] == "llama" and fields["llama.feed_forward_length"] == ffn
    assert (fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]) == (heads, kv_heads)


# --- values ----------------------------------------------------------------------------------------------
def test_tensors_hold_the_model_weights_with_q_and_k_rows_paired_for_llama_cpp_rope(tmp_path, tokenizer):
    _, small = non_uniform()
    per_layer = shapes(small)
    _, tensors = read(export_gguf(small, tmp_path / "m.gguf", tokenizer=tokenizer))
    state = small.state_dict()
    torch.testing.assert_close(tensors["token_embd.weight"][0], state["model.embed_tokens.weight"])
    torch.testing.assert_close(tensors["output.weight"][0], state["lm_head.weight"])
    torch.testing.assert_close(tensors["output_norm.weight"][0], state["model.norm.weight"])
    for i, (heads, kv_heads, _) in enumerate(per_layer):
        layer = f"model.layers.{i}"
        q, k = state[f"{layer}.self_attn.q_proj.weight"], state[f"{layer}.self_attn.k_proj.weight"]
        torch.testing.assert_close(tensors[f"blk.{i}.attn_q.weight"][0], halves_to_pairs(q, heads))
        torch.testing.assert_close(tensors[f"blk.{i}.attn_k.weight"][0], halves_to_pairs(k, kv_heads))
        for kind, hf in (
            ("attn_v", "self_attn.v_proj"),
            ("attn_output", "self_attn.o_proj"),
            ("ffn_down", "mlp.down_proj"),
        ):
            torch.testing.assert_close(tensors[f"blk.{i}.{kind}.weight"][0], state[f"{layer}.{hf}.weight"])
        torch.testing.assert_close(
            tensors[f"blk.{i}.ffn_norm.weight"][0], state[f"{layer}.post_attention_layernorm.weight"]
        )


def test_tied_embeddings_are_written_once(tmp_path, tokenizer):
    small = uniform(model=tiny_llama(tie_word_embeddings=True))
    assert small.lm_head.weight is small.model.embed_tokens.weight
    _, tensors = read(export_gguf(small, tmp_path / "m.gguf", tokenizer=tokenizer))
    assert "output.weight" not in tensors  # llama.cpp then uses token_embd.weight for the output
    assert "token_embd.weight" in tensors


def test_f16_stores_matrices_in_half_precision_and_vectors_in_f32(tmp_path, tokenizer):
    small = uniform()
    fields, tensors = read(export_gguf(small, tmp_path / "m.gguf", tokenizer=tokenizer, dtype="f16"))
    assert fields["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)
    assert tensors["blk.0.ffn_up.weight"][1] == "F16" and tensors["token_embd.weight"][1] == "F16"
    assert tensors["blk.0.attn_norm.weight"][1] == "F32" and tensors["output_norm.weight"][1] == "F32"
    torch.testing.assert_close(
        tensors["blk.0.ffn_up.weight"][0], small.model.layers[0].mlp.up_proj.weight.half().float()
    )


def test_biases_and_static_rope_scaling_are_written(tmp_path, tokenizer):
    # Qwen2: q/k/v biases (k's paired like its rows); a llama3 RoPE scaling becomes rope_freqs
    model = tiny_qwen2()
    model.config.rope_parameters = dict(LLAMA3_ROPE)
    small = uniform(model=model)
    fields, tensors = read(export_gguf(small, tmp_path / "m.gguf", tokenizer=tokenizer))
    assert fields["general.architecture"] == "llama"
    bias = small.model.layers[0].self_attn.k_proj.bias
    torch.testing.assert_close(tensors["blk.0.attn_k.bias"][0].flatten(), halves_to_pairs(bias, 1))
    assert "blk.0.attn_q.bias" in tensors and "blk.0.attn_v.bias" in tensors and "blk.0.attn_output.bias" not in tensors
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](small.config, "cpu")
    default = 1.0 / 10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    factors = tensors["rope_freqs.weight"][0].flatten()
    torch.testing.assert_close(factors, (default / inv_freq.double()).float())
    # high frequencies are kept, low ones divided by the factor
    assert factors[0].item() == pytest.approx(1.0) and factors[-1].item() == pytest.approx(8.0)


# --- factorized layers -------------------------------------------------------------------------------
def test_low_rank_layers_are_multiplied_back_with_a_warning_or_refused(tmp_path, tokenizer):
    gated, small = non_uniform(levels=("rank", "head", "row"))
    assert any(isinstance(m, hf_flop.modeling.LowRankLinear) for m in small.modules())
    with pytest.warns(UserWarning, match="stored as the dense matrices they compute") as record:
        _, tensors = read(export_gguf(small, tmp_path / "m.gguf", tokenizer=tokenizer))
    assert "densify=False refuses" in str(record[0].message)
    for i, layer in enumerate(small.model.layers):
        up = layer.mlp.up_proj
        dense = up.out_proj.weight @ up.in_proj.weight if hasattr(up, "out_proj") else up.weight
        torch.testing.assert_close(tensors[f"blk.{i}.ffn_up.weight"][0], dense.detach())
    with pytest.raises(ValueError, match="Pass densify=True") as err:
        export_gguf(small, tmp_path / "refused.gguf", tokenizer=tokenizer, densify=False)
    assert "levels rank / block / embedding" in str(err.value) and not (tmp_path / "refused.gguf").exists()


def test_a_cluster_factorized_embedding_is_written_as_its_dense_matrix(tmp_path, tokenizer):
    from test_embedding import close_some_ranks, gated

    model = gated("llama_tied")
    close_some_ranks(model)
    small = compact(model)
    embedding = small.get_input_embeddings()
    assert isinstance(embedding, FactorizedEmbedding)
    with pytest.warns(UserWarning, match="the cluster-factorized embedding"):
        _, tensors = read(export_gguf(small, tmp_path / "m.gguf", tokenizer=tokenizer))
    with torch.no_grad():
        torch.testing.assert_close(tensors["token_embd.weight"][0], embedding(torch.arange(VOCAB)))
    assert "output.weight" not in tensors  # the head is tied to the clusters: llama.cpp reuses token_embd


def test_a_flop_model_is_compacted_first(tmp_path, tokenizer):
    gated, small = non_uniform()
    _, from_gated = read(export_gguf(gated, tmp_path / "g.gguf", tokenizer=tokenizer))
    _, from_small = read(export_gguf(small, tmp_path / "s.gguf", tokenizer=tokenizer))
    assert from_gated.keys() == from_small.keys()
    for name in from_small:
        torch.testing.assert_close(from_gated[name][0], from_small[name][0])


# --- refusals ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("builder, fragment", [(tiny_gpt2, "model_type='gpt2'"), (tiny_bert, "model_type='bert'")])
def test_other_architectures_are_refused(tmp_path, tokenizer, builder, fragment):
    with pytest.raises(ValueError, match="export_gguf writes Llama-family decoders") as err:
        export_gguf(builder(), tmp_path / "m.gguf", tokenizer=tokenizer)
    assert fragment in str(err.value) and "llama, mistral, qwen2" in str(err.value)


def test_unsupported_configs_are_refused(tmp_path, tokenizer):
    config = tiny_llama().config.to_dict()
    gelu = LlamaForCausalLM(LlamaConfig.from_dict({**config, "hidden_act": "gelu"}))
    with pytest.raises(ValueError, match="hidden_act is 'gelu'"):
        export_gguf(gelu, tmp_path / "m.gguf", tokenizer=tokenizer)
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}
    model = LlamaForCausalLM(LlamaConfig.from_dict({**config, "rope_parameters": yarn}))
    with pytest.raises(ValueError, match="this model's RoPE is 'yarn'"):
        export_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer)
    assert not (tmp_path / "m.gguf").exists()


# --- the vocabulary ---------------------------------------------------------------------------------------
def test_the_vocabulary_is_built_from_tokenizer_json(tmp_path, tokenizer):
    fields, _ = read(export_gguf(uniform(), tmp_path / "m.gguf", tokenizer=tokenizer))
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = tokenizer.get_vocab()
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert fields["tokenizer.ggml.merges"] == [" ".join(m) for m in spec["model"]["merges"]]
    types = fields["tokenizer.ggml.token_type"]
    assert types[0] == int(gguf.TokenType.CONTROL) and set(types[1:]) == {int(gguf.TokenType.NORMAL)}
    assert fields["tokenizer.ggml.bos_token_id"] == fields["tokenizer.ggml.eos_token_id"] == 0
    assert fields["tokenizer.ggml.add_bos_token"] is False


def test_a_larger_embedding_gets_unused_padding_tokens(tmp_path, tokenizer):
    config = {**tiny_llama().config.to_dict(), "vocab_size": VOCAB + 3}
    torch.manual_seed(0)
    fields, tensors = read(
        export_gguf(LlamaForCausalLM(LlamaConfig.from_dict(config)), tmp_path / "m.gguf", tokenizer=tokenizer)
    )
    assert fields["tokenizer.ggml.tokens"][-3:] == [f"[PAD{i}]" for i in range(VOCAB, VOCAB + 3)]
    assert fields["tokenizer.ggml.token_type"][-1] == int(gguf.TokenType.UNUSED)
    assert tensors["token_embd.weight"][0].shape == (VOCAB + 3, 32)


def test_the_vocabulary_can_be_copied_from_a_gguf_file(tmp_path, tokenizer):
    source = export_gguf(tiny_llama(), tmp_path / "source.gguf", tokenizer=tokenizer)
    copied, _ = read(export_gguf(uniform(), tmp_path / "m.gguf", tokenizer_gguf=source))
    original, _ = read(source)
    keys = {k for k in original if k.startswith("tokenizer.")}
    assert keys and keys == {k for k in copied if k.startswith("tokenizer.")}
    assert all(copied[k] == original[k] for k in keys)
    bigger = LlamaForCausalLM(LlamaConfig.from_dict({**tiny_llama().config.to_dict(), "vocab_size": 2 * VOCAB}))
    with pytest.raises(ValueError, match=f"holds {VOCAB} tokens but the model's embedding has {2 * VOCAB} rows"):
        export_gguf(bigger, tmp_path / "x.gguf", tokenizer_gguf=source)


def test_tokenizers_llama_cpp_cannot_take_are_refused(tmp_path):
    small = uniform()
    with pytest.raises(ValueError, match="needs the model's vocabulary"):
        export_gguf(small, tmp_path / "m.gguf")
    wordpiece = AutoTokenizer.from_pretrained(minilm_path())
    with pytest.raises(ValueError, match="byte-level BPE tokenizers .* only; this one is WordPiece") as err:
        export_gguf(small, tmp_path / "m.gguf", tokenizer=wordpiece)
    assert "tokenizer_gguf=" in str(err.value)
    # a byte-level BPE whose pre-tokenizer llama.cpp has no name for (it splits on whitespace first)
    from tokenizers import pre_tokenizers

    odd = tiny_bpe_tokenizer()
    odd.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    with pytest.raises(ValueError, match="matches none of llama.cpp's built-in ones") as err:
        export_gguf(small, tmp_path / "m.gguf", tokenizer=odd)
    assert "tokenizer_pre=" in str(err.value)
    fields, _ = read(export_gguf(small, tmp_path / "m.gguf", tokenizer=odd, tokenizer_pre="gpt-2"))
    assert fields["tokenizer.ggml.pre"] == "gpt-2"
    assert not list(tmp_path.glob(".*tmp*"))


# --- files ---------------------------------------------------------------------------------------------------
def test_a_saved_folder_exports_with_its_own_tokenizer(tmp_path, tokenizer):
    gated, small = non_uniform()
    hf_flop.save_compacted(gated, tmp_path / "saved", tokenizer=tokenizer)
    fields, tensors = read(export_gguf(tmp_path / "saved", tmp_path / "m.gguf"))
    _, direct = read(export_gguf(small, tmp_path / "direct.gguf", tokenizer=tokenizer))
    assert fields["general.architecture"] == "deci" and fields["general.name"] == "saved"
    assert fields["tokenizer.ggml.tokens"][5] == tokenizer.convert_ids_to_tokens(5)
    for name in direct:
        torch.testing.assert_close(tensors[name][0], direct[name][0])


def test_nothing_half_written(tmp_path, tokenizer, monkeypatch):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"the previous file")

    def fail(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(uniform(), target, tokenizer=tokenizer)
    assert target.read_bytes() == b"the previous file"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_a_sliding_window_shorter_than_the_context_is_warned_about(tmp_path, tokenizer):
    model = tiny_mistral()  # its window (4096) is longer than its context (64): nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer)
    model.config.sliding_window = 16
    with pytest.warns(UserWarning, match="sliding window of 16 tokens"):
        export_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer)


# --- the command line ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_lm_folder(tmp_path_factory, tokenizer):
    """A tiny random Llama-GQA saved with the tiny byte-level BPE tokenizer, and a corpus of its sentences."""
    folder = tmp_path_factory.mktemp("tiny_bpe_lm")
    tiny_llama().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(f"the cat sat on the mat {i % 7} times, and the dog sat on a log." for i in range(200)))
    return folder, corpus


def run_cli(argv, capsys) -> tuple[int, str]:
    import hf_flop_cli

    code = hf_flop_cli.main(argv)
    return code, capsys.readouterr().err


def test_the_cli_writes_model_gguf(tmp_path, tiny_lm_folder, capsys):
    folder, corpus = tiny_lm_folder
    out = tmp_path / "run"
    argv = ["prune", "--task", "causal-lm", "--model", str(folder), "--dataset", str(corpus), "--levels", "head,row"]
    argv += ["--output-dir", str(out), "--max-steps", "2", "--max-length", "16", "--no-plots", "--no-distill"]
    code, err = run_cli([*argv, "--export-gguf", "--gguf-dtype", "f16"], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    fields, tensors = read(out / "model.gguf")
    arch = fields["general.architecture"]
    assert summary["gguf"]["architecture"] == arch and summary["gguf"]["dtype"] == "f16"
    assert summary["gguf"]["bytes"] == (out / "model.gguf").stat().st_size
    small = AutoModelForCausalLM.from_pretrained(out / "model")
    per_layer = shapes(small)
    heads = fields[f"{arch}.attention.head_count"]
    assert (heads if arch == "deci" else [heads] * 2) == [h for h, _, _ in per_layer]
    assert tensors["blk.0.ffn_up.weight"][1] == "F16"
    vocab = AutoTokenizer.from_pretrained(folder).get_vocab()
    assert fields["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)


@pytest.fixture
def no_training(monkeypatch):
    from transformers import Trainer

    def refuse(*args, **kwargs):
        raise AssertionError("a training step ran")

    monkeypatch.setattr(Trainer, "training_step", refuse)


def test_the_cli_refuses_what_llama_cpp_cannot_take_before_training(tmp_path, tiny_lm_folder, capsys, no_training):
    folder, corpus = tiny_lm_folder
    out = tmp_path / "run"
    base = ["prune", "--model", str(folder), "--dataset", str(corpus), "--output-dir", str(out), "--export-gguf"]
    code, err = run_cli(base, capsys)  # the default task is sequence classification
    assert code == 2 and "--export-gguf writes causal language models for llama.cpp" in err
    base[1:1] = ["--task", "causal-lm"]
    code, err = run_cli([*base, "--gguf-tokenizer", str(tmp_path / "missing.gguf")], capsys)
    assert code == 2 and "is not a file" in err
    # a WordPiece tokenizer: refused once the model is loaded, before any training, in the CLI's words
    wordpiece_folder = tmp_path / "wordpiece_lm"
    config = {**tiny_llama().config.to_dict(), "vocab_size": 30522}
    LlamaForCausalLM(LlamaConfig.from_dict(config)).save_pretrained(wordpiece_folder)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(wordpiece_folder)
    base[base.index("--model") + 1] = str(wordpiece_folder)
    code, err = run_cli(base, capsys)
    assert code == 2 and "--export-gguf: export_gguf builds llama.cpp vocabularies from byte-level BPE" in err
    assert "pass --gguf-tokenizer a GGUF file" in err and "tokenizer_gguf" not in err
    assert not out.exists()
