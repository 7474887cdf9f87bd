"""Quantized GGUF files (``export_gguf(quantization=...)``), read back with gguf's own reader.

Checked: each tensor's ggml type (norms f32, the output matrix q8_0 under the 4/5-bit types, an untied
token embedding at the file's type), dequantized matrices within each type's rounding of the weights,
the f16 fallback (with its warning) for matrices whose width pruning left off the 32-value block, the
per-layer (``deci``) file, ``dtype`` and ``quantization`` together, and the refusals, before any file
appears. llama.cpp running such files is in ``tests/test_export_gguf_llama_cpp.py`` (slow).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from test_export_gguf import non_uniform, uniform
from tiny_models import tiny_bpe_tokenizer, tiny_llama

from hf_flop import export_gguf
from hf_flop.export_gguf import GGUFExportWarning

gguf = pytest.importorskip("gguf")

# a bound on the error of a block type relative to its block's largest |value| (one quantization step)
STEP = {"Q8_0": 1 / 127, "Q5_0": 1 / 16, "Q5_1": 1 / 31, "Q4_0": 1 / 8, "Q4_1": 1 / 15, "F16": 1e-3, "BF16": 8e-3}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_bpe_tokenizer()


def read(path) -> dict:
    """``{name: (type name, dequantized (out, in) float array)}`` of a GGUF file."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = (t.tensor_type.name, np.asarray(values, dtype=np.float32).reshape(tuple(reversed(t.shape))))
    return out


def assert_close(values: np.ndarray, weight: torch.Tensor, type_name: str) -> None:
    """Every block of 32 within half a step of its largest value (f16/bf16: relative rounding)."""
    w = weight.detach().float().numpy()
    assert values.shape == w.shape
    block = 32 if type_name.startswith("Q") else 1
    scale = np.abs(w.reshape(-1, block)).max(axis=1, keepdims=True) if block > 1 else np.abs(w.reshape(-1, 1))
    err = np.abs(values.reshape(-1, block) - w.reshape(-1, block))
    assert (err <= STEP[type_name] * scale * 1.01 + 1e-7).all(), (type_name, float(err.max()))
    if block > 1:  # and quantized at all: not the f32 weights again
        assert err.max() > 0


@pytest.mark.parametrize("quantization", ["q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "bf16"])
def test_types_and_values_of_a_quantized_file(tmp_path, tokenizer, quantization):
    model = tiny_llama().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GGUFExportWarning)  # widths 32 and 64 fit the blocks: no fallback
        path = export_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer, quantization=quantization)
    tensors = read(path)
    base = quantization.upper()
    assert tensors["output_norm.weight"][0] == tensors["blk.0.attn_norm.weight"][0] == "F32"
    assert tensors["blk.1.ffn_norm.weight"][0] == "F32"
    # llama.cpp gives the output matrix more bits (Q6_K; gguf writes Q8_0), the untied embedding the file's type
    assert tensors["output.weight"][0] == (base if quantization in ("q8_0", "bf16") else "Q8_0")
    assert tensors["token_embd.weight"][0] == base
    layer = model.model.layers[1]
    for name, weight in [
        ("token_embd.weight", model.model.embed_tokens.weight),
        ("output.weight", model.lm_head.weight),
        ("blk.1.attn_v.weight", layer.self_attn.v_proj.weight),
        ("blk.1.ffn_down.weight", layer.mlp.down_proj.weight),
        ("blk.1.ffn_up.weight", layer.mlp.up_proj.weight),
    ]:
        type_name, values = tensors[name]
        assert type_name in (base, "Q8_0")
        assert_close(values, weight, type_name)
    assert gguf.GGUFReader(path).fields["general.file_type"].contents() == gguf.LlamaFileType[f"MOSTLY_{base}"]


def test_smaller_file_for_fewer_bits(tmp_path, tokenizer):
    model = tiny_llama().eval()
    size = {
        q: export_gguf(model, tmp_path / f"{q}.gguf", tokenizer=tokenizer, quantization=q).stat().st_size
        for q in ("f32", "f16", "q8_0", "q4_0")
    }
    assert size["f32"] > size["f16"] > size["q8_0"] > size["q4_0"]


def test_tied_embedding_is_the_output_matrix(tmp_path, tokenizer):
    path = export_gguf(
        tiny_llama(tie_word_embeddings=True).eval(), tmp_path / "m.gguf", tokenizer=tokenizer, quantization="q4_0"
    )
    tensors = read(path)
    assert "output.weight" not in tensors
    assert tensors["token_embd.weight"][0] == "Q8_0"
    assert tensors["blk.0.attn_q.weight"][0] == "Q4_0"


def test_widths_off_the_block_kept_in_f16_with_a_warning_in_a_deci_file(tmp_path, tokenizer):
    _, small = non_uniform()  # per-layer heads and FFN widths: o and down projections of widths like 8, 40
    with pytest.warns(GGUFExportWarning, match="not a multiple of q8_0's block of 32 values") as caught:
        path = export_gguf(small, tmp_path / "m.gguf", tokenizer=tokenizer, quantization="q8_0")
    assert caught[0].message.parameter == "quantization"
    assert gguf.GGUFReader(path).fields["general.architecture"].contents() == "deci"
    tensors = read(path)
    kept = 0
    for i, layer in enumerate(small.model.layers):
        for kind, module in [
            ("attn_output", layer.self_attn.o_proj),
            ("ffn_down", layer.mlp.down_proj),
            ("attn_v", layer.self_attn.v_proj),
            ("ffn_up", layer.mlp.up_proj),
        ]:
            type_name, values = tensors[f"blk.{i}.{kind}.weight"]
            fits = module.weight.shape[1] % 32 == 0
            assert type_name == ("Q8_0" if fits else "F16"), (i, kind, module.weight.shape)
            assert_close(values, module.weight, type_name)
            kept += not fits
            if not fits:
                assert f"blk.{i}.{kind}.weight (width {module.weight.shape[1]})" in str(caught[0].message)
    assert kept > 0


def test_uniform_model_quantizes_as_llama(tmp_path, tokenizer):
    small = uniform(heads_closed=0, rows_closed=32)  # FFN 32 wide: every width fits
    path = export_gguf(small, tmp_path / "m.gguf", tokenizer=tokenizer, quantization="q5_0")
    assert gguf.GGUFReader(path).fields["general.architecture"].contents() == "llama"
    assert read(path)["blk.0.ffn_down.weight"][0] == "Q5_0"


def test_dtype_is_the_float_subset(tmp_path, tokenizer):
    model = tiny_llama().eval()
    a = export_gguf(model, tmp_path / "a.gguf", tokenizer=tokenizer, dtype="f16")
    b = export_gguf(model, tmp_path / "b.gguf", tokenizer=tokenizer, dtype="f16", quantization="f16")
    assert a.read_bytes() == b.read_bytes()
    assert read(a)["blk.0.attn_q.weight"][0] == "F16"
    assert read(export_gguf(model, tmp_path / "c.gguf", tokenizer=tokenizer))["blk.0.attn_q.weight"][0] == "F32"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"quantization": "int8"}, "'int8' is not a GGUF type hf_flop writes.*q8_0.*q4_k_m"),
        ({"quantization": "q8_0", "dtype": "f16"}, "disagree"),
        ({"dtype": "q8_0"}, "'q8_0' is not one of 'f32', 'f16'; for other types pass quantization"),
    ],
)
def test_refused_before_any_work(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        export_gguf(tmp_path / "no-such-folder", tmp_path / "m.gguf", **kwargs)  # the folder is not even read
    assert list(tmp_path.iterdir()) == []


def test_k_quant_without_llama_cpp_names_what_works(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now fails, installed or not
    with pytest.raises(ValueError, match=r"'q4_k_m' is a K-quant.*pip install llama-cpp-python.*f32, f16, bf16, q8_0"):
        export_gguf(tmp_path / "no-such-folder", tmp_path / "m.gguf", quantization="q4_k_m")
    assert list(tmp_path.iterdir()) == []
