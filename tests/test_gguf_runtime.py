"""Measuring a GGUF file through llama.cpp (``hf_flop.metrics.gguf_runtime``) and the job's row of it.

llama-cpp-python is not a test dependency (a long build of llama.cpp), so llama.cpp is played here by a
stand-in module with the calls these functions make (``Llama``: ``reset``, ``eval``, ``scores``, ``ctx``,
``n_vocab``; ``llama_get_logits_ith``), computing its logits with a PyTorch model. What is checked is the
wiring: that the logits are scored as ``evaluate_model`` scores the PyTorch model's (shift, labels, one
row per context), the row and card text built from it, and the refusal without llama-cpp-python. That the
real llama.cpp computes a file's logits as transformers does is the slow tests' part
(``tests/test_export_gguf_llama_cpp.py``).
"""

from __future__ import annotations

import ctypes
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import Dataset
from rich.console import Console
from tiny_models import tiny_llama
from transformers import default_data_collator

from hf_flop.app.exports import card_rows, measure_gguf
from hf_flop.metrics import evaluate_model, gguf_perplexity, gguf_speed, llama_cpp_missing


def _stand_in(model) -> types.ModuleType:
    """A ``llama_cpp`` module whose ``Llama`` runs ``model`` on the tokens it was given (whatever the file)."""
    module = types.ModuleType("llama_cpp")
    module.__version__ = "stand-in"
    vocab = model.config.vocab_size

    class Llama:
        made: list = []

        def __init__(self, model_path: str, n_ctx: int, logits_all: bool = False, **options) -> None:
            self.n_ctx, self.logits_all, self.options = n_ctx, logits_all, options
            self.scores = np.zeros((n_ctx, vocab), dtype=np.float32)
            self.last = np.zeros(vocab, dtype=np.float32)
            self.ctx, self.tokens = self, []
            Llama.made.append(self)

        def reset(self) -> None:
            self.tokens = []

        def eval(self, tokens: list[int]) -> None:
            past = len(self.tokens)
            self.tokens += list(tokens)
            assert len(self.tokens) <= self.n_ctx, "more tokens than the context holds"
            with torch.no_grad():
                logits = model(torch.tensor([self.tokens])).logits[0].numpy()
            if self.logits_all:
                self.scores[past : len(self.tokens)] = logits[past:]
            self.last[:] = logits[-1]

        def n_vocab(self) -> int:
            return vocab

    module.Llama = Llama
    module.llama_get_logits_ith = lambda ctx, i: ctx.last.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    return module


@pytest.fixture
def model():
    torch.manual_seed(0)
    return tiny_llama().eval()


@pytest.fixture
def blocks(model):
    """Evaluation rows as the job's causal-lm data has them: full blocks of ids, labels = ids."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (5, 12), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 12] * 5, "labels": ids})


@pytest.fixture
def gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF stand-in")
    return path


def test_the_perplexity_is_scored_as_the_pytorch_models(monkeypatch, model, blocks, gguf_file):
    monkeypatch.setitem(sys.modules, "llama_cpp", _stand_in(model))
    assert llama_cpp_missing() is None
    expected = evaluate_model(model, blocks, task="causal-lm", collator=default_data_collator)["perplexity"]
    got = gguf_perplexity(gguf_file, blocks, threads=1)
    assert got["perplexity"] == pytest.approx(expected, rel=1e-5) and got["n_tokens"] == 5 * 11
    (llm,) = sys.modules["llama_cpp"].Llama.made
    assert llm.logits_all and llm.n_ctx == 12 and llm.options["n_threads"] == 1


def test_speed_times_the_prompt_and_each_generated_token(monkeypatch, model, gguf_file):
    monkeypatch.setitem(sys.modules, "llama_cpp", _stand_in(model))
    speed = gguf_speed(gguf_file, [1, 2, 3, 4], steps=5, repeats=2, threads=1)
    assert set(speed) == {"prompt_tokens_per_s", "generation_tokens_per_s"} and min(speed.values()) > 0
    (llm,) = sys.modules["llama_cpp"].Llama.made
    assert len(llm.tokens) == 4 + 5 and not llm.logits_all
    with torch.no_grad():  # greedy: the first generated token is the model's argmax after the prompt
        assert llm.tokens[4] == int(model(torch.tensor([[1, 2, 3, 4]])).logits[0, -1].argmax())


def test_without_llama_cpp_python_the_measurement_is_refused(monkeypatch, blocks, gguf_file):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    assert llama_cpp_missing() == "llama-cpp-python is not installed"
    with pytest.raises(ImportError, match="pip install llama-cpp-python"):
        gguf_perplexity(gguf_file, blocks)


def test_the_jobs_row_and_card_cells_of_a_measured_file(monkeypatch, model, blocks, gguf_file):
    monkeypatch.setitem(sys.modules, "llama_cpp", _stand_in(model))
    options = SimpleNamespace(gguf_quantization="q4_0", gguf_dtype="f32", threads=1, latency_threads=2)
    data = {"report": blocks, "metric": "perplexity", "eval_split": "validation"}
    job = SimpleNamespace(options=options, data=data, results={"pruned": 3.0}, console=Console(quiet=True))
    row = measure_gguf(job, gguf_file)
    expected = evaluate_model(model, blocks, task="causal-lm", collator=default_data_collator)["perplexity"]
    assert row["bytes"] == gguf_file.stat().st_size and row["quantization"] == "q4_0"
    assert row["metric"]["value"] == pytest.approx(expected, rel=1e-5) and row["metric"]["pytorch"] == 3.0
    assert row["runtime"] == "llama-cpp-python stand-in" and row["prompt_tokens"] == 12
    (cells,) = card_rows([row])
    assert cells["metric"] == f"perplexity {row['metric']['value']:.4f} (PyTorch 3.0000)"
    speed = row["tokens_per_s"]
    assert cells["speed"] == (
        f"generation {speed['generation']:.1f} tokens/s, prompt {speed['prompt']:.1f} tokens/s (llama.cpp, 2 threads)"
    )
