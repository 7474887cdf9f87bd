"""Prune a text classifier with FLOP, Trainer style: `PruningArguments` + `PruningTrainer`.

Every `TrainingArguments` option works (they are parsed by `HfArgumentParser`), plus the pruning
ones of `PruningArguments` and the script's own below. Defaults: all-MiniLM-L6-v2 on the Rotten
Tomatoes sentiment sentences, both read offline from installed packages (`bash scripts/setup.sh`).

    # fine-tune densely first (a plain Trainer run; MiniLM has no classifier head yet) ...
    python examples/text_classification.py --output_dir out/dense --target_sparsity 0 \\
        --num_train_epochs 1 --max_train_samples 4000
    # ... then prune that model to 50% of its encoder linears, distilling from it
    python examples/text_classification.py --output_dir out/pruned --model_name_or_path out/dense/final \\
        --teacher_name_or_path out/dense/final --target_sparsity 0.5 --num_train_epochs 1

    # the same on 2 processes (CPU, DDP over gloo; gates and multipliers stay identical on both)
    accelerate launch --cpu --num_processes 2 examples/text_classification.py --output_dir out/pruned ...

Any Hub model id or local folder works for `--model_name_or_path` and any dataset for
`--dataset` (Hub id, save_to_disk folder, csv/json/parquet file); `--text_column` /
`--label_column` name the columns. Data preparation and model loading are the CLI's
(`hf_flop.app.data.prepare_task_data`, `load_task_model`); accuracy comes from the offline metric in
`hf_flop.metrics`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from transformers import HfArgumentParser

import hf_flop
from hf_flop import FlopConfig, get_flop_model, metrics
from hf_flop.app.data import find_model, load_task_model, load_tokenizer, prepare_task_data
from hf_flop.trainer import PruningArguments, PruningTrainer


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(default="minilm", metadata={"help": "Hub id, local folder, or 'minilm'."})
    dataset: str = field(default="rt-sentiment", metadata={"help": "Hub id, local path, or 'rt-sentiment'."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    text_column: str | None = field(
        default=None, metadata={"help": "Text column (default: text, sentence, content or review)."}
    )
    label_column: str | None = field(default=None, metadata={"help": "Label column (default: label or labels)."})
    eval_split: str = field(default="validation", metadata={"help": "Split to evaluate on."})
    max_length: int = field(default=64, metadata={"help": "Tokens per example (longer ones are truncated)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use a seeded subset of the training set."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use a seeded subset of the eval split."})
    target_sparsity: float = field(
        default=0.5, metadata={"help": "Fraction of the prunable parameters to remove; 0 = plain fine-tuning."}
    )
    levels: str = field(default="rank", metadata={"help": "Comma-separated FLOP levels: rank, head, row, block."})
    teacher_name_or_path: str | None = field(
        default=None, metadata={"help": "A fine-tuned dense model to distil from (same labels)."}
    )


def main(argv: list[str] | None = None) -> dict:
    """Run the example (``argv``: its command line, default ``sys.argv``); returns the final evaluation."""
    parser = HfArgumentParser((ScriptArguments, PruningArguments))
    script, training_args = parser.parse_args_into_dataclasses(args=argv)

    path = find_model(script.model_name_or_path)
    tokenizer = load_tokenizer(path)
    with training_args.main_process_first():  # rank 0 tokenizes, the others read its cache
        data = prepare_task_data(
            script.dataset,
            tokenizer,
            task="seq-cls",
            dataset_config=script.dataset_config,
            text_column=script.text_column,
            label_column=script.label_column,
            eval_split=script.eval_split,
            max_length=script.max_length,
            train_samples=script.max_train_samples or 0,
            eval_samples=script.max_eval_samples or 0,
            seed=training_args.seed,
        )
    model = load_task_model(path, "seq-cls", data["num_labels"], tokenizer, data["label_names"])
    metric = metrics.load(data["metric"])

    def compute_metrics(prediction):
        return metric.compute(predictions=prediction.predictions.argmax(-1), references=prediction.label_ids)

    common = dict(
        train_dataset=data["train"],
        eval_dataset=data["report"],
        data_collator=data["collator"],
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
    )
    final = os.path.join(training_args.output_dir, "final")
    if script.target_sparsity == 0:  # dense fine-tuning: a plain Trainer, saved as a plain model
        from transformers import Trainer

        trainer = Trainer(model=model, args=training_args, **common)
        trainer.train()
        results = trainer.evaluate()
        print(results)
        trainer.save_model(final)
        return results

    teacher = None
    if script.teacher_name_or_path:  # loaded separately: injection below modifies `model` in place
        teacher = load_task_model(find_model(script.teacher_name_or_path), "seq-cls", data["num_labels"], tokenizer, data["label_names"])
    config = FlopConfig(target_sparsity=script.target_sparsity, levels=script.levels.split(","))
    model = get_flop_model(model, config)
    trainer = PruningTrainer(model=model, args=training_args, teacher_model=teacher, **common)
    trainer.train()
    results = trainer.evaluate()
    if trainer.is_world_process_zero():
        print(results)
        print(hf_flop.sparsity_report(model))
    metric_name = data["metric"]
    trainer.save_compacted(final, tokenizer=tokenizer, eval_results={metric_name: results[f"eval_{metric_name}"]})
    return results


if __name__ == "__main__":
    main()
