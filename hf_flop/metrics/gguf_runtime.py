"""A GGUF file measured where it runs: its perplexity and tokens per second through llama.cpp.

llama.cpp is reached through llama-cpp-python (``pip install llama-cpp-python``, a build of llama.cpp), an
optional package: ``llama_cpp_missing`` says why these cannot run, for the caller to state instead of a
number. ``gguf_perplexity`` feeds the evaluation rows' token ids to llama.cpp as they are (the file's
vocabulary is the tokenizer's) and scores its logits with ``evaluation.add_batch``, the rule
``evaluate_model`` applies to the PyTorch model, so the two perplexities read against each other.
``gguf_speed`` times a prompt processed in one batch and greedy generation, token by token.
"""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path

import torch

from .evaluation import add_batch
from .loading import load

__all__ = ["gguf_perplexity", "gguf_speed", "llama_cpp_missing"]


def llama_cpp_missing() -> str | None:
    """Why llama.cpp cannot measure a file here (llama-cpp-python not importable), or None when it can."""
    try:
        importlib.import_module("llama_cpp")
    except ImportError:
        return "llama-cpp-python is not installed"
    return None


def _llama(path: str | os.PathLike, n_ctx: int, threads: int | None, *, logits_all: bool):
    """llama.cpp's model and context for the file at ``path``; a clear error first when it cannot load."""
    reason = llama_cpp_missing()
    if reason:
        raise ImportError(f"measuring a GGUF file needs llama.cpp: {reason}; pip install llama-cpp-python.")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is not a file; pass the .gguf file export_gguf wrote.")
    if threads is not None and threads < 1:
        raise ValueError(f"threads={threads} must be >= 1 (or None for llama.cpp's default).")
    import llama_cpp

    threads = threads or os.cpu_count() or 1
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=n_ctx,  # a whole row in one batch
        n_ubatch=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=logits_all,  # keeps every position's logits in llm.scores (perplexity); speed needs only the last
        verbose=False,
    )


def _ids(row) -> list[int]:
    """A row's token ids without its right padding (the attention mask's zeros)."""
    ids = [int(t) for t in row["input_ids"]]
    mask = row.get("attention_mask")
    return ids[: int(sum(mask))] if mask is not None else ids


def gguf_perplexity(path: str | os.PathLike, dataset, *, threads: int | None = None) -> dict[str, float]:
    """Per-token perplexity of the GGUF model at ``path`` on ``dataset`` (rows of ``input_ids`` and ``labels``,
    as ``evaluate_model`` takes for ``task="causal-lm"``), each row evaluated from an empty context."""
    if len(dataset) == 0:
        raise ValueError("gguf_perplexity needs at least one row of input_ids and labels; the dataset is empty.")
    rows = [dataset[i] for i in range(len(dataset))]
    llm = _llama(path, max(len(_ids(row)) for row in rows), threads, logits_all=True)
    metric = load("perplexity")
    for row in rows:
        ids = _ids(row)
        llm.reset()
        llm.eval(ids)
        logits = torch.as_tensor(llm.scores[: len(ids)]).unsqueeze(0)
        labels = torch.as_tensor([int(t) for t in row["labels"][: len(ids)]]).unsqueeze(0)
        add_batch(metric, "causal-lm", logits, labels)
    return metric.compute()


def gguf_speed(
    path: str | os.PathLike, prompt: list[int], *, steps: int = 32, repeats: int = 3, threads: int | None = None
) -> dict[str, float]:
    """llama.cpp's prompt and generation tokens per second on the GGUF model at ``path``, the best of ``repeats``.

    ``prompt`` (token ids) is processed in one batch; then ``steps`` tokens are generated greedily, one at a time.
    """
    if not prompt or steps < 1 or repeats < 1:
        raise ValueError(
            f"gguf_speed needs a prompt, steps >= 1 and repeats >= 1 (got {len(prompt)} tokens, "
            f"steps={steps}, repeats={repeats})."
        )
    llm = _llama(path, len(prompt) + steps + 8, threads, logits_all=False)  # refuses first without llama.cpp
    import llama_cpp
    import numpy as np

    best = {"prompt_tokens_per_s": 0.0, "generation_tokens_per_s": 0.0}
    for _ in range(repeats):
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        prompt_done = time.perf_counter()
        for _ in range(steps):
            # the last position's logits (llama-cpp-python keeps no others without logits_all)
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
            llm.eval([int(np.argmax(logits))])
        end = time.perf_counter()
        best["prompt_tokens_per_s"] = max(best["prompt_tokens_per_s"], len(prompt) / (prompt_done - start))
        best["generation_tokens_per_s"] = max(best["generation_tokens_per_s"], steps / (end - prompt_done))
    return best
