"""Offline evaluate metrics shipped in hf_flop.metrics, and the shared evaluation loops."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import VOCAB, tiny_bert, tiny_llama

from hf_flop import metrics


def test_accuracy_loads_by_path_offline():
    metric = metrics.load("accuracy")
    metric.add_batch(predictions=[1, 0, 1], references=[1, 1, 1])
    metric.add_batch(predictions=[0], references=[0])
    assert metric.compute() == {"accuracy": 0.75}
    assert metrics.load("accuracy").compute(predictions=[1, 0], references=[1, 1], normalize=False) == {"accuracy": 1}


def test_perplexity_is_per_token_whatever_the_batching():
    nll = [2.0, 3.0, 7.0]
    n_tokens = [2, 3, 5]
    whole = metrics.load("perplexity").compute(nll=nll, n_tokens=n_tokens)
    metric = metrics.load("perplexity")
    for a, b in zip(nll, n_tokens):
        metric.add_batch(nll=[a], n_tokens=[b])
    batched = metric.compute()
    assert whole["perplexity"] == pytest.approx(math.exp(12 / 10))
    assert batched == pytest.approx(whole)
    with pytest.raises(ValueError, match="at least one predicted token"):
        metrics.load("perplexity").compute(nll=[0.0], n_tokens=[0])


def test_unknown_metric_is_refused():
    with pytest.raises(ValueError, match="shipped metrics are"):
        metrics.metric_path("bleu")


def test_one_metric_per_task_from_one_table():
    assert metrics.TASKS == ("seq-cls", "causal-lm") and set(metrics.TASK_METRICS.values()) <= set(metrics.METRICS)
    assert [metrics.task_metric(t) for t in metrics.TASKS] == ["accuracy", "perplexity"]
    with pytest.raises(ValueError, match="task='qa' is not valid"):
        metrics.task_metric("qa")
    with pytest.raises(ValueError, match="task='qa' is not valid"):
        metrics.evaluate_model(tiny_bert(), [], task="qa", collator=_stack)


def _rows(n: int, length: int, with_class: bool):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (n, length), generator=g)
    rows = []
    for i in range(n):
        row = {"input_ids": ids[i], "attention_mask": torch.ones(length, dtype=torch.long)}
        row["labels"] = torch.tensor(i % 2) if with_class else ids[i]
        rows.append(row)
    return rows


def _stack(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def test_evaluate_model_accuracy_matches_argmax():
    model = tiny_bert().eval()
    rows = _rows(10, 6, with_class=True)
    result = metrics.evaluate_model(model, rows, task="seq-cls", collator=_stack, batch_size=4)
    batch = _stack(rows)
    with torch.no_grad():
        preds = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
    assert result["accuracy"] == pytest.approx((preds == batch["labels"]).float().mean().item())


def test_evaluate_model_perplexity_matches_model_loss():
    model = tiny_llama().eval()
    rows = _rows(6, 8, with_class=False)
    result = metrics.evaluate_model(model, rows, task="causal-lm", collator=_stack, batch_size=4)
    with torch.no_grad():
        loss = model(**_stack(rows)).loss  # mean over the 6 x 7 predicted tokens
    assert result["n_tokens"] == 6 * 7
    assert result["perplexity"] == pytest.approx(math.exp(loss.item()), rel=1e-5)
    with pytest.raises(ValueError, match="task="):
        metrics.evaluate_model(model, rows, task="qa", collator=_stack)


def test_cpu_latency_times_each_model():
    models = {"a": tiny_bert(), "b": tiny_bert()}
    inputs = {"input_ids": torch.randint(1, VOCAB, (2, 5))}
    times = metrics.cpu_latency(models, inputs, repeats=3, warmup=1)
    assert set(times) == {"a", "b"} and all(t > 0 for t in times.values())
    with pytest.raises(ValueError, match="repeats"):
        metrics.cpu_latency(models, inputs, repeats=0)


def test_cpu_latency_fixes_the_thread_count_and_restores_it():
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, input_ids):
            seen.append(torch.get_num_threads())
            return input_ids

    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    metrics.cpu_latency({"p": Probe()}, {"input_ids": torch.zeros(1)}, repeats=2, warmup=1, threads=other)
    assert seen == [other] * 3 and torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads"):
        metrics.cpu_latency({"p": Probe()}, {"input_ids": torch.zeros(1)}, threads=0)
    assert torch.get_num_threads() == before
