"""llama.cpp runs quantized GGUF files from ``export_gguf(quantization=...)``: the slow test (needs llama-cpp-python).

Run with a llama-cpp-python build on the path, e.g.
``LD_LIBRARY_PATH=<build>/lib LLAMA_CPP_LIB_PATH=<build>/lib PYTHONPATH=$PWD:<build> pytest -m slow <this file>``.
Checked: a q8_0 file of a pruned (per-layer, ``deci``) tiny Llama gives logits within a few percent of
transformers', as does a q4_0 file less closely; a q4_k_m file written through llama.cpp's own quantizer
has K-quant matrices (Q4_K, Q6_K for the output) and runs with logits near transformers'; a pruned (deci) q4_k_m file keeps the matrices of widths off 256 in llama.cpp's fallback types, named in the warning.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_export_gguf_llama_cpp import PROMPT, batches, hf_greedy, llama_cpp_greedy, load, sharpened
from tiny_models import tiny_bpe_tokenizer, tiny_llama

from hf_flop import FlopConfig, compact, export_gguf, prune_oneshot

pytestmark = pytest.mark.slow
gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")


def compare(model, path) -> tuple[float, float, bool]:
    """For the prompt's last token: max |llama.cpp's - transformers' logits| over transformers' largest |logit|,
    their correlation, and whether their top tokens are the same."""
    _, hf_logits = hf_greedy(model.eval(), PROMPT, steps=1)
    _, cpp_logits = llama_cpp_greedy(llama_cpp, load(llama_cpp, path), PROMPT, steps=1)
    error = float(np.abs(cpp_logits - hf_logits).max() / np.abs(hf_logits).max())
    return error, float(np.corrcoef(cpp_logits, hf_logits)[0, 1]), bool(cpp_logits.argmax() == hf_logits.argmax())


# (largest error, least correlation) on the sharpened model (weights x 8, which amplifies rounding); measured with
# llama.cpp 0c1e570: q8_0 3.5 % / 0.9995, q4_0 43 % / 0.937 (an f16 file: 0.17 % / 0.999999)
@pytest.mark.parametrize("quantization, bound, correlation", [("q8_0", 0.06, 0.998), ("q4_0", 0.6, 0.9)])
def test_a_pruned_quantized_file_runs_close_to_transformers(tmp_path, quantization, bound, correlation):
    config = FlopConfig(levels=["head", "row"], target_sparsity=0.5)
    small = compact(prune_oneshot(sharpened(tiny_llama()).eval(), config, batches(), "activation", reconstruct=False))
    with pytest.warns(UserWarning, match="not a multiple of"):  # pruned widths off the block: kept in f16
        path = export_gguf(small, tmp_path / "m.gguf", tokenizer=tiny_bpe_tokenizer(), quantization=quantization)
    assert gguf.GGUFReader(path).fields["general.architecture"].contents() == "deci"
    error, corr, same_top = compare(small, path)
    print(f"\n{quantization}: llama.cpp's logits within {error:.2%} of transformers' largest, correlation {corr:.4f}")
    assert 0 < error < bound and corr > correlation and same_top


def test_a_k_quant_through_llama_cpps_quantizer_runs(tmp_path):
    torch.manual_seed(0)
    model = sharpened(tiny_llama(hidden_size=256, intermediate_size=512)).eval()  # K-quant blocks are 256 wide
    path = export_gguf(model, tmp_path / "m.gguf", tokenizer=tiny_bpe_tokenizer(), quantization="q4_k_m")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["output.weight"] == "Q6_K" and types["blk.0.attn_q.weight"] == "Q4_K"
    assert types["blk.0.attn_norm.weight"] == "F32"
    error, corr, same_top = compare(model, path)
    print(f"\nq4_k_m: llama.cpp's logits within {error:.2%} of transformers' largest, correlation {corr:.4f}")
    assert 0 < error < 0.5 and corr > 0.9 and same_top


def test_a_pruned_deci_k_quant_falls_back_where_widths_are_off_256(tmp_path):
    model = sharpened(tiny_llama(hidden_size=256, intermediate_size=512)).eval()
    config = FlopConfig(levels=["head", "row"], target_sparsity=0.5)
    small = compact(prune_oneshot(model, config, batches(), "activation", reconstruct=False))
    with pytest.warns(UserWarning, match="not a multiple of q4_k_m's block of 256 values") as caught:
        path = export_gguf(small, tmp_path / "m.gguf", tokenizer=tiny_bpe_tokenizer(), quantization="q4_k_m")
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "deci"
    off = {t.name: t.tensor_type.name for t in reader.tensors if len(t.shape) > 1 and int(t.shape[0]) % 256}
    assert off and all(name in str(caught[0].message) for name in off)
    assert set(off.values()) <= {"Q5_0", "Q5_1", "Q8_0", "Q4_0", "F16"}  # llama.cpp's fallbacks, never a K-quant
    error, corr, same_top = compare(small, path)
    print(f"\npruned q4_k_m: llama.cpp's logits within {error:.2%} of transformers' largest, correlation {corr:.4f}")
    assert 0 < error < 0.6 and corr > 0.85 and same_top
