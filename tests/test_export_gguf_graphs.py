"""GGUF export of Qwen3 and Gemma 2/3 as llama.cpp's own graphs (``hf_flop.gguf_graphs``), read back with gguf.

Tiny random models pruned to the same shapes in every layer are written as ``qwen3`` / ``gemma2`` /
``gemma3``: q/k norms and Gemma's extra norms as their tensors, Gemma's ``1 + weight`` norms with the 1
added, transformers' query scale folded into the q norm (or q), q and k rows in transformers' order
(these graphs rotate halves), sliding-window, RoPE and soft-capping keys; per-layer shapes and what the
graphs cannot compute are refused. That llama.cpp runs the files is ``test_export_gguf_llama_cpp.py``'s job.
"""

from __future__ import annotations

import pytest
import torch
from test_export_gguf import batches, read
from tiny_models import tiny_bpe_tokenizer, tiny_gemma2, tiny_gemma3_text, tiny_llama, tiny_qwen3

from hf_flop import FlopConfig, compact, export_gguf, get_flop_model, prune_oneshot

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_bpe_tokenizer()


def uniform(model, heads_closed: int = 1, rows_closed: int = 16):
    """``model`` with the same KV group and FFN rows closed in every layer, compacted."""
    gated = get_flop_model(model.eval(), FlopConfig(levels=["head", "row"])).eval()
    for name, gate in gated.base_model.gates().items():
        gate.close(torch.arange(heads_closed if name.startswith("head_") else rows_closed))
    return compact(gated)


def per_layer(model):
    config = FlopConfig(levels=["head", "row"], target_sparsity=0.5)
    return compact(prune_oneshot(model.eval(), config, batches(), "activation", reconstruct=False))


def test_qwen3_is_written_as_qwen3_with_its_q_and_k_norms(tmp_path, tokenizer):
    small = uniform(tiny_qwen3())
    fields, tensors = read(export_gguf(small, tmp_path / "m.gguf", tokenizer=tokenizer))
    assert fields["general.architecture"] == "qwen3"
    assert (fields["qwen3.attention.head_count"], fields["qwen3.attention.head_count_kv"]) == (2, 1)  # numbers
    assert fields["qwen3.feed_forward_length"] == 48 and fields["qwen3.attention.key_length"] == 8
    state = small.state_dict()
    for i in range(2):
        layer = f"model.layers.{i}"
        # qwen3 rotates halves as transformers does: q and k rows as they are, the norms over head_dim as they are
        for kind, hf in (
            ("attn_q", "q_proj"),
            ("attn_k", "k_proj"),
            ("attn_q_norm", "q_norm"),
            ("attn_k_norm", "k_norm"),
        ):
            torch.testing.assert_close(tensors[f"blk.{i}.{kind}.weight"][0], state[f"{layer}.self_attn.{hf}.weight"])
        assert tensors[f"blk.{i}.attn_q_norm.weight"][0].shape == (8,)
    assert "output.weight" in tensors and not any("rope_freqs" in name for name in tensors)


def test_gemma3_norms_get_their_one_and_the_query_scale_goes_into_q_norm(tmp_path, tokenizer):
    small = uniform(tiny_gemma3_text())
    fields, tensors = read(export_gguf(small, tmp_path / "m.gguf", tokenizer=tokenizer))
    assert fields["general.architecture"] == "gemma3" and fields["gemma3.attention.head_count"] == 2
    assert fields["gemma3.attention.sliding_window"] == 4
    assert fields["gemma3.attention.sliding_window_pattern"] == [True, False]  # layer_types
    assert fields["gemma3.rope.freq_base"] == 1e6 and fields["gemma3.rope.freq_base_swa"] == 1e4
    assert "gemma3.final_logit_softcapping" not in fields
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    state = small.state_dict()
    torch.testing.assert_close(tensors["output_norm.weight"][0], state["model.norm.weight"] + 1)
    ratio = 16**-0.5 / 8**-0.5  # transformers: query_pre_attn_scalar 16; llama.cpp: head_dim 8
    for i in range(2):
        layer = f"model.layers.{i}"
        for kind, hf in (
            ("attn_norm", "input_layernorm"),
            ("post_attention_norm", "post_attention_layernorm"),
            ("ffn_norm", "pre_feedforward_layernorm"),
            ("post_ffw_norm", "post_feedforward_layernorm"),
            ("attn_k_norm", "self_attn.k_norm"),
        ):
            torch.testing.assert_close(tensors[f"blk.{i}.{kind}.weight"][0], state[f"{layer}.{hf}.weight"] + 1)
        q_norm = (state[f"{layer}.self_attn.q_norm.weight"] + 1) * ratio
        torch.testing.assert_close(tensors[f"blk.{i}.attn_q_norm.weight"][0], q_norm)
        torch.testing.assert_close(tensors[f"blk.{i}.attn_q.weight"][0], state[f"{layer}.self_attn.q_proj.weight"])


def test_gemma2_writes_soft_capping_and_folds_the_query_scale_into_q(tmp_path, tokenizer):
    small = uniform(tiny_gemma2())
    fields, tensors = read(export_gguf(small, tmp_path / "m.gguf", tokenizer=tokenizer))
    assert fields["general.architecture"] == "gemma2"
    assert fields["gemma2.attn_logit_softcapping"] == 50.0 and fields["gemma2.final_logit_softcapping"] == 30.0
    assert fields["gemma2.attention.sliding_window_pattern"] == [True, False]
    state = small.state_dict()
    q = state["model.layers.0.self_attn.q_proj.weight"] * (16**-0.5 / 8**-0.5)
    torch.testing.assert_close(tensors["blk.0.attn_q.weight"][0], q)
    assert "blk.0.attn_q_norm.weight" not in tensors


def test_a_linear_rope_scaling_is_written_as_keys(tmp_path, tokenizer):
    model = tiny_qwen3()
    model.config.rope_parameters = {"rope_type": "linear", "rope_theta": 5000.0, "factor": 4.0}
    fields, _ = read(export_gguf(uniform(model), tmp_path / "m.gguf", tokenizer=tokenizer))
    assert fields["qwen3.rope.scaling.type"] == "linear" and fields["qwen3.rope.scaling.factor"] == 4.0
    assert fields["qwen3.rope.freq_base"] == 5000.0


@pytest.mark.parametrize("builder, graph", [(tiny_qwen3, "qwen3"), (tiny_gemma3_text, "gemma3")])
def test_per_layer_shapes_are_refused_with_what_deci_lacks(tmp_path, tokenizer, builder, graph):
    small = per_layer(builder())
    with pytest.raises(ValueError, match=rf"llama.cpp's {graph} graph sizes every layer from layer 0") as err:
        export_gguf(small, tmp_path / "m.gguf", tokenizer=tokenizer)
    assert "'deci', computes a plain Llama layer, without" in str(err.value) and "q/k RMS norms" in str(err.value)
    assert "FlopConfig(uniform_shapes=True)" in str(err.value)
    with pytest.raises(ValueError, match=rf"architecture='deci' does not compute this model.*as '{graph}'"):
        export_gguf(small, tmp_path / "m.gguf", tokenizer=tokenizer, architecture="deci")
    assert not (tmp_path / "m.gguf").exists()


def test_uniform_shapes_pruning_gives_a_qwen3_file(tmp_path, tokenizer):
    config = FlopConfig(levels=["head", "row"], target_sparsity=0.5, uniform_shapes=True)
    small = compact(prune_oneshot(tiny_qwen3().eval(), config, batches(), "activation", reconstruct=False))
    fields, _ = read(export_gguf(small, tmp_path / "m.gguf", tokenizer=tokenizer))
    assert fields["general.architecture"] == "qwen3"
    assert fields["qwen3.attention.head_count"] == small.config.num_attention_heads
    assert fields["qwen3.feed_forward_length"] == small.config.intermediate_size < 64  # pruned, alike in every layer


def _with(builder, **config):
    """A model of ``builder`` whose config is changed after construction (what the export reads)."""

    def build():
        model = builder()
        for key, value in config.items():
            setattr(model.config, key, value)
        return model

    return build


SCALED_SWA_ROPE = {
    "full_attention": {"rope_type": "default", "rope_theta": 1e6},
    "sliding_attention": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0},
}


@pytest.mark.parametrize(
    "build, message",
    [
        (_with(tiny_gemma3_text, attn_logit_softcapping=20.0), "attn_logit_softcapping is 20.0; llama.cpp's gemma3"),
        (_with(tiny_gemma3_text, rope_parameters=SCALED_SWA_ROPE), "rotates sliding-window layers without a RoPE"),
        (_with(tiny_gemma3_text, hidden_activation="silu"), "gelu_pytorch_tanh in the FFN; this model's hidden_act"),
        (_with(tiny_gemma2, attn_logit_softcapping=None), "always soft-caps with attn_logit_softcapping"),
    ],
    ids=["gemma3_attention_softcap", "gemma3_scaled_sliding_rope", "gemma3_silu", "gemma2_no_attention_softcap"],
)
def test_what_the_graphs_cannot_compute_is_refused(tmp_path, tokenizer, build, message):
    with pytest.raises(ValueError, match=message):
        export_gguf(build(), tmp_path / "m.gguf", tokenizer=tokenizer)
    assert not (tmp_path / "m.gguf").exists()


def test_an_untied_gemma2_head_and_a_llama3_rope_on_qwen3_are_refused(tmp_path, tokenizer):
    from tiny_models import LLAMA3_ROPE
    from transformers import Gemma2Config, Gemma2ForCausalLM

    untied = Gemma2ForCausalLM(Gemma2Config(**{**tiny_gemma2().config.to_dict(), "tie_word_embeddings": False}))
    with pytest.raises(ValueError, match="always computes the output with the token embedding"):
        export_gguf(untied, tmp_path / "m.gguf", tokenizer=tokenizer)
    qwen3 = tiny_qwen3()
    qwen3.config.rope_parameters = dict(LLAMA3_ROPE)
    with pytest.raises(ValueError, match="this model's RoPE is 'llama3'"):
        export_gguf(qwen3, tmp_path / "m.gguf", tokenizer=tokenizer)


def test_check_exportable_refuses_per_layer_pruning_of_these_families_before_training(tokenizer):
    from hf_flop.export_gguf import check_exportable

    per_layer_config = FlopConfig(levels=["head", "row"])
    with pytest.raises(ValueError, match=r"llama.cpp's gemma3 graph runs the same shapes in every layer only") as err:
        check_exportable(tiny_gemma3_text(), tokenizer=tokenizer, flop_config=per_layer_config)
    assert "--uniform-shapes" in str(err.value) and "FlopConfig(uniform_shapes=True)" in str(err.value)
    with pytest.raises(ValueError, match="level 'embedding' factorizes the token embedding"):
        check_exportable(tiny_gemma2(), tokenizer=tokenizer, flop_config=FlopConfig(levels=["embedding"]))
    # what these graphs run, and what deci runs for the Llama family, passes
    check_exportable(
        tiny_qwen3(), tokenizer=tokenizer, flop_config=FlopConfig(levels=["head", "row"], uniform_shapes=True)
    )
    check_exportable(tiny_qwen3(), tokenizer=tokenizer, flop_config=FlopConfig(levels=["rank"]))
    check_exportable(tiny_llama(), tokenizer=tokenizer, flop_config=per_layer_config)


def test_a_62_layer_gemma3_is_scaled_as_llama_cpp_scales_gemma_3_27b(tmp_path, tokenizer):
    # llama.cpp takes a 62-layer gemma3 file for Gemma 3 27B and scales queries by (hidden // heads)^-0.5 of the
    # file's own head count: with 2 of 4 heads left that is 16^-0.5, transformers' query_pre_attn_scalar 16 exactly
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = {**tiny_gemma3_text().config.to_dict(), "num_hidden_layers": 62, "layer_types": None}
    small = uniform(Gemma3ForCausalLM(Gemma3TextConfig.from_dict(config)))
    fields, tensors = read(export_gguf(small, tmp_path / "m.gguf", tokenizer=tokenizer))
    assert fields["gemma3.block_count"] == 62 and fields["gemma3.attention.head_count"] == 2
    q_norm = small.state_dict()["model.layers.0.self_attn.q_norm.weight"] + 1  # no factor: the scales agree
    torch.testing.assert_close(tensors["blk.0.attn_q_norm.weight"][0], q_norm)
    assert fields["gemma3.attention.sliding_window_pattern"][:6] == [True] * 5 + [False]  # Gemma 3's default pattern
