"""Two-step multi-level pruning (MLPruning's recipe): heads and FFN rows first, then blocks.

    python examples/two_step_pipeline.py                     # tiny random BERT, synthetic task, a few minutes
    python examples/two_step_pipeline.py --model minilm --dataset rt-sentiment --dense_steps 1500 \\
        --prune_steps 3000 --batch_size 32 --output_dir out/two_step     # MiniLM-L6 on Rotten Tomatoes (hours)

0. Dense: fine-tune the model (``--dense_steps``; 0 if ``--model`` is already fine-tuned). It is
   the first teacher.
1. Head/row pruning to ``--head_row_sparsity`` of the encoder's linear weights, distilled from the
   dense model (``PruningTrainer(teacher_model=...)``), then ``hf_flop.compact``: a plain, smaller
   model. ``round_to=block_size`` keeps the FFN widths multiples of the block size for step 2.
2. Block pruning (``levels=["block"]``) of the compacted model to ``--block_sparsity`` of what is
   left, distilled from the step-1 model, then ``hf_flop.save_compacted``: block-sparse layers
   (``BlockSparseLinear``) that load with ``from_pretrained``.

The remaining fraction of the original linear weights is ``(1 - s1) (1 - s2)``: the defaults
0.5 and 0.6 leave 20%, MLPruning's headline setting. Each step distils from the previous one, so
every student starts from and is pulled toward a model that already works. The gates are
MLPruning's Top-k thresholds (``--gate topk``, whose size is exact); with ``hard_concrete`` and
runs this short, the eval masks can prune more than the expected size says.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile

import torch
from datasets import Dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    Trainer,
    default_data_collator,
)

import hf_flop
from hf_flop import FlopConfig, compact, get_flop_model, sparsity_report
from hf_flop.trainer import PruningArguments, PruningTrainer

VOCAB, LENGTH = 200, 16


def synthetic_task(n: int, seed: int) -> Dataset:
    """Bag-of-words "sentiment": label 1 when the sequence holds more of ids 2-11 than of ids 12-21."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(22, VOCAB, (n, LENGTH), generator=g)
    pos = torch.randint(0, 4, (n,), generator=g)
    neg = torch.randint(0, 4, (n,), generator=g)
    neg = torch.where(neg == pos, (neg + 1) % 4, neg)
    for i in range(n):
        slots = torch.randperm(LENGTH, generator=g)[: int(pos[i] + neg[i])]
        words = torch.cat(
            [torch.randint(2, 12, (int(pos[i]),), generator=g), torch.randint(12, 22, (int(neg[i]),), generator=g)]
        )
        ids[i, slots] = words
    return Dataset.from_dict(
        {
            "input_ids": ids.tolist(),
            "attention_mask": torch.ones_like(ids).tolist(),
            "labels": (pos > neg).long().tolist(),
        }
    )


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=LENGTH,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def load(args):
    """(model, train set, eval set, collator, tokenizer or None)."""
    if args.model == "tiny" and args.dataset == "synthetic":
        return tiny_bert(), synthetic_task(args.train_size, 0), synthetic_task(500, 1), default_data_collator, None
    from hf_flop.app.data import find_column, load_text_dataset, resolve_model, tokenize_classification, with_validation

    raw = with_validation(load_text_dataset(args.dataset), seed=0)
    text = find_column(raw["train"], None, ("text", "sentence"), "text")
    label = find_column(raw["train"], None, ("label", "labels"), "label")
    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    splits = [
        tokenize_classification(raw[s], tokenizer, text_column=text, label_column=label, max_length=64)
        for s in ("train", "validation")
    ]
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(set(raw["train"][label])))
    return model, *splits, DataCollatorWithPadding(tokenizer), tokenizer


def training_args(args, name: str, steps: int, **extra) -> PruningArguments:
    return PruningArguments(
        output_dir=os.path.join(args.work_dir, name),
        max_steps=steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        logging_steps=max(steps // 5, 1),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=args.seed,
        pruning_phase=1.0,  # MLPruning's two steps each learn their gates
        **extra,
    )


@torch.no_grad()
def accuracy(model, dataset, collator, batch_size: int = 128) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        labels = batch.pop("labels")
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / len(dataset)


def prune(args, student, teacher, config: FlopConfig, name: str, train_set, collator):
    """One distilled pruning step; returns the FLOP model (still gated) and its report."""
    model = get_flop_model(student, config)
    trainer_args = training_args(
        args, name, args.prune_steps, gate_learning_rate=args.gate_learning_rate, target_warmup_steps=0.5
    )
    trainer = PruningTrainer(
        model=model, args=trainer_args, train_dataset=train_set, data_collator=collator, teacher_model=teacher
    )
    trainer.train()
    return model, sparsity_report(model)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="'tiny' (random BERT), 'minilm', a Hub id or a folder")
    parser.add_argument("--dataset", default="synthetic", help="'synthetic', 'rt-sentiment', a Hub id or a path")
    parser.add_argument("--head_row_sparsity", type=float, default=0.5)
    parser.add_argument("--block_sparsity", type=float, default=0.6)
    parser.add_argument("--block_size", type=int, default=16)
    parser.add_argument("--gate", default="topk", choices=["hard_concrete", "topk"])
    parser.add_argument("--dense_steps", type=int, default=150)
    parser.add_argument("--prune_steps", type=int, default=200)
    parser.add_argument("--train_size", type=int, default=2000, help="synthetic task only")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--gate_learning_rate", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="out/two_step_pipeline")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as work_dir:
        args.work_dir = work_dir
        dense, train_set, eval_set, collator, tokenizer = load(args)
        if args.dense_steps:
            Trainer(
                model=dense,
                args=training_args(args, "dense", args.dense_steps),
                train_dataset=train_set,
                data_collator=collator,
            ).train()
        results = {"dense": {"accuracy": accuracy(dense, eval_set, collator)}}

        # step 1: heads and FFN rows, distilled from the dense model
        config1 = FlopConfig(
            levels=["head", "row"], target_sparsity=args.head_row_sparsity, round_to=args.block_size, gate=args.gate
        )
        gated1, report1 = prune(args, copy.deepcopy(dense), dense, config1, "head_row", train_set, collator)
        step1 = compact(gated1)
        results["head_row"] = {
            "accuracy": accuracy(step1, eval_set, collator),
            "kept": report1.deterministic_kept_params,
        }

        # step 2: blocks inside what is left, distilled from the step-1 model
        config2 = FlopConfig(
            levels=["block"], target_sparsity=args.block_sparsity, block_size=args.block_size, gate=args.gate
        )
        gated2, report2 = prune(args, copy.deepcopy(step1), step1, config2, "block", train_set, collator)
        final = compact(gated2)
        results["block"] = {"accuracy": accuracy(final, eval_set, collator), "kept": report2.deterministic_kept_params}

    out = hf_flop.save_compacted(
        gated2,
        args.output_dir,
        overwrite=True,
        tokenizer=tokenizer,
        eval_results={"accuracy": results["block"]["accuracy"]},
    )
    reloaded = AutoModelForSequenceClassification.from_pretrained(out)
    results["reloaded_accuracy"] = accuracy(reloaded, eval_set, collator)
    dense_params = results["dense"]["kept"] = report1.prunable_params
    print(f"{'model':<10} {'linear weights':>15} {'of dense':>9} {'accuracy':>9}")
    print(f"{'dense':<10} {dense_params:>15,} {1.0:>9.3f} {results['dense']['accuracy']:>9.3f}")
    for name in ("head_row", "block"):
        kept = results[name]["kept"]
        print(f"{name:<10} {kept:>15,} {kept / dense_params:>9.3f} {results[name]['accuracy']:>9.3f}")
    print(f"saved to {out}; reloaded accuracy {results['reloaded_accuracy']:.3f}")
    results["remaining_fraction"] = results["block"]["kept"] / dense_params
    return results


if __name__ == "__main__":
    main()
