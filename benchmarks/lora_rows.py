"""What bench_lora.py measures: LoRA against full recovery of SmolLM2-135M pruned to 50 %, at equal steps.

One row prunes (one-shot obs + refit, heads and FFN rows, the equal-budget rows' calibration) and saves
the compacted model; every recovery row then loads it in a fresh process, so its peak RSS is that of
the recovery alone (the pretrained teacher, the student, the optimizer state, the activations), and
trains it for the equal-budget rows' steps with the same distillation. ``python
benchmarks/bench_lora.py --list`` prints them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rows import Row, declare, lr_text
from smollm2_rows import LONG_BUDGET
from smollm2_rows import SETTINGS as SMOLLM2_SETTINGS

SCORE = "obs"
FULL_LEARNING_RATE = 2e-4  # the best measured rate of the equal-budget one-shot rows (eq_oneshotobslr20)
# the equal-budget rows' steps (4x the shared budget)
SETTINGS = {mode: {**values, "steps": LONG_BUDGET * values["steps"]} for mode, values in SMOLLM2_SETTINGS.items()}


@dataclass(frozen=True, kw_only=True)
class LoraRow(Row):
    """A row of the LoRA comparison. ``kind``: ``oneshot`` (prune and save) or ``recover``."""

    lora_rank: int | None = field(default=None, metadata={"help": "LoRA rank; None: full fine-tuning."})
    learning_rate: float = field(default=FULL_LEARNING_RATE, metadata={"help": "Recovery learning rate."})


def _lora(rank: int, learning_rate: float) -> LoraRow:
    return LoraRow(
        id=f"lora_r{rank}_lr{lr_text(learning_rate)}",
        label=f"LoRA recovery, rank {rank}, alpha {2 * rank}, every linear but the LM head, lr {lr_text(learning_rate)}",
        kind="recover",
        lora_rank=rank,
        learning_rate=learning_rate,
    )


ROWS: dict[str, LoraRow] = declare(
    [
        LoraRow(id="oneshot", label=f"hf_flop one-shot {SCORE} + refit at 50 %, head+row, compacted", kind="oneshot"),
        LoraRow(id="full", label=f"full recovery (every weight), lr {lr_text(FULL_LEARNING_RATE)}", kind="recover"),
        _lora(16, 1e-3),
        _lora(64, 5e-4),
    ]
)
