"""A few PruningTrainer steps under ``accelerate launch --multi_gpu --num_processes 2`` on CPU (DDP over gloo).

Run by tests/test_distributed.py. Each rank writes what it ended with (gates, eval masks,
multipliers, every weight, the phase boundary and the gates as recovery began) and a checksum of
the training batches it was given to ``<out>/rank<i>.pt``, so the test can check that the ranks
saw different data and still agree on everything they learned. ``run`` is also the test's
single-process reference (same data, same calibration sample, one process).

Usage: accelerate launch --multi_gpu --num_processes 2 tests/scripts/ddp_train.py OUT_DIR
       [--phase P] [--levels L] [--gate G] [--find-unused-parameters {true,false}]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch
from transformers import TrainerCallback, default_data_collator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_task import CountingTask, tiny_llama  # noqa: E402

from hf_flop import FlopConfig, PruningArguments, PruningTrainer, get_flop_model, sparsity_report  # noqa: E402
from hf_flop.accounting import largest_unit_params  # noqa: E402


def _gates(trainer: PruningTrainer) -> dict:
    """The gate parameters and eval masks, cloned."""
    gates = trainer._flop.gates()
    return {
        "gates": {name: [p.detach().clone() for p in g.parameters()] for name, g in gates.items()},
        "masks": {name: g.deterministic_mask().detach().clone() for name, g in gates.items()},
    }


class _AtRecovery(TrainerCallback):
    """The gates as the first recovery step begins: the boundary (or the one-shot prune) is behind it."""

    def __init__(self, trainer: PruningTrainer) -> None:
        self.trainer, self.gates = trainer, None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.trainer.recovering and self.gates is None:
            self.gates = _gates(self.trainer)


def run(
    out: str,
    phase: float = 1.0,
    levels: Sequence[str] = ("rank", "head", "row"),
    gate: str = "hard_concrete",
    find_unused_parameters: bool | None = None,
) -> dict:
    """Eight steps on the tiny task with ``pruning_phase=phase``; what the run ended with."""
    model = get_flop_model(tiny_llama(0), FlopConfig(target_sparsity=0.5, levels=list(levels), gate=gate))
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
        pruning_phase=phase,  # 1.0: the learned gates, synchronised across processes; below: fixed masks too
        save_strategy="no",
        report_to=[],
        seed=0,
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=find_unused_parameters,
    )
    trainer = PruningTrainer(model=model, args=args, train_dataset=CountingTask(), data_collator=collate)
    seen.clear()  # the calibration sample (phase < 1) went through collate too, and is the same on every rank
    at_recovery = _AtRecovery(trainer)
    trainer.add_callback(at_recovery)
    trainer.train()
    gate_groups = [g for g in trainer.optimizer.param_groups if g.get("flop_role") == "gates"]
    return {
        "rank": trainer.args.process_index,
        "world_size": trainer.args.world_size,
        "seen": seen,
        **_gates(trainer),
        "multipliers": trainer.constraint.values(),
        "weights": {name: p.detach().clone() for name, p in model.named_parameters()},
        "logs": [h for h in trainer.state.log_history if "loss" in h],
        "recovering": trainer.recovering,
        "boundary": trainer.boundary,
        "at_recovery": at_recovery.gates,
        "gates_trainable": any(p.requires_grad for p in trainer._flop.gate_parameters()),
        "gate_learning_rate": gate_groups[0]["lr"] if gate_groups else None,  # None: the compacted model trained
        "compacted_recovery": trainer.compacted_recovery,
        "trained_model_is_gated": trainer.model is model,
        "sparsity": sparsity_report(model).deterministic_sparsity,
        "half_unit": largest_unit_params(model) / sparsity_report(model).prunable_params / 2,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--phase", type=float, default=1.0, help="PruningArguments.pruning_phase")
    parser.add_argument("--levels", default="rank,head,row")
    parser.add_argument("--gate", default="hard_concrete")
    parser.add_argument("--find-unused-parameters", choices=["true", "false"], help="default: Trainer's choice")
    options = parser.parse_args()
    find_unused = None if options.find_unused_parameters is None else options.find_unused_parameters == "true"
    torch.set_num_threads(1)
    result = run(options.out, options.phase, options.levels.split(","), options.gate, find_unused)
    torch.save(result, os.path.join(options.out, f"rank{result['rank']}.pt"))


if __name__ == "__main__":
    main()
