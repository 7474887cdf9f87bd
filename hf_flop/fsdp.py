"""Training a gated model under FSDP2 (``torch.distributed.fsdp.fully_shard``): keep the gates whole.

The expected sparsity (what the size constraint reads) and the eval masks are computed outside the
forward pass, from every gate at once. FSDP2 holds a sharded module's parameters as ``DTensor``
shards between forwards, and the gate arithmetic does not run on shards (the eval mask's in-place
top-k fails in DTensor's sharding propagation). So the gates stay out of FSDP's sharding: pass
``fsdp_ignored_params(model)`` as ``fully_shard(..., ignored_params=...)`` to every call (or
``fsdp_ignored_modules(model)`` as accelerate's ``fsdp_ignored_modules``). They are a few numbers per
unit, so every process holding them whole costs little memory.

FSDP does not reduce the gradients of the parameters it ignores: call
``sync_gate_gradients(model)`` after ``backward()`` and before clipping and the optimizer step, so
every process takes the same gate step (averaged over processes, as FSDP averages the rest). The
Lagrange multipliers need nothing: each process computes the same expected sparsity from the same
gates, hence the same multiplier gradient.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .lookup import find_flop_model


def _gate_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The gate modules of ``model`` by their names in ``model.named_modules()``."""
    gates = {id(g) for g in find_flop_model(model).gates().values()}
    return {name: m for name, m in model.named_modules() if id(m) in gates}


def fsdp_ignored_params(model: nn.Module) -> set[nn.Parameter]:
    """Every gate parameter of the FLOP model ``model``: FSDP2's ``ignored_params`` (kept whole on every process).

    Pass the same set to each ``fully_shard`` call (the transformer layers and the root).
    """
    return set(find_flop_model(model).gate_parameters())


def fsdp_ignored_modules(model: nn.Module) -> str:
    """A regular expression that fully matches the names of the gate modules in ``model``, and nothing else.

    For accelerate's FSDP plugin (``fsdp_ignored_modules`` in the ``fsdp_config`` of an accelerate
    config, or the ``FSDP_IGNORED_MODULES`` environment variable), which matches it against the
    module names of the model given to ``accelerator.prepare`` (the ``PeftModel`` itself under
    Trainer). Pass the model you hand to the trainer.
    """
    names = list(_gate_modules(model))
    if not names:
        raise ValueError(f"{type(model).__name__} has FLOP layers but no gates; nothing to keep out of FSDP.")
    return "|".join(re.escape(name) for name in names)


def _sharded_gates(model: nn.Module) -> list[str]:
    """The names of the gates whose parameters are FSDP shards (``DTensor``) right now."""
    if not torch.distributed.is_available():
        return []
    from torch.distributed.tensor import DTensor  # only where torch.distributed exists

    gates = find_flop_model(model).gates()
    return [name for name, gate in gates.items() if any(isinstance(p, DTensor) for p in gate.parameters())]


def check_gates_unsharded(model: nn.Module) -> None:
    """Raise ``ValueError`` when FSDP shards a gate: the expected sparsity and eval masks need whole gates."""
    sharded = _sharded_gates(model)
    if sharded:
        raise ValueError(
            f"{len(sharded)} gate(s) are FSDP shards (DTensor), e.g. {sharded[0]!r}: the expected sparsity and the "
            "eval masks read whole gates outside the forward pass. Keep the gates out of FSDP's sharding: "
            "fully_shard(module, ignored_params=hf_flop.fsdp_ignored_params(model)) for every fully_shard call "
            "(with accelerate: fsdp_ignored_modules=hf_flop.fsdp_ignored_modules(model)), and call "
            "hf_flop.sync_gate_gradients(model) after backward()."
        )


def check_weights_whole(model: nn.Module, verb: str) -> None:
    """Raise ``ValueError`` when ``model`` holds FSDP shards: ``verb`` (compaction, saving) needs whole weights."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.tensor import DTensor

    sharded = [name for name, p in model.named_parameters() if isinstance(p, DTensor)]
    if sharded:
        raise ValueError(
            f"{verb} needs whole weights, and {len(sharded)} parameters of this model are FSDP shards (DTensor), e.g. "
            f"{sharded[0]!r}. Gather them first: state = torch.distributed.checkpoint.state_dict.get_model_state_dict("
            "model, options=StateDictOptions(full_state_dict=True)) on every process, then on "
            "process 0 load it into an unsharded gated model (get_flop_model on the same base model and FlopConfig) "
            f"and call {verb} on that."
        )


@torch.no_grad()
def sync_gate_gradients(model: nn.Module, group=None) -> None:
    """Average the gate gradients over the processes of ``group`` (default: all), in place.

    What FSDP does for the parameters it shards, for the gates it was told to ignore. Call it on
    every process after ``backward()`` (after the last micro-batch of a gradient-accumulation window,
    or after each: averaging a gradient that is already the same everywhere leaves it unchanged).
    One all-reduce of the gradients flattened together; nothing without an initialised process
    group. Every process must hold gradients for the same gates (they run the same graph).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size(group)
    grads = [p.grad for p in find_flop_model(model).gate_parameters() if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat, group=group)
    flat /= world
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()
