"""A few pruning steps of a gated tiny Llama sharded with FSDP2 (``fully_shard``), on CPU processes (gloo).

Run by tests/test_fsdp.py under torchrun. What PruningTrainer does each step, by hand (accelerate does
not enable FSDP without GPUs, so Trainer cannot be used here): the task loss plus the augmented
Lagrangian ``lambda_1 (s - t) + lambda_2 (s - t)^2`` of the expected sparsity ``s`` (computed outside
the forward pass), the trainer's optimizer groups (gates apart, multipliers by gradient ascent), each
transformer layer and the root sharded with the gates kept whole (``hf_flop.fsdp_ignored_params``)
and their gradients averaged by ``hf_flop.sync_gate_gradients``. Each process writes what it ended
with to ``<out>/rank<i>.pt``: gates, eval masks, multipliers, the full (gathered) state dict, and
the check of a model compacted from that state dict. ``run`` without a process group is the
test's single-process reference on the whole batches.

Usage: torchrun --nproc_per_node 2 tests/scripts/fsdp_train.py OUT_DIR [--levels L]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_task import CountingTask, tiny_llama  # noqa: E402

from hf_flop import (  # noqa: E402
    FlopConfig,
    compact,
    expected_sparsity,
    fsdp_ignored_params,
    get_flop_model,
    sparsity_report,
    sync_gate_gradients,
)
from hf_flop.accounting import find_flop_model  # noqa: E402
from hf_flop.constraint import CONSTRAINTS, warmed_up_target  # noqa: E402
from hf_flop.trainer import PruningArguments  # noqa: E402
from hf_flop.training.optimizer import add_pruning_groups, hold_learning_rates  # noqa: E402

STEPS, GLOBAL_BATCH, WARMUP = 6, 8, 3
# the trainer's constant rates of the gate and multiplier groups (PruningArguments' defaults)
RATES = SimpleNamespace(
    **{
        f.name: f.default
        for f in dataclasses.fields(PruningArguments)
        if f.name in ("gate_learning_rate", "lagrangian_learning_rate", "quadratic_learning_rate")
    }
)


def build(levels: Sequence[str]) -> torch.nn.Module:
    """The gated tiny Llama, with a few units closed from the start so that compaction removes something."""
    model = get_flop_model(tiny_llama(0), FlopConfig(target_sparsity=0.5, levels=list(levels)))
    for name, gate in find_flop_model(model).gates().items():
        if name.startswith("row_") or name.endswith("down_proj.rank"):
            gate.set_mask(torch.arange(gate.n) >= gate.n // 4)  # the first quarter closed
        elif name == "head_1":
            gate.set_mask(torch.arange(gate.n) > 0)  # layer 1's first KV group closed
    return model


def shard(model: torch.nn.Module, ignored: set | None) -> None:
    """FSDP2 on each transformer layer, then the root (the embeddings, the final norm, the structure gates)."""
    from torch.distributed.fsdp import fully_shard

    for layer in find_flop_model(model).model.model.layers:
        fully_shard(layer, ignored_params=ignored)
    fully_shard(model, ignored_params=ignored)


def _gates(model: torch.nn.Module) -> dict:
    gates = find_flop_model(model).gates()
    return {
        "gates": {name: [p.detach().clone() for p in g.parameters()] for name, g in gates.items()},
        "masks": {name: g.deterministic_mask().detach().clone() for name, g in gates.items()},
    }


def train(model: torch.nn.Module, constraint: torch.nn.Module, rank: int, world: int) -> list[int]:
    """``STEPS`` optimizer steps on this process's share of each global batch; the shares' checksums."""
    flop = find_flop_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    add_pruning_groups(optimizer, flop.gate_parameters(), dict(constraint.named_parameters()))
    hold_learning_rates(optimizer, RATES)
    ids, share, seen = CountingTask().ids, GLOBAL_BATCH // world, []
    torch.manual_seed(1)  # the same gate noise on every process and in the reference
    model.train()
    for step in range(STEPS):
        rows = ids[step * GLOBAL_BATCH : (step + 1) * GLOBAL_BATCH][rank * share : (rank + 1) * share]
        seen.append(int(rows.sum()))
        task = model(input_ids=rows, labels=rows).loss
        s = expected_sparsity(model)  # outside the forward pass, from the whole gates
        target = warmed_up_target(flop.flop_config.target_sparsity, step + 1, WARMUP)
        (task + constraint(s, target)).backward()
        sync_gate_gradients(model)  # FSDP averaged the sharded weights' gradients; these are ours to average
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return seen


def full_state_dict(model: torch.nn.Module, world: int) -> dict[str, torch.Tensor]:
    """Every weight whole (gathered from the shards under FSDP), on every process."""
    if world == 1:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def compaction_check(levels: Sequence[str], state: dict[str, torch.Tensor]) -> dict:
    """Load the gathered weights into a fresh gated model, compact it, compare the logits in eval mode."""
    gated = build(levels)
    gated.load_state_dict(state)
    gated.eval()
    rows = CountingTask(n=4, seed=1).ids
    with torch.no_grad():
        expected = gated(input_ids=rows).logits
        compacted = compact(gated)
        got = compacted(input_ids=rows).logits
    return {
        "max_logit_error": float((got - expected).abs().max()),
        "params": (sum(p.numel() for p in compacted.parameters()), sum(p.numel() for p in tiny_llama(0).parameters())),
        "sparsity": sparsity_report(gated).deterministic_sparsity,
    }


def held_fraction(model: torch.nn.Module) -> float:
    """The share of the model's weights (not the gates) this process holds: 1 / world under FSDP."""
    gates = {id(p) for p in fsdp_ignored_params(model)}
    weights = [p for p in model.parameters() if id(p) not in gates]
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in weights)
    return local / sum(p.numel() for p in weights)


def sharded_gates_error(levels: Sequence[str]) -> str | None:
    """What the expected sparsity says when the gates are sharded with the rest (not ignored)."""
    model = build(levels)
    shard(model, ignored=None)
    try:
        expected_sparsity(model)
    except ValueError as error:
        return str(error)
    return None


def run(out: str, levels: Sequence[str] = ("rank", "head", "row")) -> dict:
    """The run on this process (under FSDP when a process group is up); what it ended with."""
    distributed = dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    model = build(levels)
    if distributed:
        shard(model, fsdp_ignored_params(model))
    held = held_fraction(model)
    constraint = CONSTRAINTS[find_flop_model(model).flop_config.gate]()
    before = sparsity_report(model).expected_sparsity  # before any forward: the root's parameters are shards now
    seen = train(model, constraint, rank, world)
    state = full_state_dict(model, world)
    return {
        "rank": rank,
        "world_size": world,
        "seen": seen,
        "held_fraction": held,
        "sparsity_before": before,
        **_gates(model),
        "multipliers": constraint.values(),
        "expected_sparsity": sparsity_report(model).expected_sparsity,
        "weights": state,
        "compaction": compaction_check(levels, state),
        "sharded_gates_error": sharded_gates_error(levels) if distributed else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--levels", default="rank,head,row")
    options = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        result = run(options.out, options.levels.split(","))
        torch.save(result, os.path.join(options.out, f"rank{result['rank']}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
