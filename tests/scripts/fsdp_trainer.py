"""PruningTrainer under accelerate's FSDP2 preparation on CPU processes, set up as accelerate does on GPUs.

accelerate (1.16) takes its FSDP branch only for GPU-type processes (``AcceleratorState``, in
accelerate/state.py: the branch that sets ``DistributedType.FSDP`` is entered for MULTI_GPU, MULTI_NPU,
MULTI_XPU, ... and not MULTI_CPU). This script sets the same state by hand once Trainer created its
Accelerator (``DistributedType.FSDP`` and an FSDP2 plugin), so that the rest is accelerate's real
code: ``fully_shard`` of each decoder layer and the root by its transformer-based wrap policy, the
optimizer's parameters switched to the shards, the clipping of mixed DTensor / whole gradients, and
PruningTrainer's FSDP setup (``hf_flop.training.fsdp_setup``). Each process writes what it ended with
to ``<out>/rank<i>.pt``.

Usage: torchrun --nproc_per_node 2 tests/scripts/fsdp_trainer.py OUT_DIR
"""

from __future__ import annotations

import os
import sys

import torch
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fsdp_train import _gates, compaction_check, full_state_dict, held_fraction  # noqa: E402
from tiny_task import CountingTask, tiny_llama  # noqa: E402

from hf_flop import FlopConfig, PruningArguments, PruningTrainer, get_flop_model  # noqa: E402

LEVELS = ("rank", "head", "row")


class FsdpAsOnGpus(PruningTrainer):
    """PruningTrainer whose Accelerator is switched to FSDP2 right after Trainer creates it (see the module docstring)."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
            state_dict_type="FULL_STATE_DICT",
        )
        state = AcceleratorState()
        state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        state.fsdp_plugin = plugin
        self.is_fsdp_enabled = True


def _arguments(out: str, phase: float) -> PruningArguments:
    return PruningArguments(
        output_dir=out,
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=2,
        target_warmup_steps=2,
        pruning_phase=phase,
        save_strategy="no",
        report_to=[],
        seed=0,
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
    )


def _refusal(out: str) -> str | None:
    """What the trainer says, before any step, to a two-phase run under FSDP."""
    model = get_flop_model(tiny_llama(0), FlopConfig(target_sparsity=0.5, levels=list(LEVELS)))
    try:
        FsdpAsOnGpus(model=model, args=_arguments(out, 0.5), train_dataset=CountingTask())
    except ValueError as error:
        return str(error)
    return None


def _save_refusal(trainer: PruningTrainer, out: str) -> str | None:
    """What ``save_compacted`` says on the sharded model (on every process, before its barrier)."""
    try:
        trainer.save_compacted(os.path.join(out, "compacted"))
    except ValueError as error:
        return str(error)
    return None


def run(out: str) -> dict:
    model = get_flop_model(tiny_llama(0), FlopConfig(target_sparsity=0.5, levels=list(LEVELS)))
    trainer = FsdpAsOnGpus(model=model, args=_arguments(out, 1.0), train_dataset=CountingTask())
    trainer.train()
    state = full_state_dict(trainer.model, trainer.args.world_size)
    return {
        "rank": trainer.args.process_index,
        "world_size": trainer.args.world_size,
        "fsdp": trainer.is_fsdp_enabled and trainer.accelerator.is_fsdp2,
        "held_fraction": held_fraction(trainer.model),
        **_gates(model),
        "multipliers": trainer.constraint.values(),
        "roles": sorted(g["flop_role"] for g in trainer.optimizer.param_groups if "flop_role" in g),
        "logs": [h for h in trainer.state.log_history if "loss" in h],
        "compaction": compaction_check(LEVELS, state),
        "save_refusal": _save_refusal(trainer, out),
        "refusal": _refusal(out),
    }


def main() -> None:
    torch.set_num_threads(1)
    result = run(sys.argv[1])
    torch.save(result, os.path.join(sys.argv[1], f"rank{result['rank']}.pt"))


if __name__ == "__main__":
    main()
