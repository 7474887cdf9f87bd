"""A few PruningTrainer steps under ``accelerate launch --num_processes 2 --cpu`` (DDP over gloo).

Run by tests/test_distributed.py. Each rank writes what it ended with (gates, eval masks,
multipliers, one weight) and a checksum of the batches it was given to ``<out>/rank<i>.pt``, so the
test can check that the ranks saw different data and still agree on everything they learned.

Usage: accelerate launch --num_processes 2 --cpu tests/scripts/ddp_train.py OUT_DIR [LEVELS] [GATE]
"""

from __future__ import annotations

import os
import sys

import torch
from transformers import default_data_collator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_task import CountingTask, tiny_llama  # noqa: E402

from hf_flop import FlopConfig, PruningArguments, PruningTrainer, get_flop_model  # noqa: E402


def main() -> None:
    out = sys.argv[1]
    levels = sys.argv[2].split(",") if len(sys.argv) > 2 else ["rank", "head", "row"]
    gate = sys.argv[3] if len(sys.argv) > 3 else "hard_concrete"
    torch.set_num_threads(1)
    model = get_flop_model(tiny_llama(0), FlopConfig(target_sparsity=0.5, levels=levels, gate=gate))
    seen = []

    def collate(features):
        batch = default_data_collator(features)
        seen.append(int(batch["input_ids"].sum()))
        return batch

    args = PruningArguments(
        output_dir=out,
        max_steps=8,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        logging_steps=4,
        target_warmup_steps=4,
        pruning_phase=1.0,  # the learned gates, synchronised across processes
        save_strategy="no",
        report_to=[],
        seed=0,
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = PruningTrainer(model=model, args=args, train_dataset=CountingTask(), data_collator=collate)
    trainer.train()
    flop = trainer._flop
    result = {
        "world_size": trainer.args.world_size,
        "seen": seen,
        "gates": {name: [p.detach().clone() for p in g.parameters()] for name, g in flop.gates().items()},
        "masks": {name: g.deterministic_mask().detach().clone() for name, g in flop.gates().items()},
        "multipliers": trainer.constraint.values(),
        "embedding": model.get_input_embeddings().weight.detach().clone(),
        "logs": [h for h in trainer.state.log_history if "loss" in h],
    }
    torch.save(result, os.path.join(out, f"rank{trainer.args.process_index}.pt"))


if __name__ == "__main__":
    main()
