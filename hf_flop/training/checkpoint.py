"""What a pruning run adds to a Trainer checkpoint, and how it is read back.

* ``flop_constraint.json`` (``RUN_STATE_NAME``; named for the multipliers it first held, and kept so
  for older checkpoints): the multipliers, the step and its target, and in a run with a recovery
  phase which side of the boundary it was saved on and what the boundary did;
* ``flop_gates.pt`` (``GATE_STATE_NAME``), only next to a compacted-recovery checkpoint, whose
  model has no gates: every gate's tensors, so the masks can be restored into the gated model.
"""

from __future__ import annotations

import json
import os

import torch

from ..files import write_json_atomic

RUN_STATE_NAME = "flop_constraint.json"
GATE_STATE_NAME = "flop_gates.pt"


def save_run_state(output_dir: str, state: dict) -> None:
    write_json_atomic(os.path.join(output_dir, RUN_STATE_NAME), state)


def load_run_state(checkpoint: str) -> dict:
    """The run state saved with ``checkpoint``, or a clear error for a checkpoint PruningTrainer did not write."""
    path = os.path.join(checkpoint, RUN_STATE_NAME)
    if not os.path.isfile(path):
        raise ValueError(
            f"{checkpoint} has no {RUN_STATE_NAME}: it was not written by PruningTrainer, so the "
            "Lagrange multipliers cannot be restored. Resume from a PruningTrainer checkpoint."
        )
    with open(path) as f:
        return json.load(f)


def gate_state(flop_model) -> dict[str, torch.Tensor]:
    """Every gate's parameters and buffers, keyed ``<gate name>.<tensor name>`` (CPU copies)."""
    return {
        f"{key}.{name}": tensor.detach().cpu().clone()
        for key, gate in flop_model.gates().items()
        for name, tensor in gate.state_dict().items()
    }


def has_gate_state(checkpoint: str | None) -> bool:
    """Whether ``checkpoint`` is one of a compacted-recovery run (its gates saved beside the compacted model)."""
    return checkpoint is not None and os.path.isfile(os.path.join(checkpoint, GATE_STATE_NAME))


def save_gate_state(flop_model, output_dir: str) -> None:
    torch.save(gate_state(flop_model), os.path.join(output_dir, GATE_STATE_NAME))


def load_gate_state(flop_model, checkpoint: str) -> None:
    """Set the gates of the user's (fresh) model to those saved in a compacted-recovery checkpoint."""
    state = torch.load(os.path.join(checkpoint, GATE_STATE_NAME), map_location="cpu", weights_only=True)
    expected = gate_state(flop_model)
    if state.keys() != expected.keys() or any(state[k].shape != v.shape for k, v in expected.items()):
        raise ValueError(
            f"the gates saved in {checkpoint} ({GATE_STATE_NAME}) do not match this model's: resume with the "
            "model and FlopConfig the run started from."
        )
    with torch.no_grad():
        for key, gate in flop_model.gates().items():
            for name, tensor in gate.state_dict(keep_vars=True).items():
                tensor.copy_(state[f"{key}.{name}"])
